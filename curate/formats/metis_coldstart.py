"""Metis-ColdStart SFT rows: `messages` is a JSON-serialised string, `images` a list of base64 strings.

Assistant turns write calls inline as `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>`
(Metis's rollout format; reasoning in `<reason>`, answer in `<answer>`). Each observation comes back
in the following user turn, its text optionally wrapped in `<tool_response>` and its images as `<image>`
placeholders. The published card does not show a row in full, so the reader is tolerant: it also takes
OpenAI-style `tool_calls`, `tool` turns, part lists, and `messages` already decoded (JSONL).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.formats import Format, MalformedRow, decode_record, register_format
from curate.formats.chat import parse_chat, render_chat
from curate.formats.common import decode_answer, decode_images, encode_answer, encode_base64, row_id
from curate.formats.inline import render_tool_response, unwrap_tool_response
from curate.sample import Sample, ToolCall

SCHEMA = pa.schema(
    [("id", pa.string()), ("messages", pa.string()), ("images", pa.list_(pa.string())), ("answer", pa.string())]
)


@register_format
class MetisColdStartFormat(Format):
    name = "metis_coldstart"
    description = "Metis-ColdStart SFT parquet (messages as JSON text, base64 images)"

    def sniff(self, record: Any) -> bool:
        return isinstance(record.get("messages"), str)

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        if "messages" not in row:
            raise MalformedRow("missing field 'messages'")
        turns = row["messages"]
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError as exc:
                raise MalformedRow(f"'messages' is not valid JSON ({exc.msg} at char {exc.pos})") from exc
        images = decode_images(row.get("images"), base_dir)
        return Sample(
            id=row_id(row, turns, [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=parse_chat(turns, images, base_dir, unwrap_tool_response),
            images=images,
            answer=decode_answer(row.get("answer")),
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        rows = []
        for sample in samples:
            turns, images = render_chat(sample, code_blocks=False, wrap=_wrap_observation)
            rows.append(
                {
                    "id": sample.id,
                    "messages": json.dumps(turns, ensure_ascii=False),
                    "images": [encode_base64(im) for im in images],
                    "answer": encode_answer(sample.answer),
                }
            )
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
        return len(rows)


def _wrap_observation(call: ToolCall | None, text: str) -> str:
    return render_tool_response(text)
