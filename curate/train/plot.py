"""`curate train plot RUN`: every metric of a training log against the step, one panel each; metrics named
`<panel>/<line>` (the group types, each term's tool signal by group type) share a panel, a line each."""

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
    panels: dict[str, list[str]] = {}
    for column in frame.columns:
        if column != "step":
            panels.setdefault(column.split("/")[0], []).append(column)
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for axis, (title, lines) in zip(axes.flat, panels.items()):
        for line in lines:
            # null (a step without a value, e.g. no group of that type) is a gap in the line
            values = frame[line].cast(pl.Float64).to_numpy()
            axis.plot(frame["step"], values, label=line.partition("/")[2] or None, marker="." if len(frame) < 30 else None)
        if len(lines) > 1:
            axis.legend(fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"{run.name}: {logs[0].name}")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
