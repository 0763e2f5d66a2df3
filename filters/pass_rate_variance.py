"""pass_rate_variance: keep RL prompts the policy sometimes solves and sometimes does not."""

from __future__ import annotations

from pydantic import Field, model_validator

from curate.sample import Sample
from curate.stage import KEEP, Verdict, reject
from curate.stage.probe import ProbeOptions, ProbeStage, report


class PassRateVariance(ProbeStage):
    """Rolls the policy out G times per prompt and keeps it when its pass rate p lies between the bounds.

    Kept when `low < p < high` (defaults 0 and 1: at least one success and one failure, so the prompt carries
    a learning signal for GRPO); `low_inclusive` / `high_inclusive` admit p equal to a bound.
    Reasons: `too_hard` (p below, or at an exclusive, `low`), `too_easy` (p above, or at an exclusive, `high`),
    `no_ground_truth`. Every probed prompt gets `meta.pass_rate_variance` (answers, verdicts, p), and
    `pass_rate` in its verl `extra_info` (and `pass8`, as Metis-RL names it, when G = 8).
    """

    name = "pass_rate_variance"
    reasons = {
        "too_hard": "the pass rate over G rollouts is below `low` (or at it, unless `low_inclusive`)",
        "too_easy": "the pass rate over G rollouts is above `high` (or at it, unless `high_inclusive`)",
        "no_ground_truth": "the prompt has no answer to check rollouts against",
    }

    class Options(ProbeOptions):
        rollouts: int = Field(default=16, gt=0, description="G: rollouts per prompt")
        low: float = Field(default=0.0, ge=0, le=1, description="lowest pass rate kept")
        high: float = Field(default=1.0, ge=0, le=1, description="highest pass rate kept")
        low_inclusive: bool = Field(default=False, description="keep p == low")
        high_inclusive: bool = Field(default=False, description="keep p == high")

        @model_validator(mode="after")
        def _ordered(self) -> PassRateVariance.Options:
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is above high ({self.high})")
            return self

    def process(self, batch: list[Sample]) -> list[Verdict]:
        probed = [sample for sample in batch if sample.has_answer]
        rollouts = iter(self.answers(probed, self.options.rollouts))
        verdicts = []
        for sample in batch:
            if not sample.has_answer:
                verdicts.append(reject("no_ground_truth", "the prompt has no answer to check rollouts against"))
                continue
            verdicts.append(self._judge(sample, next(rollouts)))
        return verdicts

    def _judge(self, sample: Sample, completions: list[str]) -> Verdict:
        options = self.options
        measured = report(self.grade(completions, sample.answer))
        p = measured["pass_rate"]
        sample.meta[self.name] = {**measured, "rollouts": options.rollouts, "model": options.model}
        extra_info = sample.meta.setdefault("verl", {}).setdefault("extra_info", {})
        extra_info["pass_rate"] = p
        if options.rollouts == 8:
            extra_info["pass8"] = p
        share = f"p = {p:g} ({sum(measured['correct'])}/{options.rollouts} correct)"
        if p < options.low or (p == options.low and not options.low_inclusive):
            return reject("too_hard", f"{share}; kept from {options.low:g}")
        if p > options.high or (p == options.high and not options.high_inclusive):
            return reject("too_easy", f"{share}; kept up to {options.high:g}")
        return KEEP
