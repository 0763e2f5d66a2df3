"""The algorithm table (`curate.train.algorithms.ALGORITHMS`): each entry's loss terms are the ones the trainer
computes, trains and logs, and nothing but the table decides them."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from curate_testkit.toy import build_toy_policy, toy_prompt
from test_train_microbatch import random_rollouts

from curate.generation.hf import LoadedModel, load_model
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.algorithms import ALGORITHMS, Algorithm, accuracy, tool_efficiency
from curate.train.hdpo import HDPOConfig, advantages, hdpo_step, update
from curate.train.rollout import RolloutConfig, RolloutEngine
from curate.verify import AnswerVerifier

# Two prompts, G = 4: groups with two or more correct rollouts and different tool counts, so both channels carry a
# signal; rows 1 and 7 are wrong.
SCORES = {"correct": torch.tensor([[True, False, True, True], [True, True, True, False]]),
          "format": torch.tensor([[True, True, False, True], [True, True, True, True]]),
          "tool_calls": torch.tensor([[0, 1, 2, 1], [3, 0, 1, 2]])}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(build_toy_policy(tmp_path_factory.mktemp("toy") / "toy")), "cpu", "float32")


def config_for(algo: str, **settings: object) -> HDPOConfig:
    return HDPOConfig(**{"model": "toy", "shards": [], "out": Path("."), "algo": algo, "rollouts": 4, "lr": 1.0,
                         **settings})  # type: ignore[arg-type]


def updated(toy: LoadedModel, trained: dict[str, torch.Tensor], config: HDPOConfig) -> tuple[dict[str, float],
                                                                                                  LoadedModel]:
    """One update of a copy of the toy policy (plain SGD, a fixed minibatch order) on fixed rollouts."""
    mine = replace(toy, net=copy.deepcopy(toy.net))
    torch.manual_seed(3)
    rollouts = random_rollouts(8, toy.net.config.vocab_size)
    return update(mine, torch.optim.SGD(mine.net.parameters(), lr=config.lr), rollouts, trained, config), mine


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_the_trainer_computes_trains_and_logs_the_terms_of_the_entry_only(toy: LoadedModel, algo: str) -> None:
    config = config_for(algo)
    trained = advantages(SCORES, config)
    terms = ALGORITHMS[algo].terms
    assert tuple(trained) == terms and all(adv.shape == (2, 4) for adv in trained.values())
    for term, advantages_of in ALGORITHMS[algo].advantages.items():
        torch.testing.assert_close(trained[term], advantages_of(SCORES, config), rtol=0, atol=0)
    losses, _ = updated(toy, trained, config)
    assert set(losses) == {"total", "grad_norm", *terms, *(f"clip_frac_{term}" for term in terms)}
    assert ("tool" in losses) == (algo == "hdpo")


def test_grpo_trains_what_hdpo_with_w_tool_0_trains_without_computing_the_tool_term(toy: LoadedModel) -> None:
    """Dropping the unused term changes what is computed and logged, not the update."""
    grpo = config_for("grpo")
    grpo_losses, grpo_policy = updated(toy, advantages(SCORES, grpo), grpo)
    hdpo = config_for("hdpo", w_tool=0.0)
    hdpo_losses, hdpo_policy = updated(toy, advantages(SCORES, hdpo), hdpo)
    assert hdpo_losses["tool"] != 0 and "tool" not in grpo_losses
    for key in ("total", "acc", "clip_frac_acc", "grad_norm"):
        assert grpo_losses[key] == pytest.approx(hdpo_losses[key], rel=1e-6, abs=1e-9), key
    for (name, ours), theirs in zip(grpo_policy.net.state_dict().items(), hdpo_policy.net.state_dict().values(),
                                    strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_replacing_an_entry_changes_what_the_trainer_computes_and_trains(toy: LoadedModel,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for("grpo")
    before = advantages(SCORES, config)
    before_losses, before_policy = updated(toy, before, config)
    monkeypatch.setitem(ALGORITHMS, "grpo", Algorithm("negated accuracy, and the tool term",
                                                      {"acc": lambda scores, c: -accuracy(scores, c),
                                                       "tool": tool_efficiency}))
    after = advantages(SCORES, config)
    assert tuple(after) == ("acc", "tool") and after["tool"].any()
    torch.testing.assert_close(after["acc"], -before["acc"], rtol=0, atol=0)
    after_losses, after_policy = updated(toy, after, config)
    assert {"tool", "clip_frac_tool"} <= set(after_losses) and after_losses["acc"] != before_losses["acc"]
    assert any(not torch.equal(ours, theirs) for ours, theirs in
               zip(after_policy.net.state_dict().values(), before_policy.net.state_dict().values(), strict=True))


def test_a_grpo_step_logs_no_tool_loss(toy: LoadedModel) -> None:
    """The step's log (what `hdpo_log.jsonl` holds) carries the accuracy term's loss and clip fraction only."""
    config = config_for("grpo", rollouts=2, max_turns=1, max_new_tokens=4, sandbox_workers=1)
    mine = replace(toy, net=copy.deepcopy(toy.net))
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5, parallelism=1)) as sandbox:
        engine = RolloutEngine(mine, sandbox, RolloutConfig(max_turns=1, max_new_tokens=4, max_tokens=256))
        metrics = hdpo_step(mine, engine, torch.optim.SGD(mine.net.parameters(), lr=1e-3),
                            [toy_prompt("p1", "hash", 1), toy_prompt("p2", "hash", 2)], AnswerVerifier(), config)
    assert {"loss_total", "loss_acc", "clip_frac_acc", "grad_norm", "accuracy"} <= set(metrics)
    assert not {key for key in metrics if key.endswith("_tool")}
