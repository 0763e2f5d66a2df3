"""HDPO advantages and loss (`curate.train`) against a per-sample reference and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from curate_testkit.reference import reference_grpo, reference_tool

from curate.train.advantages import (
    accuracy_rewards,
    coupled_advantages,
    grpo_advantages,
    otc_advantages,
    otc_tool_rewards,
    qualifying_ratio,
    tool_advantages,
    tool_productivity,
    tool_rewards,
)
from curate.train.loss import clipped_surrogate, hdpo_loss

G = 16


def random_groups(seed: int, prompts: int = 64, rollouts: int = G) -> tuple[torch.Tensor, ...]:
    """(correct, format_ok, tool_calls) whose groups cover 0, 1, 2, some and all correct rollouts, and groups
    whose correct rollouts all made the same number of tool calls."""
    generator = torch.Generator().manual_seed(seed)
    solved = torch.arange(prompts) % (rollouts + 1)  # every count of correct rollouts 0..G
    order = torch.rand(prompts, rollouts, generator=generator).argsort(dim=-1)
    correct = order < solved.unsqueeze(-1)
    format_ok = torch.rand(prompts, rollouts, generator=generator) < 0.8
    tool_calls = torch.randint(0, 8, (prompts, rollouts), generator=generator)
    same_calls = torch.rand(prompts, 1, generator=generator) < 0.25
    tool_calls = torch.where(same_calls, tool_calls[:, :1], tool_calls)
    return correct, format_ok, tool_calls


SEEDS = range(20)


@pytest.mark.parametrize("seed", SEEDS)
def test_tool_advantages_match_reference(seed: int) -> None:
    correct, _, tool_calls = random_groups(seed)
    r_tool = tool_rewards(correct, tool_calls)
    torch.testing.assert_close(tool_advantages(r_tool), reference_tool(r_tool), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_advantages_match_reference(seed: int) -> None:
    correct, format_ok, _ = random_groups(seed)
    r_acc = accuracy_rewards(correct, format_ok)
    torch.testing.assert_close(grpo_advantages(r_acc), reference_grpo(r_acc), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.1])
def test_coupled_advantages_match_reference(alpha: float) -> None:
    correct, format_ok, tool_calls = random_groups(seed=7)
    r_acc = accuracy_rewards(correct, format_ok)
    expected = reference_grpo(r_acc - alpha * tool_calls)
    torch.testing.assert_close(coupled_advantages(r_acc, tool_calls, alpha), expected, atol=1e-5, rtol=0)


def reference_otc(m: int, n: int, c: float) -> float:
    """OTC-GRPO's r_tool for one rollout, written out as the paper's cases (arXiv 2504.14870)."""
    f = 0 if m == n == 0 else m if n == 0 else 2 * n * m / (m + n)
    if f == n == 0:
        return 1.0
    if n == 0:
        return math.cos(m * math.pi / (2 * m + c))
    return math.sin(f * math.pi / (2 * n))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [1.0, 3.0])
def test_otc_tool_rewards_match_the_papers_cases(seed: int, c: float) -> None:
    correct, _, tool_calls = random_groups(seed)
    expected = []
    for row_correct, row_calls in zip(correct.tolist(), tool_calls.tolist(), strict=True):
        solved = [m for m, ok in zip(row_calls, row_correct, strict=True) if ok]
        n = min(solved) if solved else 0  # a group with no correct rollout: n = 0
        expected.append([reference_otc(m, n, c) for m in row_calls])
    torch.testing.assert_close(otc_tool_rewards(correct, tool_calls, c), torch.tensor(expected), atol=1e-6, rtol=0)


def test_otc_rewards_by_hand() -> None:
    correct = torch.tensor([[True, True, True, False], [True, True, False, False]])
    tool_calls = torch.tensor([[1, 2, 3, 0], [0, 1, 2, 0]])
    # Row 0: n = 1; m = 2 gives f = 4/3, sin(2pi/3); m = 3 gives f = 3/2, sin(3pi/4); a wrong m = 0 gives sin(0).
    # Row 1: n = 0; m = 0 gives 1, m = 1 gives cos(pi/3), m = 2 gives cos(2pi/5) (c = 1).
    expected = torch.tensor([[1.0, math.sin(2 * math.pi / 3), math.sin(3 * math.pi / 4), 0.0],
                             [1.0, 0.5, math.cos(2 * math.pi / 5), 1.0]])
    torch.testing.assert_close(otc_tool_rewards(correct, tool_calls), expected, atol=1e-6, rtol=0)
    # The advantage ranks correct rollouts by their calls; wrong ones (r_acc 0 here) come last.
    advantages = otc_advantages(accuracy_rewards(correct, torch.zeros_like(correct)), correct, tool_calls)
    assert advantages[0, 0] > advantages[0, 1] > advantages[0, 2] > advantages[0, 3]


def test_tool_productivity() -> None:
    correct = torch.tensor([[True, True, False, True]])
    assert tool_productivity(correct, torch.tensor([[1, 2, 3, 0]])) == 0.5  # 3 correct over 6 calls
    assert tool_productivity(correct, torch.zeros(1, 4, dtype=torch.long)) is None


def test_rewards() -> None:
    correct = torch.tensor([[True, True, False, False]])
    format_ok = torch.tensor([[True, False, True, False]])
    tool_calls = torch.tensor([[0, 3, 1, 0]])
    torch.testing.assert_close(accuracy_rewards(correct, format_ok), torch.tensor([[1.0, 0.9, 0.1, 0.0]]))
    torch.testing.assert_close(tool_rewards(correct, tool_calls), torch.tensor([[1.0, 0.25, 0.0, 0.0]]))


def test_only_correct_rollouts_of_groups_with_two_correct_get_tool_advantages() -> None:
    for seed in SEEDS:
        correct, _, tool_calls = random_groups(seed)
        advantages = tool_advantages(tool_rewards(correct, tool_calls))
        assert not advantages[~correct].any()
        assert not advantages[correct.sum(dim=-1) < 2].any()


def test_tool_advantages_by_hand() -> None:
    correct = torch.tensor([[True, True, False, True], [True, False, False, False], [True, True, True, False]])
    tool_calls = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [2, 2, 2, 0]])
    # Row 0: r_tool 1, 1/2, 1/2 among the correct: mean 2/3, population std sqrt(2)/6.
    first = [(1 - 2 / 3) / (2**0.5 / 6), (0.5 - 2 / 3) / (2**0.5 / 6), 0.0, (0.5 - 2 / 3) / (2**0.5 / 6)]
    expected = torch.tensor([first, [0.0] * 4, [0.0] * 4])  # one correct; equal tool counts
    torch.testing.assert_close(tool_advantages(tool_rewards(correct, tool_calls)), expected, atol=1e-5, rtol=0)


def test_equal_rewards_give_exact_zeros() -> None:
    # 16 copies of 0.9 do not average to 0.9 in float32; the advantages must still be exactly 0.
    rewards = torch.full((3, G), 0.9)
    assert not grpo_advantages(rewards).any()
    assert not tool_advantages(rewards).any()


def test_qualifying_ratio() -> None:
    r_tool = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.5, 0.25]])
    assert qualifying_ratio(r_tool) == 0.5


def random_policy(seed: int, rows: int = 8, tokens: int = 12) -> tuple[torch.Tensor, ...]:
    """(logprobs requiring grad, old_logprobs, mask with ragged lengths): ratios spread around 1."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, tokens, generator=generator) * 3
    logprobs = (old + torch.randn(rows, tokens, generator=generator) * 0.4).requires_grad_()
    lengths = torch.randint(1, tokens + 1, (rows, 1), generator=generator)
    return logprobs, old, torch.arange(tokens) < lengths


def test_hdpo_gradient_is_the_weighted_sum_of_both_channels() -> None:
    logprobs, old, mask = random_policy(seed=0)
    adv_acc = torch.randn(8)
    adv_tool = torch.tensor([1.2, 0.0, -0.7, 0.0, 0.0, 0.3, 0.0, -0.8])
    (total_grad,) = torch.autograd.grad(hdpo_loss(logprobs, old, mask, adv_acc, adv_tool, 1.0, 0.15).total, logprobs)
    acc, _ = clipped_surrogate(logprobs, old, adv_acc, mask)
    tool, _ = clipped_surrogate(logprobs, old, adv_tool, mask & (adv_tool != 0).unsqueeze(-1))
    (acc_grad,) = torch.autograd.grad(acc, logprobs)
    (tool_grad,) = torch.autograd.grad(tool, logprobs)
    torch.testing.assert_close(total_grad, 1.0 * acc_grad + 0.15 * tool_grad)
    assert not total_grad[~mask].any()
    assert total_grad[mask].abs().sum() > 0


def test_tool_loss_averages_over_rows_with_a_tool_signal_only() -> None:
    old = torch.zeros(2, 4)
    logprobs = torch.full((2, 4), 0.1)  # ratio e^0.1, inside the trust region
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    loss = hdpo_loss(logprobs, old, mask, torch.zeros(2), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(loss.tool, -2.0 * torch.exp(torch.tensor(0.1)))  # over row 0's 2 tokens, not 6


def test_empty_tool_mask_gives_zero_tool_loss() -> None:
    logprobs, old, mask = random_policy(seed=1)
    loss = hdpo_loss(logprobs, old, mask, torch.randn(8), torch.zeros(8))
    assert loss.tool.item() == 0.0 and loss.clip_frac_tool == 0.0
    assert torch.isfinite(loss.total)
    loss.total.backward()
    assert torch.isfinite(logprobs.grad).all()


def test_dual_clip_bounds_negative_advantage_loss() -> None:
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[8.0, 50.0]], requires_grad=True)  # ratio e^8, and one that would overflow
    loss, clip_fraction = clipped_surrogate(logprobs, old, torch.tensor([-1.5]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(3.0 * 1.5)
    assert clip_fraction == 1.0
    loss.backward()
    assert not logprobs.grad.any()  # a constant bound, and no NaN from the overflowing ratio


def test_clip_fraction_by_hand() -> None:
    ratios = torch.tensor([[1.0, 1.5, 0.5, 1.1], [1.5, 0.5, 4.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    advantages = torch.tensor([1.0, -1.0])
    # A > 0: 1.5 is clipped (above 1 + eps), 0.5 is not (the unclipped loss is the larger).
    # A < 0: 0.5 is clipped (below 1 - eps), 1.5 is not, 4.0 hits the dual clip; the masked token is not counted.
    _, clip_fraction = clipped_surrogate(ratios.log(), torch.zeros(2, 4), advantages, mask)
    assert clip_fraction == pytest.approx(3 / 7)
