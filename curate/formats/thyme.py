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

from typing import Any

from curate.formats.inline import turns_mention
from curate.formats.spec import InlineSpec, ObservationSpec, SpecFormat


class ThymeFormat(SpecFormat):
    name = "thyme"
    description = "Thyme SFT rows (question + one response with inline <code> and <sandbox_output>)"
    spec = InlineSpec(
        source="thyme",
        layout="response",
        images=["image", "images"],
        answer=["solution", "answer"],
        answer_tag="answer",
        observation=ObservationSpec(role="assistant", tags=["sandbox_output"]),
    )

    def sniff(self, record: Any) -> bool:
        # PyVision results carry a question and a response too, beside their <interpreter> chat.
        return isinstance(record.get("response"), str) and "question" in record and not turns_mention(record, "<interpreter>")
