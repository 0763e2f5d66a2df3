"""DeepEyesV2 SFT files: LLaMA-Factory "sharegpt" `{messages: [{role, content}], images: [paths]}`.

Code calls are written inline as `<code>` + a fenced python block + `</code>` (often after
`<think>...</think>`), search calls as `<tool_call>{"name": "search", ...}</tool_call>`. Code results
come back in a user turn "Code execution result:\\nstdout:\\n```...```\\nstderr:\\n```...```" followed by
`<image>` placeholders; search results in `<tool_response>...</tool_response>`. The canonical tool turn
holds the plain stdout when stderr is empty (the layout is rebuilt on writing) and the text verbatim
otherwise. Files are JSON arrays (or JSONL); image paths are relative to the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curate.formats import Format, MalformedRow, decode_record, register_format
from curate.formats.chat import parse_chat, render_chat
from curate.formats.common import ImageFolder, decode_answer, decode_images, encode_answer, row_id, write_json_rows
from curate.formats.inline import (
    CODE_RESULT_PREFIX,
    render_code_result,
    render_tool_response,
    unwrap_code_result,
    unwrap_tool_response,
)
from curate.sample import Sample, ToolCall

_MARKS = ("<code>", CODE_RESULT_PREFIX)


@register_format
class DeepEyesFormat(Format):
    name = "deepeyes"
    description = "DeepEyesV2 LLaMA-Factory sharegpt JSON (<code> blocks, 'Code execution result' turns)"

    def sniff(self, record: Any) -> bool:
        messages = record.get("messages")
        if not isinstance(messages, list) or "tool_calls" in json.dumps(messages):
            return False
        return any(isinstance(m, dict) and any(mark in str(m.get("content")) for mark in _MARKS) for m in messages)

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        if "messages" not in row:
            raise MalformedRow("missing field 'messages'")
        images = decode_images(row.get("images"), base_dir)
        return Sample(
            id=row_id(row, row["messages"], [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=parse_chat(row["messages"], images, base_dir, _unwrap_observation),
            images=images,
            answer=decode_answer(row.get("answer")),
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        folder = ImageFolder(path)
        rows = []
        for sample in samples:
            turns, images = render_chat(sample, code_blocks=True, wrap=_wrap_observation)
            row: dict[str, Any] = {"id": sample.id, "messages": turns,
                                   "images": [folder.save(sample.id, k, im) for k, im in enumerate(images)]}
            if sample.answer is not None:
                row["answer"] = encode_answer(sample.answer)
            rows.append(row)
        return write_json_rows(rows, path)


def _unwrap_observation(text: str) -> str:
    return unwrap_code_result(unwrap_tool_response(text))


def _wrap_observation(call: ToolCall | None, text: str) -> str:
    if text.startswith(CODE_RESULT_PREFIX):
        return text
    if call is not None and call.name == "python":
        stdout, image_tail = _split_trailing_images(text)
        return render_code_result(stdout) + image_tail
    return render_tool_response(text)


def _split_trailing_images(text: str) -> tuple[str, str]:
    """DeepEyesV2 puts a code result's images after the stdout/stderr block."""
    stdout = text
    while stdout.endswith("<image>"):
        stdout = stdout[: -len("<image>")]
    return stdout, text[len(stdout):]
