"""Chats whose tool calls are written inline and whose observations come back as user turns.

Metis-ColdStart has this shape: an assistant turn writes its calls in its text (`<tool_call>` JSON
or `<code>` blocks); each following user turn answers one call. The reader turns those user turns
into canonical `tool` turns; the writer turns them back. (DeepEyesV2 and the other inline layouts
are declarative specs, read by `spec.py`.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.formats import MalformedRow
from curate.formats.common import ImageCounter, ordered_images
from curate.formats.inline import parse_calls, parts_to_text, render_call
from curate.formats.messages import parse_content
from curate.sample import ROLES, Image, Message, Part, Sample, TextPart, ToolCall


def parse_chat(turns: Any, images: list[Image], base_dir: Path, unwrap: Callable[[str], str]) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise MalformedRow("'messages' must be a non-empty list of turns")
    counter = ImageCounter(len(images))
    messages: list[Message] = []
    pending: list[ToolCall] = []  # calls of the last assistant turn not yet answered
    for index, turn in enumerate(turns):
        where = f"message {index}"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise MalformedRow(f"{where}: needs a known role")
        role, content = turn["role"], turn.get("content")
        if (role == "user" and pending) or role == "tool":
            if isinstance(content, str):
                content = unwrap(content)
            messages.append(Message("tool", parse_content(content, where, counter, images, base_dir)))
            pending = pending[1:]
            continue
        parts = parse_content(content, where, counter, images, base_dir)
        calls: list[ToolCall] = []
        if role == "assistant":
            parts, calls = _cut_calls(parts)
        messages.append(Message(role, parts, calls))
        pending = list(calls)
    counter.attach_unused(messages)
    return messages


def _cut_calls(parts: list[Part]) -> tuple[list[Part], list[ToolCall]]:
    prose: list[Part] = []
    calls: list[ToolCall] = []
    for part in parts:
        if isinstance(part, TextPart):
            text, found = parse_calls(part.text)
            calls.extend(found)
            if text:
                prose.append(TextPart(text))
        else:
            prose.append(part)
    return prose, calls


def render_text_turns(sample: Sample, code_blocks: bool,
                wrap: Callable[[ToolCall | None, str], str]) -> tuple[list[dict[str, str]], list[Image]]:
    """Turns as `{role, content}` text with `<image>` placeholders, and the images in that order.

    `wrap(call, text)` writes an observation the way the format does, given the call it answers.
    """
    images, sample = ordered_images(sample)
    turns: list[dict[str, str]] = []
    pending: list[ToolCall] = []
    for message in sample.messages:
        text = parts_to_text(message.content)
        if message.role == "tool":
            turns.append({"role": "user", "content": wrap(pending[0] if pending else None, text)})
            pending = pending[1:]
            continue
        if message.tool_calls:
            text += "".join(render_call(call, code_blocks) for call in message.tool_calls)
        turns.append({"role": message.role, "content": text})
        pending = list(message.tool_calls)
    return turns, images
