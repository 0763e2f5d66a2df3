"""What a step's groups give the policy to learn from, by group type: where the tool-efficiency signal of each
algorithm lives, and where it does not.

A group is one prompt's G rollouts. By correctness it is all-correct, mixed or all-wrong, and the algorithms differ
most in what each type gets:
- in an all-correct group the coupled reward `r_acc - alpha·T` standardises to `-(T - mean T) / std T`: alpha cancels;
- in a mixed group its tool part is about `-alpha·(T - mean T) / std(r_acc)`: it scales with alpha, while HDPO's
  tool channel is standardised among the correct rollouts alone and keeps its strength;
- in an all-wrong group the coupled reward still ranks by T (towards fewer calls on prompts the policy cannot yet
  solve); HDPO's tool channel gives those rollouts nothing.

`tool_signal` measures that per term: the advantage a rollout gets for calling the tool less than its peers of the
same correctness in its group (the correct ones; all of them in an all-wrong group). Positive: the term rewards
fewer calls; 0: it says nothing about the tool count; negative: it rewards more calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_TYPES = ("all_correct", "mixed", "all_wrong")
ZERO = 1e-6  # an advantage this close to 0 is none: equal rewards standardise to 0 up to float rounding


def group_types(correct: Tensor) -> Tensor:
    """[prompts] index into GROUP_TYPES of each group of `correct` [prompts, G]."""
    right = correct.sum(-1)
    return torch.where(right == correct.shape[-1], 0, torch.where(right == 0, 2, 1))


def tool_signal(advantages: Tensor, correct: Tensor, tool_calls: Tensor) -> tuple[Tensor, Tensor]:
    """Per group [prompts]: the sum over its peers (its correct rollouts, or all of them when none is correct) of
    `(A - mean A) · sign(mean T - T)` over the peers, and the number of peers. Rollouts with the peers' mean call
    count add 0."""
    peers = torch.where(correct.any(-1, keepdim=True), correct, torch.ones_like(correct)).float()
    count = peers.sum(-1, keepdim=True)
    calls = tool_calls.float()
    mean_advantage = (advantages * peers).sum(-1, keepdim=True) / count
    mean_calls = (calls * peers).sum(-1, keepdim=True) / count
    fewer = torch.sign(mean_calls - calls)
    return ((advantages - mean_advantage) * fewer * peers).sum(-1), count.squeeze(-1)


def group_signals(scores: dict[str, Tensor], trained: dict[str, Tensor]) -> dict[str, float | None]:
    """Per step: the share of each group type (`groups/<type>`); the share of rollouts the accuracy term gives no
    advantage (`zero_adv_acc`), as all-correct and all-wrong groups do under GRPO; and, per trained term and group
    type, the mean `tool_signal` per peer rollout (`tool_signal_<term>/<type>`; None in a step without that type)."""
    types = group_types(scores["correct"])
    metrics: dict[str, float | None] = {f"groups/{name}": float((types == index).float().mean())
                                        for index, name in enumerate(GROUP_TYPES)}
    if "acc" in trained:
        metrics["zero_adv_acc"] = float((trained["acc"].abs() < ZERO).float().mean())
    for term, advantages in trained.items():
        signal, peers = tool_signal(advantages.float(), scores["correct"], scores["tool_calls"])
        for index, name in enumerate(GROUP_TYPES):
            chosen = types == index
            value = float(signal[chosen].sum() / peers[chosen].sum()) if chosen.any() else None
            # float rounding of equal advantages is no signal
            metrics[f"tool_signal_{term}/{name}"] = 0.0 if value is not None and abs(value) < ZERO else value
    return metrics
