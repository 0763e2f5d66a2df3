"""Policy loss: a PPO clipped surrogate per trained term (advantage channel), mixed with fixed weights; HDPO's is
both terms, `acc` and `tool`.

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


# The tokens each loss term's mean is over, from the response mask and the term's advantages.
TERM_TOKENS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "acc": lambda mask, advantages: mask.bool(),
    "tool": lambda mask, advantages: tool_channel(mask, advantages),
}


@dataclass(frozen=True)
class PolicyLoss:
    """The weighted total (to backpropagate) and, per trained term, its loss and clip fraction (to log)."""

    total: Tensor
    terms: dict[str, Tensor]
    clip_fractions: dict[str, float]


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
    tokens: Tensor | None = None,
) -> tuple[Tensor, float]:
    """PPO clipped surrogate with dual clip, averaged over the masked tokens.

    Returns the loss (0, not NaN, for an empty mask) and the clip fraction: the share of masked tokens whose
    loss a clip decided (the ratio's gradient cut off), by the trust region or by the dual clip c * |A|,
    which bounds the loss of negative-advantage tokens whose ratio ran far above 1.

    `total` turns this batch's token count into the whole batch's: on one of several ranks (the sum over the
    ranks), the loss and clip fraction are then this rank's share of the whole batch's, which sum to them.
    `tokens`, when given, is the whole batch's count itself: for a micro-batch, whose shares of the loss and clip
    fraction then sum, over the micro-batches, to the whole batch's.
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
    # clamped: an empty mask gives 0 / 1, not 0 / 0
    tokens = (total(mask.sum()) if tokens is None else tokens).clamp(min=1)
    token_mean = torch.where(mask, loss, 0.0).sum() / tokens
    clip_fraction = (((clipped > unclipped) | capped) & mask).sum().item() / tokens.item()
    return token_mean, clip_fraction


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    advantages: dict[str, Tensor],
    weights: dict[str, float],
    eps: float = 0.2,
    dual_clip: float = 3.0,
    total: Callable[[Tensor], Tensor] = lambda count: count,
    tokens: dict[str, Tensor] | None = None,
) -> PolicyLoss:
    """The sum over the terms of `advantages` (term -> one advantage per row) of weight · L_clip(A_term), each
    averaged over its own tokens (`TERM_TOKENS`); only these terms are computed. `tokens`: the whole batch's token
    count per term (`term_tokens`), when these rows are one of its micro-batches."""
    losses: dict[str, Tensor] = {}
    clip_fractions: dict[str, float] = {}
    for term, adv in advantages.items():
        losses[term], clip_fractions[term] = clipped_surrogate(
            logprobs, old_logprobs, adv, TERM_TOKENS[term](mask, adv), eps, dual_clip, total,
            None if tokens is None else tokens[term])
    weighted = [weights[term] * loss for term, loss in losses.items()]
    return PolicyLoss(sum(weighted[1:], weighted[0]), losses, clip_fractions)


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
    tokens: tuple[Tensor, Tensor] | None = None,
) -> HDPOLoss:
    """w_acc * L_clip(A_acc) + w_tool * L_clip(A_tool).

    The tool term averages over the tokens of rows with a tool signal only, so the many rows with
    A_tool = 0 (wrong answers, prompts without two correct rollouts) do not dilute it. `tokens`: the whole
    batch's token counts of both channels, when these rows are one of its micro-batches.
    """
    loss = policy_loss(logprobs, old_logprobs, mask, {"acc": adv_acc, "tool": adv_tool}, {"acc": w_acc, "tool": w_tool},
                       eps, dual_clip, total, None if tokens is None else dict(zip(("acc", "tool"), tokens)))
    return HDPOLoss(loss.total, loss.terms["acc"], loss.terms["tool"], loss.clip_fractions["acc"],
                    loss.clip_fractions["tool"])


def tool_channel(mask: Tensor, adv_tool: Tensor) -> Tensor:
    """The tokens the tool term averages over: those of rows with a tool signal."""
    return mask.bool() & (adv_tool != 0).unsqueeze(-1)


def term_tokens(mask: Tensor, advantages: dict[str, Tensor],
                total: Callable[[Tensor], Tensor] = lambda count: count) -> dict[str, Tensor]:
    """The token count each term's mean divides by, turned into the whole batch's by `total` (the sum over the
    ranks)."""
    # One collective for all the terms.
    counts = total(torch.stack([TERM_TOKENS[term](mask, adv).sum() for term, adv in advantages.items()]))
    return dict(zip(advantages, counts))
