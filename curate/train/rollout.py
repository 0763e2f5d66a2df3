"""Multi-turn rollouts with the python tool, kept as token ids.

A rollout is the prompt's ids followed by turns: the policy generates until `</tool_call>` or the end of
its turn; a call runs in the sandbox (one interpreter state per trajectory: earlier cells are replayed,
the input images preloaded as `image_1, ...`, as the filters run them) and its output comes back in a
user turn. The policy's tokens are kept exactly as sampled and marked in `policy_mask`; observation and
template tokens are appended as ids and masked, so nothing is ever re-tokenised. A rollout ends when a
turn makes no call, after `max_turns` calls and one more turn to answer, or at `max_tokens` (an observation
that would reach it is left out: no turn would read it).

Turns are sampled for all unfinished rollouts at once by a `TurnSampler`: the policy's own `generate`
(`TransformersTurns`, CPU or GPU), or vLLM holding a copy of the policy's weights that is refreshed after
every update (`curate.train.vllm_turns`). The calls of one round of turns run in the sandbox together.
Images a call shows or saves come back to a vision-language policy in its observation (up to
`observation_images` per call), through the processor, as the prompt's images do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from curate.formats import MalformedRow
from curate.formats.inline import parse_calls
from curate.generation import Prompt as ChatPrompt
from curate.generation import pil_image
from curate.generation.hf import LoadedModel, load_model, materialise
from curate.sample import Image, ImagePart, Message, Part, Sample, TextPart
from curate.sandbox import Sandbox, TrajectoryResult
from curate.sandbox.trajectory import sandbox_job
from curate.train.chat import PER_TOKEN, ChatEncoder, observation, prompt_turns
from curate.train.distributed import full_weights
from curate.train.padding import right_padded

STOP = "</tool_call>"
_SENTINEL = "\ue000"  # a private-use character no template or tokenizer gives meaning to


@dataclass
class Rollout:
    prompt: Sample
    ids: list[int]
    policy_mask: list[int]
    vision: dict[str, torch.Tensor]
    files: dict[str, bytes]
    preload: list[str]
    images: list[Image] = field(default_factory=list)  # every image in `ids`, in order: the prompt's, then the tool's
    cells: list[str] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)  # the policy's text, turn by turn
    tool_calls: int = 0  # T: every call made, invalid ones included
    done: bool = False

    @property
    def final_text(self) -> str:
        return self.turns[-1] if self.turns else ""


@dataclass
class RolloutConfig:
    max_turns: int = 10  # tool calls per rollout (Metis: 10)
    max_new_tokens: int = 512  # per turn
    max_tokens: int = 4096  # whole rollout
    temperature: float = 1.0
    top_p: float = 1.0
    observation_images: int = 2  # images a call's output may show a vision-language policy (the first ones)


@dataclass
class ToolOutput:
    """What a call gives back: its printed text, and the images the cell showed or saved."""

    text: str
    images: list[Image] = field(default_factory=list)


class TurnSampler(Protocol):
    """Where a rollout's next turn comes from: the policy itself (`TransformersTurns`), or an inference engine
    holding a copy of its weights (`curate.train.vllm_turns.VLLMTurns`)."""

    def sample(self, rollouts: list[Rollout]) -> list[list[int]]:
        """One turn's new token ids per rollout: up to `</tool_call>`, or up to and including the end of turn."""
        ...

    def load_policy(self, net: torch.nn.Module) -> None:
        """Called after every update: sample from the policy's new weights from now on."""
        ...

    def keep_sampling(self, active: list[Rollout]) -> bool:
        """Whether to call `sample` again with these unfinished rollouts (some ranks' samplers must go on, with
        none, until every rank's rollouts are done)."""
        ...

    def close(self) -> None:
        """Free what the sampler holds, at the end of training."""
        ...


def placeholder_ids(loaded: LoadedModel) -> list[int]:
    """The image and video placeholder ids a policy must never sample: a rollout holding more of them than
    image features cannot be read by the model."""
    return ChatEncoder(loaded.processor, loaded.vision).placeholders


class TransformersTurns:
    """Turns sampled by `generate` of the policy being trained (it always has the latest weights)."""

    def __init__(self, loaded: LoadedModel, config: RolloutConfig) -> None:
        self.loaded, self.config = loaded, config
        self.encoder = ChatEncoder(loaded.processor, loaded.vision)
        self.tokenizer = loaded.tokenizer
        self._placeholders = placeholder_ids(loaded)

    def sample(self, rollouts: list[Rollout]) -> list[list[int]]:
        groups = [[r] for r in rollouts] if self.loaded.vision else [rollouts]  # pixel inputs do not batch
        return [new for group in groups for new in self._generate(group)]

    def load_policy(self, net: torch.nn.Module) -> None:
        """Nothing to do: the sampler is the policy."""

    def keep_sampling(self, active: list[Rollout]) -> bool:
        return bool(active)

    def close(self) -> None:
        """Nothing to free: the sampler is the policy (or, on several ranks, a copy that goes with it)."""

    @torch.inference_mode()
    def _generate(self, rollouts: list[Rollout]) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(r.ids) for r in rollouts)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rollouts], device=self.loaded.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rollouts], device=self.loaded.device)
        vision = {k: v.to(self.loaded.device) for k, v in rollouts[0].vision.items()} if self.loaded.vision else {}
        vision.update(self.encoder.token_types(ids))  # the ids grow with each turn: their token types follow
        output = self.loaded.net.generate(
            input_ids=ids, attention_mask=mask, **vision, do_sample=True, temperature=self.config.temperature,
            top_p=self.config.top_p, top_k=0, max_new_tokens=self.config.max_new_tokens, stop_strings=[STOP],
            tokenizer=self.tokenizer, pad_token_id=pad, suppress_tokens=self._placeholders or None)
        new_tokens = []
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in (self.tokenizer.eos_token_id, pad)), len(row))
            # A row stopped at the call is padded after it (the pad may be the end-of-turn token): keep no pad.
            called = STOP in self.tokenizer.decode(row[:end])
            new_tokens.append(row[:end] if called or end == len(row) else row[: end + 1])
        return new_tokens


class GatheredTurns(TransformersTurns):
    """Turns of a policy sharded over several ranks, sampled by an unsharded copy of it on each rank, refreshed
    with the gathered weights after every update.

    Sampling through the sharded policy would all-gather every layer for every token, and hang: a forward pass of
    a sharded model is a collective, and ranks sample turns of different lengths and numbers. The copy costs a
    whole model per rank (in bfloat16 with `bf16`), as a vLLM engine's copy would."""

    def __init__(self, loaded: LoadedModel, weights: str, config: RolloutConfig, bf16: bool = False) -> None:
        # Built empty, then given the policy's weights: no rank reads the whole model from disk for it.
        copy = load_model(weights, loaded.device, "bfloat16" if bf16 else "float32", weights=False).net.eval()
        materialise(copy, loaded.device)
        super().__init__(replace(loaded, net=copy), config)
        self.load_policy(loaded.net)

    def load_policy(self, net: torch.nn.Module) -> None:
        self.loaded.net.load_state_dict(full_weights(net))


class RolloutEngine:
    def __init__(self, loaded: LoadedModel, sandbox: Sandbox, config: RolloutConfig,
                 turns: TurnSampler | None = None) -> None:
        self.loaded, self.sandbox, self.config = loaded, sandbox, config
        self.turns = turns or TransformersTurns(loaded, config)
        self.encoder = ChatEncoder(loaded.processor, loaded.vision)
        self.tokenizer = loaded.tokenizer
        # A minimal chat ending in an assistant turn: what the template writes after it closes the
        # policy's turn, and rendering an observation after it shows how the template writes a user turn.
        self._context = [Message("user", [TextPart("q")]), Message("assistant", [TextPart(_SENTINEL)])]
        self._context_text = self.encoder.text(self._context, [], generation_prompt=False)
        self._turn_end = self._context_text[self._context_text.index(_SENTINEL) + 1:]  # e.g. `<|im_end|>\n`

    def start(self, sample: Sample) -> Rollout:
        turns = prompt_turns(sample)
        ids, vision = self.encoder.ids(turns, sample.images, generation_prompt=True)
        _, files, preload = sandbox_job(Sample(sample.id, sample.source, turns, sample.images))
        shown = ChatPrompt(tuple(turns), tuple(sample.images)).shown_images() if self.loaded.vision else []
        return Rollout(sample, ids, [0] * len(ids), vision, files, preload, shown)

    def run(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Generate turn after turn until every rollout is done."""
        while self.turns.keep_sampling(active := [r for r in rollouts if not r.done]):
            self.advance(active, self.turns.sample(active))
        return rollouts

    def advance(self, rollouts: list[Rollout], new_turns: list[list[int]]) -> None:
        """Append each rollout's new turn; the calls the turns make run in the sandbox together, one warm
        worker each, and their outputs come back as the next user turns."""
        calling = [(rollout, text) for rollout, new in zip(rollouts, new_turns, strict=True)
                   if (text := self._append_turn(rollout, new)) is not None]
        for (rollout, _), output in zip(calling, self._tool_outputs(calling), strict=True):
            self._append_observation(rollout, output)

    def _append_turn(self, rollout: Rollout, new: list[int]) -> str | None:
        """Append the policy's tokens; the turn's text if it calls the tool, None when the rollout is done."""
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        rollout.ids += new
        rollout.policy_mask += [1] * len(new)
        rollout.turns.append(text)
        calls_left = rollout.tool_calls < self.config.max_turns
        if STOP not in text or not calls_left or len(rollout.ids) >= self.config.max_tokens:
            rollout.done = True
            return None
        rollout.tool_calls += 1
        return text

    def _tool_outputs(self, calling: list[tuple[Rollout, str]]) -> list[ToolOutput]:
        """What the tool answers to each turn's call: the python cell's output, or why it could not run."""
        outputs: list[ToolOutput | None] = [self._add_cell(rollout, text) for rollout, text in calling]
        runnable = [index for index, problem in enumerate(outputs) if problem is None]
        results = self.sandbox.run_many([(calling[i][0].cells, calling[i][0].files, calling[i][0].preload)
                                         for i in runnable])
        for index, result in zip(runnable, results, strict=True):
            outputs[index] = self._outcome(calling[index][0], result)
        return outputs  # type: ignore[return-value]

    @staticmethod
    def _add_cell(rollout: Rollout, text: str) -> ToolOutput | None:
        """Add the call's code to the rollout's cells and return None; or return the error the policy reads
        instead when the turn holds no python call with code."""
        try:
            _, calls = parse_calls(text[text.rfind("<tool_call>"):])
        except MalformedRow as error:
            calls, problem = [], str(error)
        else:
            problem = "not a python call with code"
        if not calls or calls[-1].code is None:
            return ToolOutput(f"Error: {problem}; write <tool_call>{{\"name\": \"python\", \"arguments\": "
                              f"{{\"code\": \"...\"}}}}</tool_call>")
        rollout.cells.append(calls[-1].code)
        return None

    @staticmethod
    def _outcome(rollout: Rollout, result: TrajectoryResult) -> ToolOutput:
        if len(result.cells) < len(rollout.cells):
            rollout.cells.pop()
            return ToolOutput(f"Error: {result.status}: {result.detail}")
        cell = result.cells[-1]  # earlier cells were replayed for their state: only the new one answers
        if cell.error:
            rollout.cells.pop()  # a failing cell leaves no state behind for the next call
            return ToolOutput(f"{cell.stdout}Error: {cell.error}")
        return ToolOutput(cell.stdout or ("" if cell.images else "(no output)"), [Image(data) for data in cell.images])

    def _append_observation(self, rollout: Rollout, output: ToolOutput) -> None:
        """Close the policy's turn, add the tool output as a user turn and open the next turn: ids masked, the
        output's images (for a vision-language policy) appended to the pixel inputs in the order the ids show them."""
        ids, vision, shown = self._encode_observation(output)
        if len(rollout.ids) + len(ids) >= self.config.max_tokens:
            # No turn would follow it: leave the (masked) observation out, so a flood of output costs no memory.
            rollout.done = True
            return
        rollout.ids += ids
        rollout.policy_mask += [0] * len(ids)
        rollout.images += shown
        for name, value in vision.items():
            rollout.vision[name] = torch.cat([rollout.vision[name], value]) if name in rollout.vision else value

    def _encode_observation(self, output: ToolOutput) -> tuple[list[int], dict[str, torch.Tensor], list[Image]]:
        """(ids, pixel inputs, images shown) of the template text between the policy's turn and its next one."""
        shown = output.images[: self.config.observation_images] if self.loaded.vision else []
        text = output.text.rstrip()
        if len(output.images) > len(shown):
            text += f"\n({len(output.images) - len(shown)} image(s) not shown)"
        parts: list[Part] = [TextPart(text), *(ImagePart(index) for index in range(len(shown)))]
        after = self.encoder.text([*self._context, observation(parts)], shown, generation_prompt=True)
        suffix = self._turn_end + after[len(self._context_text):]
        if not shown:
            return self.tokenizer(suffix, add_special_tokens=False).input_ids, {}, []
        encoded = self.loaded.processor(text=[suffix], images=[pil_image(image) for image in shown], return_tensors="pt")
        return encoded["input_ids"][0].tolist(), {k: v for k, v in encoded.items() if k not in PER_TOKEN}, shown


def padded(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and policy mask (as the loss mask) of rollouts, for the loss."""
    return right_padded([(r.ids, r.policy_mask) for r in rollouts], pad_id)
