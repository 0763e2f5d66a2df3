"""Micro-batched HDPO updates under torchrun (two processes, gloo, FSDP2): the gradient sync skipped on all but
a minibatch's last micro-batch, and ranks with fewer micro-batches running passes at weight 0, give the
one-process update of all the rollouts in one pass; so does reducing after every micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_train_distributed import ENV, TOLERANCE, assert_same_weights, rollout_groups, toy  # noqa: F401 (fixtures)


@pytest.mark.parametrize(("micro_batch_tokens", "reduce"), [("1", ""), ("150", ""), ("150", "reduce")])
def test_two_process_micro_batched_update_equals_the_one_process_one_pass_update(
        toy: Path, rollout_groups: Path, tmp_path: Path, micro_batch_tokens: str, reduce: str) -> None:  # noqa: F811
    """Gradients reduced after the last micro-batch only, or (`--reduce-every-micro-batch`) after each."""
    worker = [str(REPO / "tests" / "distributed_update.py"), str(toy), str(rollout_groups)]
    subprocess.run([sys.executable, *worker, str(tmp_path / "one"), "0"], check=True, env=ENV, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *worker,
                    str(tmp_path / "two"), micro_batch_tokens, reduce], check=True, env=ENV, timeout=300,
                   capture_output=True)
    one, two = (json.loads((tmp_path / name / "update.json").read_text()) for name in ("one", "two"))
    assert one.keys() == two.keys() and one["grad_norm"] > 0.05 and one["tool"] != 0
    torch.testing.assert_close(two, one, **TOLERANCE)
    assert_same_weights(tmp_path / "two" / "checkpoint-000001", tmp_path / "one" / "checkpoint-000001")
