"""Judge backend on a local transformers model, with the answer constrained to the verdict schema.

A small model asked for JSON mostly writes prose. This backend writes the JSON itself and lets the model
choose only the values: for a field with a closed set of values (an integer range such as 1-5, a bool,
a Literal) it scores each value's tokens after the prompt and the JSON so far and takes the likeliest;
a string field is decoded greedily up to `string_tokens` tokens. The answer is therefore always valid,
and exactly as good as the model: the 135M model of the `--local` profile gives noisy scores.

Cost on a CPU is the prompt, so: the rubric's KV cache is computed once and shared by every request;
requests that arrive together (the runner sends up to `concurrency` at once) are decoded as one batch;
`max_prompt_tokens` keeps only the head and tail of long judged texts (the question and the final answer).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import typing
from typing import Any

import torch
from annotated_types import Ge, Le
from pydantic.fields import FieldInfo

from curate.generation import Prompt, render_chat
from curate.generation.hf import cache_keyword, load_model
from curate.sample import Message, TextPart
from curate.judges.backend import JudgeReply, JudgeRequest

ELISION = "\n[...]\n"


class LocalJudge:
    name = "transformers"

    def __init__(self, model: str, device: str = "auto", string_tokens: int = 32,
                 max_prompt_tokens: int | None = None) -> None:
        self.model = model
        self.string_tokens = string_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.settings = {"string_tokens": string_tokens, "max_prompt_tokens": max_prompt_tokens}
        self._device = device
        self.net: Any = None  # loaded at the first request the cache lacks: a cached run loads no model
        self._lock = threading.Lock()  # one batch at a time on the one model
        self._rubric: tuple[str, _Decoder] | None = None  # the last rubric and a decoder that has read it
        self._waiting: list[tuple[JudgeRequest, asyncio.Future[JudgeReply]]] = []

    async def complete(self, request: JudgeRequest) -> JudgeReply:
        """Queue the request; the requests queued in the same turn of the event loop are decoded together."""
        future: asyncio.Future[JudgeReply] = asyncio.get_running_loop().create_future()
        if not self._waiting:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        self._waiting.append((request, future))
        return await future

    async def aclose(self) -> None:
        self.net = None

    def _load(self) -> None:
        if self.net is None:
            loaded = load_model(self.model, self._device)
            self.net, self.tokenizer, self.device = loaded.net.eval(), loaded.tokenizer, loaded.device

    async def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            replies = await asyncio.to_thread(self._complete_batch, [request for request, _ in batch])
        except Exception as error:  # noqa: BLE001 - handed to every waiting request, which raises it
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            future.set_result(reply)

    def _complete_batch(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        groups: dict[tuple[str, type], list[int]] = {}
        for index, request in enumerate(requests):  # one rubric and schema per decoded batch
            groups.setdefault((request.system, request.schema), []).append(index)
        replies: list[JudgeReply | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            self._load()
            for indices in groups.values():
                for index, reply in zip(indices, self._decode([requests[i] for i in indices]), strict=True):
                    replies[index] = reply
        return replies  # type: ignore[return-value]

    def _decode(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        rubric_text, decoder = self._after_rubric(requests[0].system, len(requests))
        pending = [self._judged_tokens(request, rubric_text) for request in requests]
        prompt_tokens = [decoder.length + len(tokens) for tokens in pending]
        values: list[dict[str, Any]] = [{} for _ in requests]
        glue = "{"
        for name, field in requests[0].schema.model_fields.items():
            # The value chosen last, the next key, and (the first time) the judged text go in one forward pass.
            decoder.feed([tokens + self._tokens(f'{glue}"{name}": ') for tokens in pending])
            glue, choices = ", ", closed_values(field)
            if choices is None:
                for row, text in enumerate(decoder.string(self.string_tokens)):
                    values[row][name] = text
                pending = [[] for _ in requests]
                continue
            scores = torch.stack([decoder.score(self._tokens(json.dumps(choice))) for choice in choices])
            for row, best in enumerate(scores.argmax(0).tolist()):
                values[row][name] = choices[best]
            pending = [self._tokens(json.dumps(row_values[name])) for row_values in values]
        return [JudgeReply(json.dumps(v), n, decoder.generated[row]) for row, (v, n) in enumerate(zip(values, prompt_tokens))]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _judged_tokens(self, request: JudgeRequest, rubric_text: str) -> list[int]:
        """The chat after the rubric, its head and tail only when longer than `max_prompt_tokens`."""
        chat = Prompt((Message("system", [TextPart(request.system)]), *request.prompt.messages), request.prompt.images)
        text = render_chat(self.tokenizer, chat, vision=False)
        if not text.startswith(rubric_text):
            raise ValueError(f"{self.model}'s chat template renders the system turn differently in context")
        tokens = self._tokens(text[len(rubric_text):])
        limit = self.max_prompt_tokens
        if limit is None or len(tokens) <= limit:
            return tokens
        return tokens[: limit // 2] + self._tokens(ELISION) + tokens[-(limit - limit // 2):]

    def _after_rubric(self, rubric: str, rows: int) -> tuple[str, _Decoder]:
        """The rubric as the chat template writes it, and a decoder of `rows` rows that has read it. The
        rubric's KV cache is computed once and copied for each batch: every request of a stage shares it."""
        text = self.tokenizer.apply_chat_template([{"role": "system", "content": rubric}], tokenize=False)
        if self._rubric is None or self._rubric[0] != rubric:
            decoder = _Decoder(self.net, self.tokenizer, rows=1)
            decoder.feed([self._tokens(text)])
            self._rubric = (rubric, decoder)
        return text, self._rubric[1].repeat(rows)


def closed_values(field: FieldInfo) -> list[Any] | None:
    """The values a field may take when they are few: a bool, a Literal, an integer range of at most 10."""
    annotation = field.annotation
    if annotation is bool:
        return [True, False]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if annotation is int:
        low = next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
        high = next((m.le for m in field.metadata if isinstance(m, Le)), None)
        if low is not None and high is not None and high - low < 10:
            return list(range(int(low), int(high) + 1))
    return None


class _Decoder:
    """Rows of text read so far (a KV cache and an attention mask), and each row's next-token log-probabilities.

    Each `feed` appends a chunk of tokens per row, left-padded to the longest chunk so that every row's last
    real token is the last position (the LM head runs there only); the pads stay masked for good.
    """

    def __init__(self, net: Any, tokenizer: Any, rows: int) -> None:
        self.net, self.tokenizer, self.pad = net, tokenizer, tokenizer.pad_token_id
        self.device = net.device
        self.cache: Any = None
        self.cache_keyword = cache_keyword(net)
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=self.device)
        self.next_position = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.logprobs = torch.zeros(rows, 0, device=self.device)
        self.generated = [0] * rows

    @property
    def length(self) -> int:
        return int(self.next_position[0])  # rows differ only after the rubric; this is used for the rubric

    def repeat(self, rows: int) -> _Decoder:
        """A copy with this (single-row) state repeated `rows` times."""
        clone = copy.copy(self)
        clone.cache = copy.deepcopy(self.cache)
        clone.cache.batch_repeat_interleave(rows)
        clone.mask, clone.next_position = self.mask.repeat(rows, 1), self.next_position.repeat(rows)
        clone.logprobs, clone.generated = self.logprobs.repeat(rows, 1), [0] * rows
        return clone

    def _forward(self, chunks: list[list[int]], keep: int = 1) -> torch.Tensor:
        width = max(len(chunk) for chunk in chunks)
        ids = torch.tensor([[self.pad] * (width - len(c)) + c for c in chunks], device=self.device)
        new = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunks], device=self.device)
        positions = self.next_position[:, None] + (new.cumsum(-1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, new], dim=1)
        output = self.net(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                          **{self.cache_keyword: self.cache}, use_cache=True, logits_to_keep=keep)
        self.cache = getattr(output, self.cache_keyword)
        self.next_position = self.next_position + new.sum(-1)
        return output.logits.float().log_softmax(-1)

    def feed(self, chunks: list[list[int]]) -> None:
        """Append a chunk per row (an empty chunk leaves that row as it was)."""
        if not any(chunks):
            return
        logprobs = self._forward(chunks)[:, -1]
        fed = torch.tensor([bool(chunk) for chunk in chunks], device=self.device)
        self.logprobs = torch.where(fed[:, None], logprobs, self.logprobs) if self.logprobs.numel() else logprobs

    def score(self, tokens: list[int]) -> torch.Tensor:
        """Log-probability, per row, of `tokens` coming next; the state is left as it was."""
        total = self.logprobs[:, tokens[0]].clone()
        if len(tokens) > 1:
            saved = (self.mask, self.next_position, self.mask.shape[1])
            following = self._forward([tokens[:-1]] * len(total), keep=len(tokens) - 1)
            for position, token in enumerate(tokens[1:]):
                total += following[:, position, token]
            self.mask, self.next_position, length = saved
            self.cache.crop(length)
        return total

    def string(self, max_tokens: int) -> list[str]:
        """Greedy text per row up to a closing quote or `max_tokens`; each string is then closed in the cache."""
        tokenizer = self.tokenizer
        quote = tokenizer('"', add_special_tokens=False).input_ids
        rows = len(self.generated)
        self.feed([quote] * rows)
        texts, done = [""] * rows, [max_tokens == 0] * rows
        for _ in range(max_tokens):
            chunks: list[list[int]] = []
            for row, token in enumerate(self.logprobs.argmax(-1).tolist()):
                piece = tokenizer.decode([token])
                if not done[row] and (token == tokenizer.eos_token_id or '"' in piece):
                    texts[row] += "" if token == tokenizer.eos_token_id else piece.split('"')[0]
                    done[row] = True
                if done[row]:
                    chunks.append([])
                    continue
                texts[row] += piece
                self.generated[row] += 1
                chunks.append([token])
            if all(done):
                break
            self.feed(chunks)
        self.feed([quote] * rows)
        return [text.strip() for text in texts]

