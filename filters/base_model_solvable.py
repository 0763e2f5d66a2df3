"""base_model_solvable: drop trajectories whose question the base model answers without tools every time."""

from __future__ import annotations

from pydantic import Field

from curate.probe import ProbeOptions, ProbeStage, ground_truth, report
from curate.sample import Sample
from curate.stage import KEEP, Verdict, reject


class BaseModelSolvable(ProbeStage):
    """Asks the base model each question k times without tools; pass@k = 1 means the tools were not needed.

    Reasons: `solvable` (all k answers correct; the detail lists them), `no_ground_truth` (neither an answer
    nor a final answer in the trajectory to check against). `meta.base_model_solvable` holds every answer, its
    verdict and rule, and the pass rate, for kept and rejected samples alike. With `early_exit`, a question
    gets one answer first and the other k-1 only if that one is correct: the same decision for a fraction
    of the generation when most questions are hard (the meta then holds fewer answers).
    """

    name = "base_model_solvable"

    class Options(ProbeOptions):
        k: int = Field(default=8, gt=0, description="answers per question (Metis: pass@8)")
        early_exit: bool = Field(default=False, description="stop asking a question after its first wrong answer")

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
            sample.meta[self.name] = {**report(verifications), "k": self.options.k, "model": self.options.model}
            if len(verifications) == self.options.k and all(v.correct for v in verifications):
                answers = ", ".join(repr(v.prediction) for v in verifications)
                verdicts.append(reject("solvable", f"pass@{self.options.k} = 1 without tools: {answers} "
                                                   f"all match {truths[index]!r}"))
            else:
                verdicts.append(KEEP)
        return verdicts

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
