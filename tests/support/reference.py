"""Per-sample reference implementations, written straight from the formulas in plain Python floats: what the
vectorised HDPO advantages are checked against (tests/test_train_advantages.py) and timed against
(benchmarks/bench_advantages.py). Their float64 arithmetic needs no special case for equal rewards: the mean of
equal float32 values is then exact, and so is the 0."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def standardise(values: list[float], eps: float) -> list[float]:
    """(v - mean) / (population std + eps) for each value."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + eps) for v in values]


def reference_grpo(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages, one prompt at a time."""
    return torch.tensor([standardise(group, eps) for group in rewards.tolist()])


def reference_tool(r_tool: Tensor, eps: float = 1e-6) -> Tensor:
    """Tool advantages, one prompt and rollout at a time: GRPO among the r_tool > 0 rollouts, 0 elsewhere."""
    advantages = []
    for group in r_tool.tolist():
        qualifying = [r for r in group if r > 0]
        if len(qualifying) < 2:
            advantages.append([0.0] * len(group))
            continue
        standardised = iter(standardise(qualifying, eps))
        advantages.append([next(standardised) if r > 0 else 0.0 for r in group])
    return torch.tensor(advantages)
