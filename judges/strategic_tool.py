"""strategic_tool_judge: keep trajectories whose tool use an LLM judge finds strategic (Metis's last SFT filter)."""

from __future__ import annotations

import json
from typing import ClassVar

from pydantic import BaseModel, Field

from curate.generation import Prompt
from curate.sample import ImagePart, Message, Part, Sample, TextPart
from curate.judges.stage import JudgeStage


class StrategicScores(BaseModel):
    visual_relevance: int = Field(ge=1, le=5, description="each tool call targets the relevant visual evidence")
    reasoning_coherence: int = Field(ge=1, le=5, description="the reasoning follows from the observations")
    tool_rationale: int = Field(ge=1, le=5, description="the answer was not reachable without the tool")
    justification: str = Field(description="at most two sentences")


class StrategicToolJudge(JudgeStage):
    """Scores visual relevance of the tool calls, coherence of the reasoning and the rationale for using a tool
    at all (1-5 each, rubric `strategic_tool_use`); keeps the trajectory when every score meets `min_scores`
    (default 3). Reasons: `not_strategic` (the detail gives the low scores and the justification),
    `judge_error`. Trajectories without tool calls are kept unjudged (`meta.strategic_tool_judge.judged: false`).
    """

    name = "strategic_tool_judge"
    default_rubric = "strategic_tool_use"
    Scores = StrategicScores
    dimension_reasons: ClassVar[dict[str, str]] = {
        "visual_relevance": "not_strategic", "reasoning_coherence": "not_strategic", "tool_rationale": "not_strategic"}
    reasons: ClassVar[dict[str, str]] = {
        "not_strategic": "a rubric score is under its `min_scores` threshold; the detail gives the scores and why",
        "judge_error": "the judge never delivered a valid verdict (after the retries), never a low score",
    }

    def render(self, sample: Sample) -> Prompt | None:
        if not sample.indexed_tool_calls:
            return None
        parts: list[Part] = []
        for message in sample.messages:
            if message.role != "system":
                parts += [TextPart(f"\n## {_heading(message)}\n")] + _content(message)
        if sample.has_answer:
            parts.append(TextPart(f"\n## Reference answer\n{sample.answer}"))
        return Prompt((Message("user", parts),), tuple(sample.images))


def _heading(message: Message) -> str:
    return {"user": "User", "assistant": "Agent", "tool": "Tool observation"}[message.role]


def _content(message: Message) -> list[Part]:
    """The turn's text and images in order, then its tool calls written out."""
    parts: list[Part] = [p if isinstance(p, ImagePart) else TextPart(p.text) for p in message.content]
    for call in message.tool_calls:
        body = f"```python\n{call.code}\n```" if call.code is not None else json.dumps(call.arguments, ensure_ascii=False)
        parts.append(TextPart(f"\n[tool call: {call.name}]\n{body}\n"))
    return parts
