"""HDPO policy loss: a PPO clipped surrogate per advantage channel, mixed with fixed weights.

logprobs, old_logprobs and mask are [rows, tokens]: per-token log-probabilities of the sampled tokens under
the current and the rollout policy, and which tokens belong to the response. Advantages are one per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Beyond a log-ratio of +-20 a token is either clipped (no gradient) or has a ratio below 2e-9 (a negligible
# one), so clamping there costs nothing, and it keeps exp from overflowing: an inf ratio gives a NaN gradient
# even where the clip discards it (0 * inf).
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class HDPOLoss:
    """The weighted total (to backpropagate) and its parts (to log)."""

    total: Tensor
    acc: Tensor
    tool: Tensor
    clip_frac_acc: float
    clip_frac_tool: float


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps: float = 0.2,
    dual_clip: float = 3.0,
    total: Callable[[Tensor], Tensor] = lambda count: count,
) -> tuple[Tensor, float]:
    """PPO clipped surrogate with dual clip, averaged over the masked tokens.

    Returns the loss (0, not NaN, for an empty mask) and the clip fraction: the share of masked tokens whose
    loss a clip decided (the ratio's gradient cut off), by the trust region or by the dual clip c * |A|,
    which bounds the loss of negative-advantage tokens whose ratio ran far above 1.

    `total` turns this batch's token count into the whole batch's: on one of several ranks (the sum over the
    ranks), the loss and clip fraction are then this rank's share of the whole batch's, which sum to them.
    """
    mask = mask.bool()
    ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    adv = advantages.to(ratio.dtype).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps)
    trust_region = torch.maximum(unclipped, clipped)
    bound = -dual_clip * adv
    capped = (adv < 0) & (trust_region > bound)
    loss = torch.where(capped, bound, trust_region)
    tokens = total(mask.sum()).clamp(min=1)  # clamped: an empty mask gives 0 / 1, not 0 / 0
    token_mean = torch.where(mask, loss, 0.0).sum() / tokens
    clip_fraction = (((clipped > unclipped) | capped) & mask).sum().item() / tokens.item()
    return token_mean, clip_fraction


def hdpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    adv_acc: Tensor,
    adv_tool: Tensor,
    w_acc: float = 1.0,
    w_tool: float = 0.15,
    eps: float = 0.2,
    dual_clip: float = 3.0,
    total: Callable[[Tensor], Tensor] = lambda count: count,
) -> HDPOLoss:
    """w_acc * L_clip(A_acc) + w_tool * L_clip(A_tool).

    The tool term averages over the tokens of rows with a tool signal only, so the many rows with
    A_tool = 0 (wrong answers, prompts without two correct rollouts) do not dilute it.
    """
    acc, clip_frac_acc = clipped_surrogate(logprobs, old_logprobs, adv_acc, mask, eps, dual_clip, total)
    tool_mask = mask.bool() & (adv_tool != 0).unsqueeze(-1)
    tool, clip_frac_tool = clipped_surrogate(logprobs, old_logprobs, adv_tool, tool_mask, eps, dual_clip, total)
    return HDPOLoss(w_acc * acc + w_tool * tool, acc, tool, clip_frac_acc, clip_frac_tool)
