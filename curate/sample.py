"""The canonical trajectory every reader produces and every writer consumes.

A `Sample` is one trajectory: chat turns (system / user / assistant / tool) where
assistant turns carry explicit `ToolCall`s and tool turns carry the recorded
observation. Images live once, as bytes, in `Sample.images`; messages refer to
them by position through `ImagePart`s so a tool observation can show an image
produced by code just like a user turn shows the input image.

Rows (`to_row` / `from_row`) are the flat, parquet-friendly form used for the
rejected shards and for moving samples between processes: nested structures
whose shape varies per dataset (messages, meta, answer) are JSON strings, so
one Arrow schema fits every source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass
class Image:
    """Encoded image bytes plus their container format (png, jpeg, ...)."""

    data: bytes
    format: str = "png"


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    """A reference to `Sample.images[index]`."""

    index: int


Part = TextPart | ImagePart


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    @property
    def code(self) -> str | None:
        """The code of a python call, None for other tools."""
        code = self.arguments.get("code")
        return code if isinstance(code, str) else None


@dataclass
class Message:
    role: Role
    content: list[Part] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def image_indices(self) -> list[int]:
        return [p.index for p in self.content if isinstance(p, ImagePart)]


@dataclass
class Sample:
    id: str
    source: str
    messages: list[Message] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    answer: str | list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # What only the run needs, handed from stage to stage with the sample (e.g. the sandbox's execution record,
    # printed text and all, that consistency reuses after execution_failure). No writer writes it: shards hold
    # the data and the stages' annotations in `meta`, never a run's working memory.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def question(self) -> str:
        """Text of the first user turn: what the trajectory sets out to answer."""
        for message in self.messages:
            if message.role == "user":
                return message.text
        return ""

    @property
    def has_answer(self) -> bool:
        """Whether the sample carries a reference answer (None, an empty string or an empty list carry none)."""
        return self.answer not in (None, "", [])

    @property
    def indexed_tool_calls(self) -> list[tuple[int, ToolCall]]:
        """Every tool call with the index of the message that makes it (each message's own are `tool_calls`)."""
        return [(i, call) for i, m in enumerate(self.messages) for call in m.tool_calls]

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "messages": json.dumps([message_to_dict(m) for m in self.messages], ensure_ascii=False),
            "images": [{"bytes": im.data, "format": im.format} for im in self.images],
            "answer": json.dumps(self.answer, ensure_ascii=False),
            "meta": json.dumps(self.meta, ensure_ascii=False, default=str),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sample:
        return cls(
            id=row["id"],
            source=row["source"],
            messages=[message_from_dict(m) for m in json.loads(row["messages"])],
            images=[Image(im["bytes"], im["format"]) for im in row["images"]],
            answer=json.loads(row["answer"]),
            meta=json.loads(row["meta"]),
        )


def text(value: str) -> list[Part]:
    """Content made of one text part (the common case)."""
    return [TextPart(value)] if value else []


def message_to_dict(message: Message) -> dict[str, Any]:
    return {
        "role": message.role,
        "content": [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image", "index": p.index}
            for p in message.content
        ],
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls],
        "tool_call_id": message.tool_call_id,
    }


def message_from_dict(data: dict[str, Any]) -> Message:
    return Message(
        role=data["role"],
        content=[TextPart(p["text"]) if p["type"] == "text" else ImagePart(p["index"]) for p in data["content"]],
        tool_calls=[ToolCall(c["name"], c["arguments"], c.get("id", "")) for c in data.get("tool_calls", [])],
        tool_call_id=data.get("tool_call_id", ""),
    )


def content_id(*parts: Any) -> str:
    """A stable id for sources that have none: a hash of the row's content."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


# Arrow schema of `Sample.to_row()`; rejected shards add stage, reason and detail.
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("messages", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("format", pa.string())]))),
        ("answer", pa.string()),
        ("meta", pa.string()),
    ]
)
