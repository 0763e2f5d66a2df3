"""Trajectories as the policy sees them, and as token ids with a loss mask.

The trainer speaks one dialect, Metis's: an assistant turn writes at most one call inline,
`<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>`, and the observation comes back
in a user turn, `<tool_response>...</tool_response>` (with any images it showed). SFT data in any
source format is rendered into it, so cold start teaches exactly what HDPO rollouts then do.

Token ids are built turn by turn: each turn's tokens are the difference between the chat template's
rendering up to that turn and up to the one before, so the loss mask is exact (only assistant tokens,
end-of-turn included) and never depends on re-tokenising a whole conversation (TRL #5144).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from curate.formats.inline import render_tool_call_json
from curate.generation import Prompt as ChatPrompt
from curate.generation import pil_images
from curate.sample import Image, Message, Part, Sample, TextPart

RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
# Per-token outputs of a processor, left out of `Encoded.vision`: the trainer pads, cuts and extends the ids,
# so the modality of each token (`mm_token_type_ids`, which Qwen-VL's M-RoPE reads) is derived from the ids
# where a batch is built (`ChatEncoder.token_types`) instead of being kept from the encoding.
PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def policy_turns(sample: Sample) -> list[Message]:
    """The sample's messages in the trainer's dialect: calls inline in assistant text, observations as user turns."""
    turns: list[Message] = []
    for message in sample.messages:
        if message.role == "assistant":
            calls = "".join(render_tool_call_json(call) for call in message.tool_calls)
            turns.append(Message("assistant", [TextPart(message.text + calls)]))
        elif message.role == "tool":
            turns.append(observation(message.content))
        else:
            turns.append(Message(message.role, list(message.content)))
    return turns


def observation(content: list[Part]) -> Message:
    """A tool's output as the user turn the policy reads (trailing whitespace trimmed, so a recorded
    observation and a live one look the same whether or not the print ended the line)."""
    parts = list(content)
    if parts and isinstance(parts[-1], TextPart):
        parts[-1] = TextPart(parts[-1].text.rstrip())
    return Message("user", [TextPart(RESPONSE_OPEN), *parts, TextPart(RESPONSE_CLOSE)])


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [tokens]
    loss_mask: torch.Tensor  # [tokens], 1 on assistant tokens
    vision: dict[str, torch.Tensor]  # pixel inputs of a vision-language processor (pixel_values, ...), else empty


class ChatEncoder:
    """Renders turns with the model's chat template and encodes them with its tokenizer or processor."""

    def __init__(self, processor: Any, vision: bool) -> None:
        self.processor = processor
        self.vision = vision
        self.tokenizer = processor.tokenizer if vision else processor
        # A model reads token types where its processor returns them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); asking the
        # processor holds across transformers releases, which changed how it says so.
        self._typed = vision and "mm_token_type_ids" in processor(text=["x"])

    def text(self, turns: list[Message], images: list[Image], generation_prompt: bool) -> str:
        chat = ChatPrompt(tuple(turns), tuple(images))
        messages = chat.chat() if self.vision else chat.text_chat()
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def ids(self, turns: list[Message], images: list[Image], generation_prompt: bool = False) -> tuple[list[int], dict]:
        """Token ids of the rendered turns (and pixel inputs, for a vision-language model)."""
        text = self.text(turns, images, generation_prompt)
        if not self.vision:
            return self.tokenizer(text, add_special_tokens=False).input_ids, {}
        shown = pil_images(ChatPrompt(tuple(turns), tuple(images)))
        encoded = self.processor(text=[text], images=shown or None, return_tensors="pt")
        vision = {k: v for k, v in encoded.items() if k not in PER_TOKEN}
        return encoded["input_ids"][0].tolist(), vision

    @property
    def placeholders(self) -> list[int]:
        """The ids a vision-language processor reserves for pixel features (`<|image_pad|>`, `<|video_pad|>`): their
        count must match the pixel inputs' features, so no cut may fall among them and no policy may sample one."""
        processor = self.processor if self.vision else None
        return [i for name in ("image_token_ids", "video_token_ids") for i in getattr(processor, name, None) or []
                if i is not None]

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the model needs besides ids and attention mask, for a batch of ids [rows, tokens]:
        `mm_token_type_ids` (text 0, image 1, video 2) for processors whose models read it (Qwen2-VL, Qwen2.5-VL,
        Qwen3-VL), computed by the processor from the ids themselves; nothing for other models."""
        if not self._typed:
            return {}
        types = self.processor.create_mm_token_type_ids(input_ids.tolist())
        return {"mm_token_type_ids": torch.tensor(types, dtype=torch.long, device=input_ids.device)}

    def encode(self, turns: list[Message], images: list[Image]) -> Encoded:
        """Ids of the whole conversation with a mask on the assistant turns' tokens."""
        ids: list[int] = []
        mask: list[int] = []
        vision: dict = {}
        for index, turn in enumerate(turns):
            before = self.ids(turns[:index], images, generation_prompt=turn.role == "assistant")[0] if index else []
            after, vision = self.ids(turns[: index + 1], images)
            if after[: len(ids)] != ids or before[: len(ids)] != ids:
                raise ValueError(f"the chat template does not render turn {index} as an extension of the turns "
                                 "before it; the loss mask cannot be placed exactly")
            trained = len(after) - len(before) if turn.role == "assistant" else 0
            mask += [0] * (len(after) - len(ids) - trained) + [1] * trained
            ids = after
        return Encoded(torch.tensor(ids), torch.tensor(mask), vision)


def prompt_turns(sample: Sample) -> list[Message]:
    """The RL prompt: the sample's turns up to its first assistant turn."""
    turns = []
    for message in sample.messages:
        if message.role == "assistant":
            break
        turns.append(Message(message.role, list(message.content)))
    return turns

