"""Generic HF / OpenAI `messages` rows (JSONL or parquet) — and the SFT shard layout.

Row: `{id?, source?, messages: [{role, content, tool_calls?, tool_call_id?}], images?, answer?, meta?}`.
`content` is a string (with `<image>` placeholders taking the row's images in order) or a list of parts
`{type: text, text}` / `{type: image}` (the next of the row's images, or its own `image` entry) /
`{type: image_url, image_url: {url}}`. `tool_calls` are OpenAI-style (`{id, type: function, function:
{name, arguments}}`, arguments a JSON string or object); tool turns are `{role: tool, tool_call_id,
content}`. `images` entries are paths relative to the input file, data URIs, base64, or `{bytes, path}`.
Rows whose tool use is written inline in the text (`<code>`, `<tool_call>`, ...) are left to the
inline formats by the sniffer.

Written as parquet this is the SFT shard: one explicit Arrow schema for every row, images in order
of appearance as `{bytes, path}`, `answer` and `meta` as JSON text, so
`datasets.load_dataset("parquet", ...)` loads every shard alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.formats import Format, MalformedRow, check_suffix, decode_record, json_object
from curate.formats.common import (
    ImageCounter,
    data_uri,
    decode_answer,
    decode_image,
    decode_images,
    encode_answer,
    ordered_images,
    row_id,
    write_parquet_rows,
)
from curate.formats.inline import inline_tool_row, parse_arguments, text_to_parts
from curate.sample import ROLES, Image, ImagePart, Message, Part, Sample, TextPart, ToolCall

_CONTENT = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
_TOOL_CALLS = pa.list_(
    pa.struct(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
        ]
    )
)
SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        (
            "messages",
            pa.list_(
                pa.struct(
                    [("role", pa.string()), ("content", _CONTENT), ("tool_calls", _TOOL_CALLS), ("tool_call_id", pa.string())]
                )
            ),
        ),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("answer", pa.string()),
        ("meta", pa.string()),
    ]
)


class MessagesFormat(Format):
    name = "messages"
    description = "generic OpenAI/HF messages (JSONL or parquet); the SFT shard layout"

    def sniff(self, record: Any) -> bool:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return False
        return not inline_tool_row(record)  # inline tool syntax is the DeepEyes reader's job

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        raw_messages = row.get("messages")
        if raw_messages is None:
            raise MalformedRow("missing field 'messages'")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise MalformedRow(f"'messages' must be a non-empty list, got {type(raw_messages).__name__}")
        images = decode_images(row.get("images"), base_dir)
        counter = ImageCounter(len(images))
        messages = [parse_message(raw, index, counter, images, base_dir) for index, raw in enumerate(raw_messages)]
        counter.attach_unused(messages)
        meta = json_object(row.get("meta"), "meta")
        return Sample(
            id=row_id(row, raw_messages, [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=messages,
            images=images,
            answer=decode_answer(row.get("answer")),
            meta=meta,
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".jsonl", ".parquet"))
        if path.suffix.lower() == ".jsonl":  # streamed: a JSONL file of any size is written in constant memory
            count = 0
            with path.open("w", encoding="utf-8") as handle:
                for count, sample in enumerate(samples, start=1):
                    handle.write(json.dumps(to_row(sample, inline_images=True), ensure_ascii=False) + "\n")
            return count
        return write_parquet_rows((to_row(sample, inline_images=False) for sample in samples), SFT_SCHEMA, path)


def parse_message(raw: Any, index: int, counter: ImageCounter, images: list[Image], base_dir: Path) -> Message:
    where = f"message {index}"
    if not isinstance(raw, dict):
        raise MalformedRow(f"{where}: expected an object, got {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise MalformedRow(f"{where}: unknown role {role!r}")
    return Message(
        role=role,
        content=parse_content(raw.get("content"), where, counter, images, base_dir),
        tool_calls=parse_openai_calls(raw.get("tool_calls"), where),
        tool_call_id=str(raw.get("tool_call_id") or ""),
    )


def parse_content(content: Any, where: str, counter: ImageCounter, images: list[Image], base_dir: Path) -> list[Part]:
    """A turn's content: text with `<image>` placeholders, or a list of text / image / image_url parts.

    Images given inside a part (an `image` entry, an `image_url`) are appended to `images`.
    """
    if content is None:
        return []
    if isinstance(content, str):
        return text_to_parts(content, counter)
    if not isinstance(content, list):
        raise MalformedRow(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[Part] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                parts.append(TextPart(str(part["text"])))
        elif kind == "image" and part.get("image") is None:
            parts.append(ImagePart(counter()))
        elif kind in ("image", "image_url"):
            source = part.get(kind)
            url = source.get("url") if isinstance(source, dict) and kind == "image_url" else source
            images.append(decode_image(url, base_dir, f"{where} {kind}"))
            parts.append(ImagePart(len(images) - 1))
        else:
            raise MalformedRow(f"{where}: unknown content part {part!r:.60}")
    return parts


def parse_openai_calls(calls: Any, where: str) -> list[ToolCall]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise MalformedRow(f"{where}: 'tool_calls' must be a list, got {type(calls).__name__}")
    return [parse_openai_call(call, f"{where} tool call {k}") for k, call in enumerate(calls)]


def parse_openai_call(call: Any, where: str) -> ToolCall:
    """`{id, type: function, function: {name, arguments}}` (or the function object alone) as a call."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MalformedRow(f"{where}: needs a function with a string name")
    arguments = parse_arguments(function.get("arguments", {}), f"{where}:")
    return ToolCall(function["name"], arguments, str(call.get("id") or ""))


def to_row(sample: Sample, inline_images: bool) -> dict[str, Any]:
    images, sample = ordered_images(sample)
    return {
        "id": sample.id,
        "source": sample.source,
        "messages": [
            {
                "role": m.role,
                "content": [
                    {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image", "text": None}
                    for p in m.content
                ],
                "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                    for c in m.tool_calls
                ],
                "tool_call_id": m.tool_call_id,
            }
            for m in sample.messages
        ],
        "images": [data_uri(im) for im in images] if inline_images else [{"bytes": im.data, "path": None} for im in images],
        "answer": encode_answer(sample.answer),
        "meta": json.dumps(sample.meta, ensure_ascii=False, default=str),
    }
