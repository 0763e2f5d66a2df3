"""`curate train plot RUN`: every metric of a training log against the step, one panel each."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import polars as pl

from curate.errors import UserError


def plot_metrics(run: Path, png: Path) -> Path:
    logs = [p for p in (run / "hdpo_log.jsonl", run / "sft_log.jsonl") if p.exists()]
    if not logs:
        raise UserError(f"{run}: no hdpo_log.jsonl or sft_log.jsonl; give a directory `curate train` wrote")
    frame = pl.read_ndjson(logs[0])
    metrics = [c for c in frame.columns if c != "step"]
    columns = 3
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        axis.plot(frame["step"], frame[metric])
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    figure.suptitle(f"{run.name}: {logs[0].name}")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
