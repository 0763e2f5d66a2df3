"""TRL's `SFTTrainer` layout: the SFT shard with every image inline in the content part that shows it.

Why another layout: TRL fills `{type: image}` parts from the row's `images` column in every turn but `tool`
turns (`trl.data_utils.prepare_multimodal_messages`, TRL 1.16), and stops when the counts differ, so a
trajectory whose tool result shows an image (a python call's displayed crop) cannot be trained from the SFT
shard. A part that already holds its image is left as it is, and transformers' processors take images from the
parts of every turn. So here each image part holds its image (`{type: image, image: {bytes, path}}`), and
`images` is an empty list on every row: TRL tells a vision dataset by that column, and counts it against the
parts it has to fill, which are none.

The file's schema metadata gives `datasets` the image features, so `load_dataset("parquet", ...)` hands TRL
PIL images. Everything else is the SFT shard's (`messages.py`): OpenAI `tool_calls` with JSON-text arguments,
`tool` turns with `tool_call_id`, `answer` and `meta` as JSON text. The `messages` reader reads these rows
(an image part's own `image` is one of its inputs), so this format is written, or read with `--format trl`;
the sniffer leaves the rows to `messages`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.formats import check_suffix
from curate.formats.common import ordered_images, write_parquet_rows
from curate.formats.messages import SFT_SCHEMA, MessagesFormat, to_row
from curate.sample import Sample, TextPart

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", _IMAGE)])
_MESSAGE = SFT_SCHEMA.field("messages").type.value_type


def _string() -> dict[str, str]:
    return {"dtype": "string", "_type": "Value"}


# `datasets` features in the list-literal notation every release reads (a one-element list is a list feature);
# they must describe the Arrow types exactly, or `datasets` ignores them.
_FEATURES = {
    "messages": [{
        "role": _string(),
        "content": [{"type": _string(), "text": _string(), "image": {"_type": "Image"}}],
        "tool_calls": [{"id": _string(), "type": _string(), "function": {"name": _string(), "arguments": _string()}}],
        "tool_call_id": _string(),
    }],
    "images": [{"_type": "Image"}],
}
TRL_SCHEMA = pa.schema(
    [
        SFT_SCHEMA.field("id"),
        SFT_SCHEMA.field("source"),
        ("messages", pa.list_(pa.struct([
            _MESSAGE.field("role"), ("content", pa.list_(_PART)), _MESSAGE.field("tool_calls"),
            _MESSAGE.field("tool_call_id")]))),
        ("images", pa.list_(_IMAGE)),
        SFT_SCHEMA.field("answer"),
        SFT_SCHEMA.field("meta"),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": _FEATURES}})},
)


class TrlFormat(MessagesFormat):
    name = "trl"
    description = "TRL SFTTrainer parquet: the SFT shard with each image inline in its content part"

    def sniff(self, record: Any) -> bool:
        return False  # its rows are `messages` rows, read by that reader

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".parquet",))
        return write_parquet_rows((to_trl_row(sample) for sample in samples), TRL_SCHEMA, path)


def to_trl_row(sample: Sample) -> dict[str, Any]:
    images, sample = ordered_images(sample)  # every image shown by a part, in order of appearance
    row = to_row(sample, inline_images=False)
    for message, written in zip(sample.messages, row["messages"], strict=True):
        written["content"] = [
            {"type": "text", "text": part.text, "image": None} if isinstance(part, TextPart)
            else {"type": "image", "text": None, "image": {"bytes": images[part.index].data, "path": None}}
            for part in message.content
        ]
    row["images"] = []
    return row

