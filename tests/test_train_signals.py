"""What each group type gives each algorithm's terms (`curate.train.signals`): the issue's reading of the dilemma,
checked on hand-made groups, and the log and plot that show it per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from curate.train.algorithms import ALGORITHMS
from curate.train.hdpo import HDPOConfig, advantages
from curate.train.plot import plot_metrics
from curate.train.signals import group_signals, group_types

# Three groups of G = 4: all correct, mixed, all wrong; the calls differ inside each.
CORRECT = torch.tensor([[True, True, True, True], [True, True, False, False], [False, False, False, False]])
CALLS = torch.tensor([[0, 1, 2, 3], [0, 2, 0, 2], [0, 1, 2, 3]])
SCORES = {"correct": CORRECT, "format": torch.ones_like(CORRECT), "tool_calls": CALLS}


def signals(algo: str, **settings: float) -> dict[str, float | None]:
    return group_signals(SCORES, advantages(SCORES, HDPOConfig(shards=[], model="", out=Path(), algo=algo, **settings)))


def test_group_types() -> None:
    assert group_types(CORRECT).tolist() == [0, 1, 2]
    assert group_types(torch.ones(1, 1, dtype=torch.bool)).tolist() == [0]


def test_the_coupled_penalty_cancels_in_all_correct_groups_and_scales_with_alpha_in_mixed_ones() -> None:
    small, large = signals("coupled", alpha=0.02), signals("coupled", alpha=0.5)
    assert small["tool_signal_acc/all_correct"] == pytest.approx(large["tool_signal_acc/all_correct"], rel=1e-4)
    assert small["tool_signal_acc/all_correct"] > 0.5  # standardised: full strength, whatever alpha
    assert 0 < small["tool_signal_acc/mixed"] < 0.1 < large["tool_signal_acc/mixed"]
    # It still ranks the wrong rollouts of an all-wrong group by their calls, at any alpha.
    assert small["tool_signal_acc/all_wrong"] > 0.5 and large["tool_signal_acc/all_wrong"] > 0.5


def test_hdpo_keeps_the_tool_signal_in_mixed_groups_and_gives_none_where_all_are_wrong() -> None:
    found = signals("hdpo")
    assert found["tool_signal_tool/all_correct"] > 0.5 and found["tool_signal_tool/mixed"] > 0.5
    assert found["tool_signal_tool/all_wrong"] == 0
    # The accuracy channel says nothing about calls among rollouts of equal correctness and format.
    assert all(abs(found[f"tool_signal_acc/{kind}"]) < 1e-5 for kind in ("all_correct", "mixed", "all_wrong"))
    assert found["groups/all_correct"] == found["groups/mixed"] == found["groups/all_wrong"] == pytest.approx(1 / 3)
    assert found["zero_adv_acc"] == pytest.approx(8 / 12)  # GRPO on accuracy: only the mixed group has a signal


def test_grpo_says_nothing_about_calls() -> None:
    found = signals("grpo")
    assert set(found) == {"groups/all_correct", "groups/mixed", "groups/all_wrong", "zero_adv_acc",
                          "tool_signal_acc/all_correct", "tool_signal_acc/mixed", "tool_signal_acc/all_wrong"}
    assert all(abs(value) < 1e-5 for key, value in found.items() if key.startswith("tool_signal"))


def test_a_signal_that_rewards_more_calls_is_negative() -> None:
    more_is_better = torch.tensor([[-1.0, -0.5, 0.5, 1.0]])
    found = group_signals({"correct": torch.ones(1, 4, dtype=torch.bool), "tool_calls": CALLS[:1]},
                          {"acc": more_is_better})
    assert found["tool_signal_acc/all_correct"] == pytest.approx(-0.75)
    assert found["tool_signal_acc/mixed"] is None and found["tool_signal_acc/all_wrong"] is None


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_logs_a_signal_per_term_and_group_type(algo: str) -> None:
    found = signals(algo)
    for term in ALGORITHMS[algo].terms:
        assert {f"tool_signal_{term}/{kind}" for kind in ("all_correct", "mixed", "all_wrong")} <= set(found)


def test_the_plot_draws_a_panel_per_family_with_gaps_for_missing_group_types(tmp_path: Path) -> None:
    lines = [{"step": 1, "accuracy": 0.5, "groups/all_correct": 1.0, "groups/mixed": 0.0,
              "tool_signal_tool/all_correct": 0.8, "tool_signal_tool/mixed": None},
             {"step": 2, "accuracy": 0.6, "groups/all_correct": 0.5, "groups/mixed": 0.5,
              "tool_signal_tool/all_correct": None, "tool_signal_tool/mixed": None}]
    (tmp_path / "hdpo_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    png = plot_metrics(tmp_path, tmp_path / "metrics.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
