"""Thyme rows: `{image: [...], question: "<image>\\n...", response: "<think>...<code>...</code><sandbox_output>...</sandbox_output>...<answer>...</answer>"}`.

The whole trajectory is one response string: code in `<code>` + fenced python, each result inline in
`<sandbox_output>` (text, or `<image>` for an image the code saved). The reader cuts the response into
assistant / tool / assistant turns; the first images belong to the question's placeholders, later
ones to the sandbox outputs in order. `answer` comes from `solution`/`answer` when the row has one,
else from the last `<answer>...</answer>`. Questions may embed `User Image Path: "..."`; the text is
kept as is. Image entries are paths relative to the file, base64, or bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curate.formats import Format, MalformedRow, decode_record, register_format
from curate.formats.common import (
    ImageCounter,
    ImageFolder,
    decode_answer,
    decode_images,
    encode_answer,
    ordered_images,
    row_id,
    write_json_rows,
)
from curate.formats.inline import (
    parse_calls,
    parts_to_text,
    render_call,
    render_sandbox_output,
    split_sandbox_outputs,
    text_to_parts,
)
from curate.sample import Message, Sample

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


@register_format
class ThymeFormat(Format):
    name = "thyme"
    description = "Thyme SFT rows (question + one response with inline <code> and <sandbox_output>)"

    def sniff(self, record: Any) -> bool:
        return isinstance(record.get("response"), str) and "question" in record

    def parse(self, record: Any, base_dir: Path) -> Sample:
        row = decode_record(record)
        question, response = row.get("question"), row.get("response")
        if not isinstance(question, str) or not isinstance(response, str):
            raise MalformedRow("needs string fields 'question' and 'response'")
        raw_images = row.get("image", row.get("images"))
        images = decode_images([raw_images] if isinstance(raw_images, str) else raw_images, base_dir, "image")
        counter = ImageCounter(len(images))
        messages = [Message("user", text_to_parts(question, counter))]
        for text, output in split_sandbox_outputs(response):
            prose, calls = parse_calls(text)
            if prose or calls:
                messages.append(Message("assistant", text_to_parts(prose, counter), calls))
            if output is not None:
                messages.append(Message("tool", text_to_parts(output, counter)))
        counter.attach_unused(messages)
        answer = row.get("solution", row.get("answer"))
        if answer is None:
            found = _ANSWER.findall(response)
            answer = found[-1].strip() if found else None
        return Sample(
            id=row_id(row, question, response, [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=messages,
            images=images,
            answer=decode_answer(answer),
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        folder = ImageFolder(path)
        rows = []
        for sample in samples:
            images, sample = ordered_images(sample)
            question = next((parts_to_text(m.content) for m in sample.messages if m.role == "user"), "")
            response = ""
            for message in sample.messages[1:]:
                if message.role == "assistant":
                    response += parts_to_text(message.content) + "".join(render_call(c, True) for c in message.tool_calls)
                elif message.role == "tool":
                    response += render_sandbox_output(parts_to_text(message.content))
            row: dict[str, Any] = {"id": sample.id, "image": [folder.save(sample.id, k, im) for k, im in enumerate(images)],
                                   "question": question, "response": response}
            if sample.answer is not None:
                row["answer"] = encode_answer(sample.answer)
            rows.append(row)
        return write_json_rows(rows, path)

