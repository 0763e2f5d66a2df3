"""DeepEyesV2 SFT files: LLaMA-Factory "sharegpt" `{messages: [{role, content}], images: [paths]}`.

Verified (Visual-Agent/DeepEyesV2 `cold_start/data/dataset_info.json`): `sft_part_{0-4}.json`, sharegpt
formatting with `messages`/`images` columns and only system/user/assistant roles, so observations come
back as user turns. Code calls are written inline as `<code>` + a fenced python block + `</code>` (often
after `<think>...</think>`), search calls as `<tool_call>{"name": "search"|"image_search", ...}</tool_call>`.
Code results come back in a user turn "Code execution result:\\nstdout:\\n```...```\\nstderr:\\n```...```"
followed by `<image>` placeholders; search results in `<tool_response>...</tool_response>`. The
repository's evaluation loop writes the code result with blank lines and a trailing "Images:" line;
whether the SFT files do too could not be checked, so both read alike.

Canonical tool turns are linked to their call (`call_<k>` ids) and hold the plain stdout and images
when stderr is empty (the block is rebuilt on writing), the text verbatim otherwise. Files are JSON
arrays (or JSONL); image paths are relative to the file. The writer puts images in
`<stem>_images/` next to the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curate.formats import Format, MalformedRow, check_suffix, decode_record, register_format
from curate.formats.chat import parse_chat, render_chat
from curate.formats.common import ImageFolder, decode_answer, decode_images, encode_answer, row_id, write_json_rows
from curate.formats.inline import (
    CODE_RESULT_PREFIX,
    IMAGE_TOKEN,
    inline_tool_row,
    link_calls,
    render_code_result,
    render_tool_response,
    unwrap_observation,
)
from curate.sample import Sample, ToolCall


@register_format
class DeepEyesFormat(Format):
    name = "deepeyes"
    description = "DeepEyesV2 LLaMA-Factory sharegpt JSON (<code> blocks, 'Code execution result' turns)"

    def sniff(self, record: Any) -> bool:
        return inline_tool_row(record)

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        if "messages" not in row:
            raise MalformedRow("missing field 'messages'")
        images = decode_images(row.get("images"), base_dir)
        return Sample(
            id=row_id(row, row["messages"], [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=link_calls(parse_chat(row["messages"], images, base_dir, unwrap_observation)),
            images=images,
            answer=decode_answer(row.get("answer")),
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".json", ".jsonl"))
        folder = ImageFolder(path)
        rows = []
        for sample in samples:
            turns, images = render_chat(sample, code_blocks=True, wrap=_wrap_observation)
            row: dict[str, Any] = {"id": sample.id, "source": sample.source, "messages": turns,
                                   "images": [folder.save(sample.id, k, im) for k, im in enumerate(images)]}
            if sample.answer is not None:
                row["answer"] = encode_answer(sample.answer)
            rows.append(row)
        return write_json_rows(rows, path)


def _wrap_observation(call: ToolCall | None, text: str) -> str:
    if text.startswith(CODE_RESULT_PREFIX):  # kept verbatim on reading (stderr or prose after the block)
        return text
    if call is not None and call.name == "python":
        stdout, images = _split_trailing_images(text)
        return render_code_result(stdout) + images
    return render_tool_response(text)


def _split_trailing_images(text: str) -> tuple[str, str]:
    """DeepEyesV2 puts a code result's images after the stdout/stderr block."""
    stdout = text
    while stdout.endswith(IMAGE_TOKEN):
        stdout = stdout[: -len(IMAGE_TOKEN)]
    return stdout, text[len(stdout):]
