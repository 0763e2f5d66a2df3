"""Thyme rows: `{image: [...], question: "<image>\\n...", response: "<think>...<code>...</code><sandbox_output>...</sandbox_output>...<answer>...</answer>"}`.

The whole trajectory is one response string: code in `<code>` + fenced python, each result inline in
`<sandbox_output>` (text, or `<image>` for an image the code saved). The reader cuts the response into
assistant / tool / assistant turns (calls get ids `call_<k>`, linked from the tool turns); the first
images belong to the question's placeholders, later ones to the sandbox outputs in order. `answer`
comes from `solution`/`answer` when the row has that field (even null), else from the last `<answer>...</answer>` (the tag
stays in the text too). Questions may embed `User Image Path: "..."`; the text is kept as is (the
sandbox stages map that path to the preloaded image). Image entries are paths relative to the file,
base64, or bytes; `images` is accepted for `image`.

Written back as JSONL/JSON (images as files in `<stem>_images/`) or parquet (image bytes); a system
turn and turns after a second user turn have no place in this layout and are not written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.formats import Format, MalformedRow, check_suffix, decode_record, register_format
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
    link_calls,
    parse_calls,
    parts_to_text,
    render_call,
    render_sandbox_output,
    split_sandbox_outputs,
    text_to_parts,
)
from curate.sample import Image, Message, Sample

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("image", pa.list_(pa.binary())),
        ("question", pa.string()),
        ("response", pa.string()),
        ("answer", pa.string()),
    ]
)


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
        images = decode_images([raw_images] if isinstance(raw_images, (str, bytes)) else raw_images, base_dir, "image")
        counter = ImageCounter(len(images))
        messages = [Message("user", text_to_parts(question, counter))]
        for text, output in split_sandbox_outputs(response):
            prose, calls = parse_calls(text)
            if prose or calls:
                messages.append(Message("assistant", text_to_parts(prose, counter), calls))
            if output is not None:
                messages.append(Message("tool", text_to_parts(output, counter)))
        counter.attach_unused(messages)
        if "solution" in row or "answer" in row:
            answer = row.get("solution", row.get("answer"))
        else:
            found = _ANSWER.findall(response)
            answer = found[-1].strip() if found else None
        return Sample(
            id=row_id(row, question, response, [im.data for im in images]),
            source=str(row.get("source") or self.name),
            messages=link_calls(messages),
            images=images,
            answer=decode_answer(answer),
        )

    def write(self, samples: Iterable[Sample], path: Path) -> int:
        check_suffix(path, self.name, (".jsonl", ".json", ".parquet"))
        if path.suffix.lower() == ".parquet":
            rows = [to_row(sample, lambda k, im: im.data) for sample in samples]
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
            return len(rows)
        folder = ImageFolder(path)
        return write_json_rows([to_row(s, lambda k, im, s=s: folder.save(s.id, k, im)) for s in samples], path)


def to_row(sample: Sample, store: Callable[[int, Image], str | bytes]) -> dict[str, Any]:
    """The Thyme row of a sample; `store(k, image)` gives the `image` entry (a path or the bytes)."""
    images, sample = ordered_images(sample)
    first_user = next((k for k, m in enumerate(sample.messages) if m.role == "user"), len(sample.messages))
    question = parts_to_text(sample.messages[first_user].content) if first_user < len(sample.messages) else ""
    response = ""
    for message in sample.messages[first_user + 1 :]:
        if message.role == "user":
            break
        if message.role == "assistant":
            response += parts_to_text(message.content) + "".join(render_call(c, True) for c in message.tool_calls)
        elif message.role == "tool":
            response += render_sandbox_output(parts_to_text(message.content))
    return {"id": sample.id, "source": sample.source, "image": [store(k, im) for k, im in enumerate(images)],
            "question": question, "response": response, "answer": encode_answer(sample.answer)}

