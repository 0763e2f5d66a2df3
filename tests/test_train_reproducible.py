"""Reproducible HDPO runs: the same seed on the same machine gives the same metrics and weights, and a run
stopped and resumed from its checkpoint continues exactly as the uninterrupted run (the random generators'
states travel in the checkpoint). Exercised for HDPO and the OTC-GRPO baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from curate_testkit.toy import build_toy_policy, cold_start_data, toy_prompts
from curate_testkit.toy_runs import tune, write_shard

from curate.train.checkpoint import checkpoint_weights
from curate.train.sft import SFTConfig, train_sft

NUMBERS = range(1, 25)
SMALL = {"prompts_per_step": 4, "rollouts": 4, "lr": 1e-3}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy policy trained briefly on tool trajectories: some rollouts right, some wrong, so steps update it."""
    folder = tmp_path_factory.mktemp("policy")
    shard = write_shard(cold_start_data(("copy", "hash"), NUMBERS), folder / "sft.parquet", "messages")
    return train_sft(SFTConfig(model=str(build_toy_policy(folder / "toy")), shards=shard, out=folder / "sft", epochs=10,
                               lr=2e-3, batch_size=8, device="cpu"))


def metrics(out: Path) -> list[dict]:
    """The log without its clock readings."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "hdpo_log.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict:
    return checkpoint_weights(checkpoint)


@pytest.mark.parametrize("algo", ["hdpo", "otc"])
def test_the_same_seed_gives_the_same_metrics_and_weights(policy: Path, tmp_path: Path, algo: str) -> None:
    prompts = toy_prompts(("copy", "hash"), NUMBERS)
    first = tune(policy, tmp_path / "a", seed=3, prompts=prompts, steps=2, algo=algo, **SMALL)
    second = tune(policy, tmp_path / "b", seed=3, prompts=prompts, steps=2, algo=algo, **SMALL)
    log = metrics(tmp_path / "a")
    assert any(entry["grad_norm"] > 0 for entry in log), log  # the policy was updated
    assert log == metrics(tmp_path / "b")
    for name, tensor in weights(first).items():
        assert tensor.equal(weights(second)[name]), name
    other = tune(policy, tmp_path / "c", seed=4, prompts=prompts, steps=2, algo=algo, **SMALL)
    assert metrics(tmp_path / "c") != log or any(not t.equal(weights(other)[n]) for n, t in weights(first).items())


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(policy: Path, tmp_path: Path) -> None:
    prompts = toy_prompts(("copy", "hash"), NUMBERS)
    whole = tune(policy, tmp_path / "whole", seed=5, prompts=prompts, steps=4, **SMALL)
    tune(policy, tmp_path / "parts", seed=5, prompts=prompts, steps=2, **SMALL)
    resumed = tune(policy, tmp_path / "parts", seed=5, prompts=prompts, steps=4, **SMALL)  # from checkpoint-000002
    assert metrics(tmp_path / "parts") == metrics(tmp_path / "whole")
    for name, tensor in weights(whole).items():
        assert tensor.equal(weights(resumed)[name]), name
