"""One example row per format, written by the format itself (so it is exactly what it reads), for `curate formats`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import UserError
from curate.formats import get_format, records
from curate.formats.spec import SpecFormat
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall, text

EXAMPLE_QUESTION = "How many bars are taller than 5?"
_TRY_FILES = ("example.jsonl", "dataset_info.json", "example.parquet")  # the first the writer accepts
_SHOWN_CHARACTERS = 60
# A 1x1 PNG: small enough to show whole in a terminal.
_PIXEL = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
                       "9c63f8cfc000000301010018dd8db00000000049454e44ae426082")


@dataclass
class Example:
    path: Path
    row: Any  # the first raw row of the file


def format_example(name: str, folder: Path) -> Example:
    """Write a one-row example trajectory with format `name` into `folder` and read its raw row back."""
    fmt = get_format(name)
    sample = _example_sample(fmt)
    for filename in _TRY_FILES:
        path = folder / filename
        try:
            fmt.write([sample], path)
        except UserError:
            continue
        row = next(records(path))
        return Example(path, json.loads(row) if isinstance(row, str) else row)  # a JSONL line, decoded to show
    raise UserError(f"format {name!r} writes none of {', '.join(_TRY_FILES)}")


def _example_sample(fmt: Any) -> Sample:
    call = ToolCall("python", {"code": "print(sum(v > 5 for v in [3, 7, 9]))"})
    observation = "2\n"
    if isinstance(fmt, SpecFormat) and fmt.calls.render(call) is None:  # a layout with one fixed tool (Mini-o3's crop)
        syntax = fmt.calls.syntaxes[0]
        call, observation = ToolCall(syntax.tool, {"bbox_2d": [0, 0, 10, 10]}), "Zoomed in: <image>"
    images = [Image(_PIXEL, "png")] + ([Image(_PIXEL, "png")] if "<image>" in observation else [])
    shows_image = len(images) > 1
    tool_content = [TextPart(observation.removesuffix("<image>")), ImagePart(1)] if shows_image else text(observation)
    return Sample("example-1", "example", [
        Message("user", [ImagePart(0), TextPart(EXAMPLE_QUESTION)]),
        Message("assistant", text("<think>Count them.</think>"), [call]),
        Message("tool", tool_content),
        Message("assistant", text("<answer>2</answer>")),
    ], images, "2")


def shown(value: Any) -> str:
    """A row as one line of JSON, long strings (base64, JSON text) and bytes shortened."""
    return json.dumps(_shorten(value), ensure_ascii=False)


def _shorten(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > _SHOWN_CHARACTERS and " " not in value:
        return f"{value[:24]}...({len(value)} chars)"
    if isinstance(value, dict):
        return {key: _shorten(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shorten(item) for item in value]
    return value
