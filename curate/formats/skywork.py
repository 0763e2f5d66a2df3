"""Skywork-R1V4 results: `{image, question, response: {full_response: "..."}}` (JSONL).

Verified (SkyworkAI/Skywork-R1V `r1v4/test_cases.jsonl`, `r1v4/parse_utils.py`): inputs are
`{image: "<path>" or "", question}`; the trajectory is one string of rounds
`<think>...</think><tool_call>{"name": "code", "arguments": {"code": ...}}</tool_call>
<observation>{"result": ..., "type": "code"}</observation>` ending in `<answer>...</answer>`. The
`code` tool becomes the canonical `python` call (and back); other tools (search, ...) keep their
name and are listed, not run, by the sandbox stages. An observation `{"result", "type"}` becomes
its result text; any other observation is kept verbatim.
"""

from __future__ import annotations

from typing import Any

from curate.formats.spec import InlineSpec, ObservationSpec, SpecFormat


class SkyworkR1V4Format(SpecFormat):
    name = "skywork_r1v4"
    description = "Skywork-R1V4 rows (one full_response: <tool_call> 'code' calls, <observation> JSON)"
    spec = InlineSpec(
        source="skywork_r1v4",
        layout="response",
        response="response.full_response",
        images=["image", "images"],
        answer_tag="answer",
        calls=[{"tag": "tool_call", "body": "json"}],
        tool_names={"code": "python"},
        observation=ObservationSpec(role="assistant", tags=["observation"], json_key="result"),
    )

    def sniff(self, record: Any) -> bool:
        response = record.get("response")
        return isinstance(response, dict) and isinstance(response.get("full_response"), str) and "question" in record
