"""V-Thinker / V-Interaction rows: ms-swift chat `{messages: [{role, content}], images: [...]}`.

Verified (We-Math/V-Thinker `data/prompt.txt`): code goes in `<code>` around a fenced python block,
its result comes back in `<sandbox_output>...</sandbox_output>` (text, or the processed image), the
answer in `<think>...</think><answer>...</answer>`. No row is public, so the place of the results is
read from the prompt's convention, as Thyme writes it: inline in the assistant text, which the reader
cuts into assistant / tool / assistant turns. A result sent back as its own user turn reads too.
"""

from __future__ import annotations

from typing import Any

from curate.formats.inline import turns_mention
from curate.formats.spec import InlineSpec, ObservationSpec, SpecFormat


class VThinkerFormat(SpecFormat):
    name = "vthinker"
    description = "V-Thinker / V-Interaction chat rows (<code> blocks, <sandbox_output> inline in the assistant text)"
    spec = InlineSpec(
        source="vthinker",
        calls=[{"tag": "code", "body": "python"}],
        observation=ObservationSpec(role="assistant", tags=["sandbox_output"]),
        answer_tag="answer",
    )

    def sniff(self, record: Any) -> bool:
        return turns_mention(record, "<sandbox_output>", role="assistant")
