"""A judge-based answer verifier: an LLM says CORRECT or INCORRECT, as Metis's reward does.

Plug it into `curate.verify.AnswerVerifier(judge=...)`: the rules decide what they can (numbers, letters,
lists, exact text) and only free text they cannot decide reaches the judge, through the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from curate.cache import Cache
from curate.generation import Prompt
from curate.sample import Message, TextPart
from curate.judges.backend import JudgeRequest
from curate.judges.runner import JudgeFailure
from curate.judges.stage import JudgeOptions, load_rubric, make_runner


class AnswerVerdict(BaseModel):
    verdict: Literal["CORRECT", "INCORRECT"]


class JudgeVerifier:
    """`(question, prediction, truth) -> bool`; a judge that fails to answer counts the answer as wrong."""

    def __init__(self, cache_path: Path, rubric: str = "answer_verifier", **options: Any) -> None:
        self.options = JudgeOptions(**options)
        self.rubric = load_rubric(rubric)
        self.cache = Cache(cache_path)
        self.runner = make_runner(self.options, self.cache, self.rubric)

    def __call__(self, question: str, prediction: str, truth: str) -> bool:
        text = f"## Question\n{question}\n## Reference answer\n{truth}\n## Candidate answer\n{prediction}"
        request = JudgeRequest(self.rubric.text, Prompt((Message("user", [TextPart(text)]),)), AnswerVerdict,
                               self.options.temperature, max_tokens=16)
        (outcome,) = self.runner.run([request])
        return not isinstance(outcome, JudgeFailure) and outcome.verdict == "CORRECT"

    def close(self) -> None:
        self.runner.close()
        self.cache.close()
