"""ambiguity_judge: drop RL prompts without one unambiguous answer, or whose ground truth is not that answer."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from curate.generation import Prompt
from curate.sample import Message, Part, Sample, TextPart
from curate.judges.stage import JudgeStage


class AmbiguityScores(BaseModel):
    clarity: int = Field(ge=1, le=5, description="exactly one answer follows from the image(s) and text")
    answer_consistency: int = Field(ge=1, le=5, description="the ground truth is that answer")
    justification: str = Field(description="at most two sentences")


class AmbiguityJudge(JudgeStage):
    """Asks whether the question has a single unambiguous answer from its image(s) and text, and whether the
    ground truth is it (1-5 each, rubric `ambiguity`). Reasons: `ambiguous` (clarity below its threshold),
    `inconsistent_ground_truth` (answer_consistency below its threshold), `judge_error`."""

    name = "ambiguity_judge"
    default_rubric = "ambiguity"
    Scores = AmbiguityScores
    dimension_reasons: ClassVar[dict[str, str]] = {
        "clarity": "ambiguous", "answer_consistency": "inconsistent_ground_truth"}
    reasons: ClassVar[dict[str, str]] = {
        "ambiguous": "`clarity` under its threshold: the image and text admit more than one answer",
        "inconsistent_ground_truth": "`answer_consistency` under its threshold: the ground truth is not that answer",
        "judge_error": "the judge never delivered a valid verdict (after the retries), never a low score",
    }

    def render(self, sample: Sample) -> Prompt:
        parts: list[Part] = [TextPart("## Question\n")]
        for message in sample.messages:
            if message.role == "user":
                parts += message.content
        truth = sample.answer if sample.has_answer else "(none given)"
        parts.append(TextPart(f"\n## Ground truth\n{truth}"))
        return Prompt((Message("user", parts),), tuple(sample.images))
