"""Metis-ColdStart SFT rows: `messages` is a JSON-serialised string, `images` a list of base64 strings.

Verified (dataset card and viewer of Accio-Lab/Metis-ColdStart): parquet, `messages` a JSON string of
the turn list, `images` 0-15 base64 strings. Not verifiable (no row is shown whole anywhere public), so
assumed from Metis's rollout format and read tolerantly: assistant turns write calls inline as
`<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>` (reasoning in `<reason>`, answer in
`<answer>`), and each observation comes back in the following user turn, its text wrapped in
`<tool_response>` (or a DeepEyes code-result block, or bare) and its images as `<image>` placeholders.
Rows that instead use OpenAI-style `tool_calls` and `tool` turns, part lists, or an already-decoded
`messages` list (JSONL) read too. Calls get ids `call_<k>`, linked from the tool turns.

Written back: the inline layout above (observations wrapped in `<tool_response>`), as parquet or JSONL,
with `id`, `source` and `answer` (JSON text) columns next to `messages` and `images`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.formats import Format, MalformedRow, check_suffix, decode_record, json_value
from curate.formats.chat import parse_chat, render_text_turns
from curate.formats.common import decode_answer, decode_images, encode_answer, encode_base64, row_id, write_json_rows
from curate.formats.inline import link_calls, render_tool_call_json, render_tool_response, unwrap_observation
from curate.formats.messages import parse_openai_calls
from curate.sample import Sample, ToolCall

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("messages", pa.string()),
        ("images", pa.list_(pa.string())),
        ("answer", pa.string()),
    ]
)


class MetisColdStartFormat(Format):
    name = "metis_coldstart"
    description = "Metis-ColdStart SFT parquet/JSONL (messages as JSON text, base64 images)"

    def sniff(self, record: Any) -> bool:
        return isinstance(record.get("messages"), str)

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        if "messages" not in row:
            raise MalformedRow("missing field 'messages'")
        turns = json_value(row["messages"], lambda exc: f"'messages' is not valid JSON ({exc.msg} at char {exc.pos})")
        images = decode_images(row.get("images"), base_dir)
        messages = parse_chat(_inline_openai_calls(turns), images, base_dir, unwrap_observation)
        return Sample(
            id=row_id(row, turns, [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=link_calls(messages),
            images=images,
            answer=decode_answer(row.get("answer")),
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".parquet", ".jsonl"))
        rows = list(_rows(samples))
        if path.suffix.lower() == ".jsonl":
            return write_json_rows(rows, path)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
        return len(rows)


def _rows(samples: Iterable[Sample]) -> Iterator[dict[str, Any]]:
    for sample in samples:
        turns, images = render_text_turns(sample, code_blocks=False, wrap=_wrap_observation)
        yield {
            "id": sample.id,
            "source": sample.source,
            "messages": json.dumps(turns, ensure_ascii=False),
            "images": [encode_base64(im) for im in images],
            "answer": encode_answer(sample.answer),
        }


def _inline_openai_calls(turns: Any) -> Any:
    """Turns with OpenAI-style `tool_calls` rewritten to the inline `<tool_call>` layout the chat reader takes."""
    if not isinstance(turns, list):
        return turns  # the chat reader names the defect
    return [_inline_turn(turn, index) if isinstance(turn, dict) and "tool_calls" in turn else turn
            for index, turn in enumerate(turns)]


def _inline_turn(turn: dict[str, Any], index: int) -> dict[str, Any]:
    calls = "".join(render_tool_call_json(call) for call in parse_openai_calls(turn["tool_calls"], f"message {index}"))
    content = turn.get("content")
    if isinstance(content, list):
        content = [*content, {"type": "text", "text": calls}]
    elif content is None or isinstance(content, str):
        content = (content or "") + calls
    return {key: value for key, value in turn.items() if key != "tool_calls"} | {"content": content}


def _wrap_observation(call: ToolCall | None, text: str) -> str:
    return render_tool_response(text)
