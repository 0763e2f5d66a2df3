"""It learns: on the toy tool suite of `curate_testkit.toy`, HDPO drops the tool calls that prompts do not need
while the prompts that need the tool keep it, and accuracy holds, on CPU (two cores) in a few minutes.

The run goes through the trainer's own entry points (`curate_testkit.toy_runs`): a base model (direct answers
where it knows them, tool use everywhere), a brief always-tool cold start, then HDPO with Metis's w_tool 0.15.
Rates are measured on rollouts sampled at temperature 1 (the policy as trained), 4 for each of the prompts
of every second number (192 prompts, 48 per kind).

Why the margins hold on any x86 CPU: float kernels differ between CPUs, so a run on another machine is, in
effect, a run with another seed. The thresholds below were checked against the spread over seeds measured
here (README, "It learns"); every accuracy comparison allows only its own sampling noise (3 standard errors
of the difference, computed from the per-prompt accuracies of that very run), never a tuned constant.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, pvariance

from curate_testkit.toy import NUMBERS, toy_prompts
from curate_testkit.toy_runs import bucket, pretrain, rates, sample_rollouts, tune

from curate.train.rollout import Rollout
from curate.verify import AnswerVerifier

SEED = 0
SAMPLES_PER_PROMPT = 4
NEEDED = ("hash", "chain", "lookup-new")


def per_prompt_accuracy(rollouts: list[Rollout]) -> dict[str, list[float]]:
    """Each prompt's accuracy over its rollouts, per bucket: the independent units for a standard error."""
    verify = AnswerVerifier()
    by_prompt: dict[str, list[bool]] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt.id, []).append(verify(r.final_text, r.prompt.answer).correct)
    found: dict[str, list[float]] = {}
    for r in rollouts[::SAMPLES_PER_PROMPT]:
        found.setdefault(bucket(r.prompt), []).append(mean(by_prompt[r.prompt.id]))
    return found


def noise(before: list[float], after: list[float]) -> float:
    """Three standard errors of the difference of two mean accuracies over prompts."""
    return 3 * math.sqrt(pvariance(before) / len(before) + pvariance(after) / len(after))


def test_hdpo_drops_the_tool_calls_prompts_do_not_need_and_keeps_accuracy(tmp_path: Path) -> None:
    prompts = toy_prompts(numbers=NUMBERS[::2])
    cold = pretrain(tmp_path, SEED)
    before_rollouts = sample_rollouts(cold, prompts, SAMPLES_PER_PROMPT, SEED)
    tuned = tune(cold, tmp_path / "hdpo", SEED)
    after_rollouts = sample_rollouts(tuned, prompts, SAMPLES_PER_PROMPT, SEED)
    before, after = rates(before_rollouts), rates(after_rollouts)
    seen = f"before HDPO {before}, after {after}"
    assert before["copy"].tool_calls >= 0.75, seen  # the cold start made the policy call the tool needlessly
    assert after["copy"].tool_calls <= before["copy"].tool_calls - 0.5, seen
    for kind in NEEDED:
        assert after[kind].tool_calls >= 0.9, seen  # and it still calls it where it is needed
    assert after["chain"].mean_calls >= 1.8, seen  # both calls of the chained lookup
    accuracy_before, accuracy_after = per_prompt_accuracy(before_rollouts), per_prompt_accuracy(after_rollouts)
    for name in before:
        floor = before[name].accuracy - noise(accuracy_before[name], accuracy_after[name])
        assert after[name].accuracy >= floor, f"{name}: accuracy {after[name].accuracy} < {floor}; {seen}"
