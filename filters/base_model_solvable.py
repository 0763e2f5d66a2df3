"""base_model_solvable: drop trajectories whose question the base model answers without tools."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from curate.sample import Sample
from curate.stage import KEEP, Verdict, reject
from curate.stage.probe import ProbeOptions, ProbeStage, ground_truth, report
from curate.verify import Verification

# Metis drops samples with "pass@8 = 1 without tools"; the sentence reads two ways, and users of both exist.
Criterion = Literal["all_correct", "at_least", "pass_rate"]


class BaseModelSolvable(ProbeStage):
    """Asks the base model each question k times without tools; a solvable question did not need the tools.

    `criterion` says what solvable means: `all_correct` (the default: all k answers correct, pass@k = 1 read
    as "every time"), `at_least` (at least `min_correct` of the k; `min_correct: 1` is the unbiased pass@k
    estimator's reading, "solved at least once in k") or `pass_rate` (a fraction of at least `min_pass_rate`).
    The reading chosen is recorded in the run's manifest, under this stage.

    Reasons: `solvable` (the detail lists the answers), `no_ground_truth` (neither an answer nor a final answer
    in the trajectory to check against). `meta.base_model_solvable` holds every answer, its verdict and rule,
    and the pass rate, for kept and rejected samples alike. With `early_exit` (only under `all_correct`), a
    question gets one answer first and the other k-1 only if that one is correct: the same decision for a
    fraction of the generation when most questions are hard (the meta then holds fewer answers).
    """

    name = "base_model_solvable"
    reasons = {
        "solvable": "all k answers correct without tools (pass@k = 1); the detail lists them",
        "no_ground_truth": "neither an answer nor a final answer in the trajectory to check against",
    }

    class Options(ProbeOptions):
        k: int = Field(default=8, gt=0, description="answers per question (Metis: pass@8)")
        criterion: Criterion = Field(
            default="all_correct",
            description="solvable when: all_correct (all k), at_least (min_correct of k), pass_rate (min_pass_rate)")
        min_correct: int | None = Field(default=None, gt=0, description="m, for criterion at_least")
        min_pass_rate: float | None = Field(default=None, gt=0, le=1, description="for criterion pass_rate")
        early_exit: bool = Field(default=False, description="stop asking a question after its first wrong answer"
                                                            " (criterion all_correct only)")

        @model_validator(mode="after")
        def _one_reading(self) -> BaseModelSolvable.Options:
            wanted = {"all_correct": None, "at_least": "min_correct", "pass_rate": "min_pass_rate"}[self.criterion]
            for name in ("min_correct", "min_pass_rate"):
                given = getattr(self, name) is not None
                if name == wanted and not given:
                    raise ValueError(f"criterion {self.criterion} needs {name}")
                if name != wanted and given:
                    raise ValueError(f"{name} applies to criterion "
                                     f"{'at_least' if name == 'min_correct' else 'pass_rate'}, not {self.criterion}")
            if self.min_correct is not None and self.min_correct > self.k:
                raise ValueError(f"min_correct ({self.min_correct}) is above k ({self.k})")
            if self.early_exit and self.criterion != "all_correct":
                raise ValueError("early_exit decides after the first wrong answer, so it needs criterion all_correct")
            return self

    def needed(self) -> int:
        """How many of the k answers must be correct for the question to count as solvable."""
        options = self.options
        if options.criterion == "at_least":
            return options.min_correct  # type: ignore[return-value]
        if options.criterion == "pass_rate":
            return next(m for m in range(1, options.k + 1) if m / options.k >= options.min_pass_rate)
        return options.k

    def reading(self) -> str:
        """The criterion in words, as the manifest and the rejection details state it."""
        options = self.options
        if options.criterion == "all_correct":
            return f"all {options.k} of {options.k} answers correct (pass@{options.k} = 1 read as every time)"
        if options.criterion == "at_least":
            return f"at least {options.min_correct} of {options.k} answers correct"
        return f"a pass rate of at least {options.min_pass_rate} over {options.k} answers"

    def settings(self) -> dict[str, Any]:
        options = self.options
        return {"criterion": options.criterion, "k": options.k, "min_correct": options.min_correct,
                "min_pass_rate": options.min_pass_rate, "needed": self.needed(), "reading": self.reading()}

    def process(self, batch: list[Sample]) -> list[Verdict]:
        truths = [ground_truth(sample) for sample in batch]
        asked = [index for index, truth in enumerate(truths) if truth is not None]
        graded = self._ask([batch[i] for i in asked], [truths[i] for i in asked])
        verdicts: list[Verdict] = []
        for index, sample in enumerate(batch):
            if truths[index] is None:
                verdicts.append(reject("no_ground_truth", "no answer and no final answer to check the model against"))
                continue
            verifications = graded[asked.index(index)]
            sample.meta[self.name] = {**report(verifications), "k": self.options.k, "model": self.options.model,
                                      "criterion": self.options.criterion}
            verdicts.append(self._verdict(verifications, truths[index]))
        return verdicts

    def _verdict(self, verifications: list[Verification], truth: Any) -> Verdict:
        k = self.options.k
        correct = sum(v.correct for v in verifications)
        if len(verifications) < k or correct < self.needed():  # early exit asked fewer: a wrong answer came first
            return KEEP
        answers = ", ".join(repr(v.prediction) for v in verifications)
        if self.options.criterion == "all_correct":
            return reject("solvable", f"pass@{k} = 1 without tools: {answers} all match {truth!r}")
        return reject("solvable", f"{correct} of {k} correct without tools ({self.reading()}): {answers};"
                                  f" the answer is {truth!r}")

    def _ask(self, samples: list[Sample], truths: list) -> list[list]:
        k = self.options.k
        if not self.options.early_exit or k == 1:
            return [self.grade(answers, truth) for answers, truth in zip(self.answers(samples, k), truths, strict=True)]
        graded = [self.grade(answers, truth) for answers, truth in zip(self.answers(samples, 1), truths, strict=True)]
        survivors = [index for index, verifications in enumerate(graded) if verifications[0].correct]
        more = self.answers([samples[i] for i in survivors], k - 1, seed_offset=1)
        for index, answers in zip(survivors, more, strict=True):
            graded[index] += self.grade(answers, truths[index])
        return graded
