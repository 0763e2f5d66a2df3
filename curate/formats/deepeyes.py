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

from typing import Any

from curate.formats.inline import inline_tool_row, turns_mention
from curate.formats.spec import InlineSpec, ObservationSpec, SpecFormat

DEEPEYES_SPEC = InlineSpec(
    source="deepeyes",
    observation=ObservationSpec(role="user", tags=["tool_response", "sandbox_output"], code_result=True),
)


class DeepEyesFormat(SpecFormat):
    name = "deepeyes"
    description = "DeepEyesV2 LLaMA-Factory sharegpt JSON (<code> blocks, 'Code execution result' turns)"
    spec = DEEPEYES_SPEC
    suffixes = (".json", ".jsonl")

    def sniff(self, record: Any) -> bool:
        # Inline observations in assistant turns (V-Thinker) and <interpreter> turns (PyVision) are other layouts.
        return (inline_tool_row(record) and not turns_mention(record, "<interpreter>")
                and not turns_mention(record, "<sandbox_output>", role="assistant"))
