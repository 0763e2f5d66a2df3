"""HDPO rewards and advantages (Metis, arXiv 2604.08545), as the official Accio-Lab/Metis code computes them.

Every tensor here is shaped [prompts, G]: one row per prompt, one column per rollout of that prompt.

Standardisation uses the population standard deviation (divide by n, torch's `correction=0`): two qualifying
rollouts with different tool counts get +-1 (up to eps), where the unbiased std would give +-0.71.

Rewards are shifted by one of their group's own values before the mean is taken. The result is the same, but
a group of equal rewards then centres to exactly 0 rather than to the float32 rounding of its mean (16
copies of 0.9 do not average to 0.9), which divided by std + eps = 1e-6 would be an advantage of ~0.06.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def accuracy_rewards(correct: Tensor, format_ok: Tensor) -> Tensor:
    """r_acc = 0.9 * answer correct + 0.1 * format ok (both bool [P, G])."""
    return 0.9 * correct.float() + 0.1 * format_ok.float()


def tool_rewards(correct: Tensor, tool_calls: Tensor) -> Tensor:
    """r_tool = 1 / (T + 1) for a correct answer (format not required), else 0; T = tool calls made."""
    return torch.where(correct, 1.0 / (tool_calls.float() + 1.0), 0.0)


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: each reward standardised against all G rollouts of its prompt; 0 where all are equal."""
    shifted = rewards - rewards[..., :1]
    centred = shifted - shifted.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps)


def tool_advantages(r_tool: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO restricted to the qualifying (correct, r_tool > 0) rollouts of each prompt; 0 for all others.

    A prompt with fewer than two qualifying rollouts, or with equal tool counts among them, gets all zeros:
    the lone or equal rewards centre to exactly 0 (see the module docstring).
    """
    qualifying = r_tool > 0
    count = qualifying.sum(dim=-1, keepdim=True).clamp(min=1)  # clamped: rows with none divide 0 by 1
    # The row max is a qualifying reward whenever there is one, since the others are 0.
    shifted = (r_tool - r_tool.amax(dim=-1, keepdim=True)) * qualifying
    centred = (shifted - shifted.sum(dim=-1, keepdim=True) / count) * qualifying
    std = (centred.square().sum(dim=-1, keepdim=True) / count).sqrt()
    return centred / (std + eps)


def coupled_advantages(r_acc: Tensor, tool_calls: Tensor, alpha: float) -> Tensor:
    """The coupled baseline: one GRPO advantage of r_acc - alpha * T."""
    return grpo_advantages(r_acc - alpha * tool_calls.float())


def otc_tool_rewards(correct: Tensor, tool_calls: Tensor, c: float = 1.0) -> Tensor:
    """OTC-GRPO's tool-integrated coefficient r_tool (Wang et al., "Acting Less is Reasoning More", arXiv
    2504.14870, section 3.2), for m = a rollout's tool calls and n = the optimal count, estimated as the fewest
    calls among the correct rollouts of its group:

        f(m, n) = 0 if m = n = 0;  m if n = 0;  2nm / (m + n) otherwise
        r_tool  = 1 if f(m, n) = n = 0;  cos(m·pi / (2m + c)) if n = 0;  sin(f(m, n)·pi / (2n)) otherwise

    so a correct rollout at the optimum gets 1 and each call past it less. The paper leaves n open for a group
    with no correct rollout; here it is 0 there (OTC-PPO's cos form, which needs no estimate).
    """
    m = tool_calls.float()
    n = torch.where(correct, m, torch.inf).amin(dim=-1, keepdim=True)
    n = torch.where(n.isinf(), 0.0, n)
    f = 2 * n * m / (m + n).clamp(min=1e-9)  # the harmonic mean of m and n; only read where n > 0
    return torch.where(n == 0, torch.cos(m * math.pi / (2 * m + c)), torch.sin(f * math.pi / (2 * n.clamp(min=1))))


def otc_advantages(r_acc: Tensor, correct: Tensor, tool_calls: Tensor, c: float = 1.0) -> Tensor:
    """OTC-GRPO: one GRPO advantage of the tool-integrated reward alpha·r_tool·r_phi (2504.14870, eq. for
    r^tool_phi), with r_phi = r_acc. alpha scales every reward of a group alike, which GRPO's standardisation
    cancels, so it is left out."""
    return grpo_advantages(otc_tool_rewards(correct, tool_calls, c) * r_acc)


def tool_productivity(correct: Tensor, tool_calls: Tensor) -> float | None:
    """OTC's tool productivity: correct answers per tool call (None where no call was made)."""
    calls = int(tool_calls.sum())
    return int(correct.sum()) / calls if calls else None


def qualifying_ratio(r_tool: Tensor) -> float:
    """rho: the share of prompts with at least two correct rollouts, i.e. that can carry a tool signal."""
    return ((r_tool > 0).sum(dim=-1) >= 2).float().mean().item()
