"""Bounded judge prompts: a trajectory of a million characters and fifteen images is cut to fit a budget.

What the judge needs most is kept whole as long as it fits: the question (the first user turn), the final
answer (the last assistant turn) and every tool call with the reasoning just before it (the end of the
assistant text of the turn that makes the call). What lies between goes first: tool observations lose
their middle, then earlier reasoning loses its beginning, then the question and the answer lose their
middle, and only then the tool calls' code. Each cut leaves a marker saying how much was cut, and the
cuts are returned for `meta`, so a reader of the run sees what the judge did not.

Sizes are estimated as the cost estimate and the rate limiter do: ~4 characters a token, 258 tokens an
image (Gemini's count for a small image); the bound is on that estimate, so it needs no tokenizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from curate.sample import ImagePart, Message, Sample, TextPart

CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 258
MESSAGE_OVERHEAD = 32  # characters a renderer adds per turn (a heading, newlines)
IMAGE_MARKER = "[image left out]"


def marker(chars: int) -> str:
    return f"\n[... {chars:,} characters cut ...]\n"


@dataclass(frozen=True)
class PromptBounds:
    max_prompt_tokens: int | None = None  # estimated input tokens of one request, rubric included
    max_images: int | None = None


@dataclass
class _Piece:
    """A text the bound may shorten: read, write back, and which end to keep."""

    length: int
    get: Callable[[], str]
    set: Callable[[str], None]
    keep: str  # "both" ends (the middle goes) or the "tail" (the beginning goes)


def bound_sample(sample: Sample, bounds: PromptBounds, reserved_chars: int = 0) -> tuple[Sample, dict[str, Any] | None]:
    """The sample cut to `bounds` (a copy; the input is untouched) and what was cut, or the sample itself
    and None when it fits. `reserved_chars`: what every request adds besides the sample (the rubric)."""
    shown = _shown_images(sample)
    over_images = shown[bounds.max_images:] if bounds.max_images is not None else []
    budget = _text_budget(bounds, reserved_chars, len(shown) - len(over_images))
    if not over_images and (budget is None or _text_size(sample) <= budget):
        return sample, None
    bounded = copy.deepcopy(sample)
    cut: dict[str, Any] = {}
    if over_images:
        _drop_images(bounded, set(over_images))
        cut["images_left_out"] = len(over_images)
    if budget is not None:
        chars, pieces = _cut_text(bounded, budget)
        if chars:
            cut.update(chars_cut=chars, texts_cut=pieces)
    return bounded, cut or None


def _shown_images(sample: Sample) -> list[tuple[int, int]]:
    """(message, part) of every image shown, the question's first: they are what the question is about."""
    shown = [(m, p) for m, message in enumerate(sample.messages) for p, part in enumerate(message.content)
             if type(part) is ImagePart]
    if len(shown) < 2:
        return shown
    question = _first_user(sample)
    return sorted(shown, key=lambda at: at[0] != question)


def _drop_images(sample: Sample, dropped: set[tuple[int, int]]) -> None:
    for m, message in enumerate(sample.messages):
        message.content = [TextPart(IMAGE_MARKER) if (m, p) in dropped else part for p, part in enumerate(message.content)]


def _text_budget(bounds: PromptBounds, reserved_chars: int, images: int) -> int | None:
    """Characters of text that fit once the `images` kept are paid for."""
    if bounds.max_prompt_tokens is None:
        return None
    return max(0, (bounds.max_prompt_tokens - IMAGE_TOKENS * images) * CHARS_PER_TOKEN - reserved_chars)


def _text_size(sample: Sample) -> int:
    answer = sample.answer if isinstance(sample.answer, str) else str(sample.answer or "")
    size = len(answer)
    for message in sample.messages:
        size += MESSAGE_OVERHEAD + sum(len(part.text) for part in message.content if type(part) is TextPart)
        size += sum(len(call.name) + sum(len(str(value)) for value in call.arguments.values()) for call in message.tool_calls)
    return size


def _first_user(sample: Sample) -> int | None:
    return next((i for i, m in enumerate(sample.messages) if m.role == "user"), None)


def _last_assistant(sample: Sample) -> int | None:
    return next((i for i in reversed(range(len(sample.messages))) if sample.messages[i].role == "assistant"), None)


def _tiers(sample: Sample) -> list[list[_Piece]]:
    """The texts that may be cut, in the order they go: observations, earlier reasoning, question and final
    answer, tool-call code."""
    keep_whole = {_first_user(sample), _last_assistant(sample)}
    observations, reasoning, ends, code = [], [], [], []
    for index, message in enumerate(sample.messages):
        for part in message.content:
            if not isinstance(part, TextPart) or not part.text:
                continue
            piece = _text_piece(part, "tail" if message.role == "assistant" and index not in keep_whole else "both")
            if index in keep_whole:
                ends.append(piece)
            elif message.role == "assistant":
                reasoning.append(piece)
            else:
                observations.append(piece)
        code += [_code_piece(message, c) for c, call in enumerate(message.tool_calls) if call.code]
    return [observations, reasoning, ends, code]


def _text_piece(part: TextPart, keep: str) -> _Piece:
    def write(text: str) -> None:
        part.text = text
    return _Piece(len(part.text), lambda: part.text, write, keep)


def _code_piece(message: Message, index: int) -> _Piece:
    call = message.tool_calls[index]

    def write(text: str) -> None:
        call.arguments = {**call.arguments, "code": text}
    return _Piece(len(call.code or ""), lambda: call.code or "", write, "both")


def _cut_text(sample: Sample, budget: int) -> tuple[int, int]:
    """Shorten the tiers in order until the text fits `budget`; (characters cut, texts cut)."""
    chars = pieces = 0
    for tier in _tiers(sample):
        excess = _text_size(sample) - budget
        if excess <= 0:
            break
        room = max(0, sum(p.length for p in tier) - excess)
        cap = _cap(tier, room)
        for piece in tier:
            if piece.length > cap:
                chars += piece.length - cap
                pieces += 1
                piece.set(_shorten(piece.get(), cap, piece.keep))
    return chars, pieces


def _cap(tier: list[_Piece], room: int) -> int:
    """The largest length every text of the tier may keep so that the tier, markers included, fits `room`."""
    def size(cap: int) -> int:
        return sum(p.length if p.length <= cap else cap + len(marker(p.length - cap)) for p in tier)
    low, high = 0, max((p.length for p in tier), default=0)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if size(middle) <= room else (low, middle - 1)
    return low


def _shorten(text: str, keep: int, ends: str) -> str:
    cut = marker(len(text) - keep)
    if ends == "tail":
        return cut + text[len(text) - keep:] if keep else cut
    head = keep // 2
    return text[:head] + cut + text[len(text) - (keep - head):]
