"""HDPO's dilemma in miniature: GRPO, the coupled penalty r_acc - alpha·T, OTC-GRPO and HDPO (w_tool) trained
from the same cold start on the toy suite of `curate_testkit.toy`, over several seeds.

Per configuration and measurement bucket (copy, hash, chain, lookup-known, lookup-new): the tool-call rate
(share of rollouts with a call), the mean calls and the accuracy, before RL (the cold start) and after, as
mean ± standard error over seeds; and OTC's tool productivity (correct answers per call). A PNG plots accuracy
on the buckets that need the tool against the tool-call rate on those that do not, one point per configuration.

Runs fan out over worker processes (one torch thread each), seed by seed (every configuration of a seed
before the next seed); a result is saved as it finishes, so a run that is stopped resumes where it was.

    python benchmarks/bench_ablation.py [--seeds 5] [--workers 2] [--steps 20 --prompts 8 -G 8] [--out runs/ablation]

The default RL budget (20 steps of 8 prompts × G 8) is a third of the "it learns" test's (30 × 16 × 8), so that
60 runs fit in about 20 minutes on 2 cores; every configuration gets the same budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import mean, stdev
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "grpo": {"algo": "grpo"},
    **{f"coupled α={a}": {"algo": "coupled", "alpha": a} for a in (0.02, 0.05, 0.1, 0.2, 0.5)},
    "otc": {"algo": "otc"},
    **{f"hdpo w_tool={w}": {"algo": "hdpo", "w_tool": w} for w in (0.05, 0.1, 0.15, 0.2, 0.3)},
}
NEEDED = ("hash", "chain", "lookup-new")  # buckets whose correct answer takes the tool
UNNEEDED = ("copy", "lookup-known")  # buckets the model can answer without it


def _quiet() -> None:
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)  # the workers are the parallelism
    logging.disable_progress_bar()


def measured(checkpoint: Path, seed: int, samples: int) -> dict[str, Any]:
    from curate_testkit.toy import toy_prompts
    from curate_testkit.toy_runs import rates, sample_rollouts, tool_productivity

    rollouts = sample_rollouts(checkpoint, toy_prompts(), samples, seed)
    return {"rates": {name: vars(found) for name, found in rates(rollouts).items()},
            "tool_productivity": tool_productivity(rollouts)}


def pretrain_job(folder: Path, seed: int, samples: int) -> dict[str, Any]:
    _quiet()
    from curate_testkit.toy_runs import pretrain

    started = time.perf_counter()
    cold = pretrain(folder, seed)
    return {"checkpoint": str(cold), **measured(cold, seed, samples), "seconds": time.perf_counter() - started}


def tune_job(cold: Path, out: Path, seed: int, samples: int, config: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    from curate_testkit.toy_runs import tune

    started = time.perf_counter()
    tuned = tune(cold, out, seed, resume=False, **config)
    return {**measured(tuned, seed, samples), "seconds": time.perf_counter() - started}


def run_all(out: Path, seeds: int, workers: int, samples: int, budget: dict[str, int]) -> dict[str, Any]:
    """Every (configuration, seed) result, read back from `out/results.json` where a stopped run saved it."""
    saved = out / "results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}

    def keep(key: str, value: dict[str, Any]) -> None:
        results[key] = value
        saved.write_text(json.dumps(results, indent=1))

    with ProcessPoolExecutor(workers) as pool:
        todo = {f"cold/{s}": pool.submit(pretrain_job, out / f"seed{s}", s, samples)
                for s in range(seeds) if f"cold/{s}" not in results}
        for key, job in todo.items():
            keep(key, job.result())
        jobs = {f"{name}/{s}": pool.submit(tune_job, Path(results[f"cold/{s}"]["checkpoint"]),
                                           out / f"seed{s}" / name.replace(" ", "_"), s, samples, {**budget, **config})
                for s in range(seeds) for name, config in CONFIGS.items() if f"{name}/{s}" not in results}
        for key, job in jobs.items():
            keep(key, job.result())
    return results


def finished(results: dict[str, Any], name: str, seeds: int) -> list[dict[str, Any]]:
    """The finished runs of a configuration (of the cold start for "before"), seed by seed."""
    keys = [f"cold/{s}" if name.startswith("before") else f"{name}/{s}" for s in range(seeds)]
    return [results[key] for key in keys if key in results]


def mean_se(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def pooled(result: dict[str, Any], buckets: tuple[str, ...], field: str) -> float:
    """A field averaged over buckets (each bucket weighs the same)."""
    return mean(result["rates"][b][field] for b in buckets)


def table(results: dict[str, Any], seeds: int) -> str:
    buckets = list(results["cold/0"]["rates"])
    header = ["configuration"] + [f"{b}: tools / calls / acc" for b in buckets] + ["tool productivity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ["before (cold start)", *CONFIGS]:
        runs = finished(results, name, seeds)
        if not runs:
            continue
        cells = [f"{name} (n={len(runs)})"]
        for b in buckets:
            cells.append(" / ".join("{:.2f}±{:.2f}".format(*mean_se([r["rates"][b][f] for r in runs]))
                                    for f in ("tool_calls", "mean_calls", "accuracy")))
        productivity = [r["tool_productivity"] for r in runs if r["tool_productivity"] is not None]
        cells.append("{:.2f}±{:.2f}".format(*mean_se(productivity)) if productivity else "no calls")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict[str, Any], seeds: int, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    for name in ["before (cold start)", *CONFIGS]:
        runs = finished(results, name, seeds)
        if not runs:
            continue
        x, x_se = mean_se([pooled(r, UNNEEDED, "tool_calls") for r in runs])
        y, y_se = mean_se([pooled(r, NEEDED, "accuracy") for r in runs])
        family = name.split()[0]
        members = [n for n in CONFIGS if n.startswith(family)]
        shade = 0.4 + 0.6 * (members.index(name) + 1) / len(members) if name in members else 1.0
        color = {"coupled": plt.cm.Reds, "hdpo": plt.cm.Blues}.get(family, lambda _: "black")(shade)
        style = {"grpo": "s", "otc": "D", "coupled": "o", "hdpo": "^", "before": "x"}[family]
        axis.errorbar(x, y, xerr=x_se, yerr=y_se, fmt=style, color=color, capsize=3, label=name)
    axis.set_xlabel(f"tool-call rate where the tool is not needed ({', '.join(UNNEEDED)})")
    axis.set_ylabel(f"accuracy where the tool is needed ({', '.join(NEEDED)})")
    axis.set_title(f"toy suite, mean ± s.e. over up to {seeds} seeds: up and left is better")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    parser.add_argument("-G", "--rollouts", type=int, default=8, help="rollouts per prompt in RL")
    parser.add_argument("--samples", type=int, default=2, help="rollouts per prompt when measuring (all 384 prompts)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--report", action="store_true", help="only print the table and figure of the saved runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    budget = {"steps": args.steps, "prompts_per_step": args.prompts, "rollouts": args.rollouts}
    if args.report:
        results = json.loads((args.out / "results.json").read_text())
    else:
        results = run_all(args.out, args.seeds, args.workers, args.samples, budget)
    print(table(results, args.seeds))
    print(f"\nfigure: {figure(results, args.seeds, args.out / 'ablation.png')}")
    if not args.report:
        print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s of wall time on {args.workers} workers "
              f"({sum(r['seconds'] for r in results.values()):.0f} s of work)")


if __name__ == "__main__":
    main()
