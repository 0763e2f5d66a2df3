"""The documented training path, scaled down: `curate train sft` then `curate train hdpo` from its last checkpoint,
as the CLI commands (the toy policy and toy shards stand for SmolLM2 and the recipes' runs), with the HDPO update
micro-batched and off-policy minibatches (their reference log-probs in micro-batches too)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from curate_testkit.harness import run_curate
from curate_testkit.toy import build_toy_policy, cold_start_data, toy_prompts

from curate.formats import get_format
from curate.train.checkpoint import is_sharded_checkpoint


def test_sft_then_micro_batched_hdpo_through_the_cli(tmp_path: Path) -> None:
    model = build_toy_policy(tmp_path / "toy")
    sft_shard, rl_shard = tmp_path / "sft.parquet", tmp_path / "rl.parquet"
    get_format("messages").write(cold_start_data(("hash", "chain"), range(3, 7)), sft_shard)
    get_format("verl").write(toy_prompts(("copy", "hash"), range(1, 5)), rl_shard)
    run_curate("train", "sft", str(sft_shard), "--model", str(model), "-o", str(tmp_path / "train-sft"),
               "--batch-size", "2", "--max-tokens", "1024", "--lr", "1e-3", timeout=600)
    checkpoint = tmp_path / "train-sft" / "checkpoint-000004"  # 8 trajectories, 2 a step
    assert is_sharded_checkpoint(checkpoint)
    out = tmp_path / "train-hdpo"
    run_curate("train", "hdpo", str(rl_shard), "--model", str(checkpoint), "-o", str(out), "--prompts", "4", "-G", "4",
               "--steps", "1", "--max-new-tokens", "16", "--max-turns", "2", "--max-tokens", "200",
               "--sandbox-workers", "1", "--micro-batch-tokens", "64", "--updates-per-step", "2", timeout=600)
    (entry,) = [json.loads(line) for line in (out / "hdpo_log.jsonl").read_text().splitlines()]
    assert entry["step"] == 1 and math.isfinite(entry["loss_total"]) and entry["grad_norm"] >= 0
    assert json.loads((out / "checkpoint-000001" / "train_config.json").read_text())["micro_batch_tokens"] == 64
