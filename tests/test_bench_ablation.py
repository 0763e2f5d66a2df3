"""`benchmarks/bench_ablation.py`: `--configs` picks a part of the table, and `--report` rebuilds the tables and the
figure from saved results alone (no training), including the training logs' group signals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_ablation.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ablation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_pick_names_or_families(bench: ModuleType) -> None:
    assert bench.chosen("dilemma", "grpo,hdpo") == ["grpo", "hdpo w_tool=0.1", "hdpo w_tool=0.15", "hdpo w_tool=0.3"]
    assert bench.chosen("dilemma", "coupled α=0.5") == ["coupled α=0.5"]
    assert len(bench.chosen("dilemma", None)) == 8
    with pytest.raises(SystemExit, match="no configuration ppo"):
        bench.chosen("dilemma", "grpo,ppo")


def result(accuracy: float, signal: float | None = None) -> dict:
    rates = {bucket: {"tool_calls": 0.5, "mean_calls": 0.5, "accuracy": accuracy}
             for bucket in ("copy", "recall", "hash", "triple")}
    found = {"rates": rates, "tool_productivity": 0.8, "seconds": 1.0}
    if signal is not None:
        found["log"] = {"groups/all_correct": 0.3, "groups/mixed": 0.6, "groups/all_wrong": 0.1,
                        "tool_signal_acc/all_correct": 0.0, "tool_signal_acc/mixed": 0.0,
                        "tool_signal_acc/all_wrong": None, "tool_signal_tool/all_correct": signal,
                        "tool_signal_tool/mixed": signal, "tool_signal_tool/all_wrong": 0.0,
                        "train_accuracy_first": 0.7, "train_accuracy_last": 0.8}
    return found


def test_report_rebuilds_the_tables_from_saved_runs(tmp_path: Path) -> None:
    saved = {"cold/0": {**result(0.5), "checkpoint": "x"}, "cold/1": {**result(0.7), "checkpoint": "y"},
             "hdpo w_tool=0.3/0": result(0.9, signal=1.0), "hdpo w_tool=0.3/1": result(0.7, signal=0.6)}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    out = subprocess.run([sys.executable, str(BENCH), "--report", "--seeds", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| before (cold start) (n=2) | 0.50±0.00 / 0.50±0.00 / 0.60±0.10 |" in out
    assert "| hdpo w_tool=0.3 (n=2) | 0.50±0.00 / 0.50±0.00 / 0.80±0.10 |" in out
    # The tool term's signal weighted by w_tool (0.3), the accuracy term's by 1: (0.3 + 0.18) / 2.
    assert "| hdpo w_tool=0.3 (n=2) | 0.30±0.00 / 0.60±0.00 / 0.10±0.00 | 0.24±0.06 / 0.24±0.06 / 0.00±0.00 |" in out
    assert "0.70±0.00 → 0.80±0.00" in out
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
