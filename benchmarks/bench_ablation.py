"""HDPO's dilemma in miniature: GRPO, the coupled penalty r_acc - alpha·T, OTC-GRPO and HDPO (w_tool) trained
from the same cold start on a toy suite of `curate_testkit.toy`, over several seeds.

Two suites: `dilemma` (copy, recall, hash, triple: mixed groups where the tool is not needed, and needed calls the
policy sometimes skips with a guess) and `toy` (copy, hash, chain, lookup: the "it learns" suite, mostly
all-correct groups). Per configuration and measurement bucket: the tool-call rate (share of rollouts with a call),
the mean calls and the accuracy, before RL (the cold start) and after, as mean ± standard error over seeds; OTC's
tool productivity (correct answers per call); and from the training logs, the share of mixed groups and the tool
signal each group type gave (`curate.train.signals`). A PNG plots accuracy on the buckets that need the tool against
the tool-call rate on those that do not, one point per configuration.

Runs fan out over worker processes (one torch thread each), seed by seed (every configuration of a seed before the
next seed); a result is saved as it finishes, so a run that is stopped resumes where it was, and `--configs` runs a
part of the table in one go (the cold starts are shared). `--report` rebuilds the table and figure from the saved
results.

    python benchmarks/bench_ablation.py [--suite dilemma] [--seeds 5] [--configs grpo,otc] [--out runs/ablation-dilemma]

The RL budget (20 steps of 8 prompts × G 8) is a third of the "it learns" test's (30 × 16 × 8); every configuration
gets the same budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from statistics import mean, stdev
from typing import Any

SUITES: dict[str, dict[str, Any]] = {
    "dilemma": {
        "configs": {
            "grpo": {"algo": "grpo"},
            **{f"coupled α={a}": {"algo": "coupled", "alpha": a} for a in (0.02, 0.1, 0.5)},
            "otc": {"algo": "otc"},
            **{f"hdpo w_tool={w}": {"algo": "hdpo", "w_tool": w} for w in (0.1, 0.15, 0.3)},
        },
        "needed": ("hash", "triple"),  # buckets whose correct answer takes the tool
        "unneeded": ("copy", "recall"),  # buckets the model can answer (as well) without it
    },
    "toy": {
        "configs": {
            "grpo": {"algo": "grpo"},
            **{f"coupled α={a}": {"algo": "coupled", "alpha": a} for a in (0.02, 0.05, 0.1, 0.2, 0.5)},
            "otc": {"algo": "otc"},
            **{f"hdpo w_tool={w}": {"algo": "hdpo", "w_tool": w} for w in (0.05, 0.1, 0.15, 0.2, 0.3)},
        },
        "needed": ("hash", "chain", "lookup-new"),
        "unneeded": ("copy", "lookup-known"),
    },
}


def _quiet() -> None:
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)  # the workers are the parallelism
    logging.disable_progress_bar()


def measured(checkpoint: Path, seed: int, samples: int, suite: str) -> dict[str, Any]:
    from curate_testkit.toy import toy_prompts
    from curate_testkit.toy_runs import SUITES as TOY_SUITES  # the kinds and turns; this module's SUITES: the table
    from curate_testkit.toy_runs import rates, sample_rollouts, tool_productivity

    kinds, max_turns = TOY_SUITES[suite].kinds, TOY_SUITES[suite].max_turns
    rollouts = sample_rollouts(checkpoint, toy_prompts(kinds), samples, seed, max_turns)
    return {"rates": {name: vars(found) for name, found in rates(rollouts).items()},
            "tool_productivity": tool_productivity(rollouts)}


def pretrain_job(folder: Path, seed: int, samples: int, suite: str) -> dict[str, Any]:
    _quiet()
    from curate_testkit.toy_runs import SUITES as TOY_SUITES
    from curate_testkit.toy_runs import pretrain

    started = time.perf_counter()
    cold = pretrain(folder, seed, TOY_SUITES[suite].kinds)
    return {"checkpoint": str(cold), **measured(cold, seed, samples, suite), "seconds": time.perf_counter() - started}


def training_log(out: Path) -> dict[str, Any]:
    """From a run's `hdpo_log.jsonl`: the mean over its steps of each group type's share and each term's tool
    signal per group type (steps without that type left out), and the training accuracy of its first and last
    quarter of steps."""
    steps = [json.loads(line) for line in (out / "hdpo_log.jsonl").read_text().splitlines()]
    keys = [key for key in steps[0] if key.startswith(("groups/", "tool_signal_"))]
    means = {}
    for key in keys:
        values = [step[key] for step in steps if step.get(key) is not None]
        means[key] = mean(values) if values else None
    quarter = max(1, len(steps) // 4)
    return {**means, "train_accuracy_first": mean(s["accuracy"] for s in steps[:quarter]),
            "train_accuracy_last": mean(s["accuracy"] for s in steps[-quarter:])}


def tune_job(cold: Path, out: Path, seed: int, samples: int, suite: str, config: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    from curate_testkit.toy import toy_prompts
    from curate_testkit.toy_runs import SUITES as TOY_SUITES
    from curate_testkit.toy_runs import tune

    started = time.perf_counter()
    toy_suite = TOY_SUITES[suite]
    tuned = tune(cold, out, seed, toy_prompts(toy_suite.kinds), resume=False, max_turns=toy_suite.max_turns, **config)
    return {**measured(tuned, seed, samples, suite), "log": training_log(out), "seconds": time.perf_counter() - started}


def run_all(out: Path, suite: str, names: list[str], seeds: int, workers: int, samples: int,
            budget: dict[str, int]) -> dict[str, Any]:
    """Every (configuration, seed) result of `names`, read back from `out/results.json` where an earlier or stopped
    run saved it."""
    saved = out / "results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    configs = SUITES[suite]["configs"]

    def keep(key: str, value: dict[str, Any]) -> None:
        results[key] = value
        saved.write_text(json.dumps(results, indent=1))

    with ProcessPoolExecutor(workers) as pool:
        running: dict[Future[dict[str, Any]], str] = {}

        def tune_seed(seed: int) -> None:  # queued as soon as the seed's cold start is there
            for name in names:
                if f"{name}/{seed}" not in results:
                    job = pool.submit(tune_job, Path(results[f"cold/{seed}"]["checkpoint"]),
                                      out / f"seed{seed}" / name.replace(" ", "_"), seed, samples, suite,
                                      {**budget, **configs[name]})
                    running[job] = f"{name}/{seed}"

        for seed in range(seeds):
            if f"cold/{seed}" in results:
                tune_seed(seed)
            else:
                running[pool.submit(pretrain_job, out / f"seed{seed}", seed, samples, suite)] = f"cold/{seed}"
        while running:
            job = next(as_completed(running))
            key = running.pop(job)
            keep(key, job.result())
            if key.startswith("cold/"):
                tune_seed(int(key.split("/")[1]))
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


def weighted_signal(run: dict[str, Any], config: dict[str, Any], kind: str) -> float | None:
    """A run's tool signal in groups of `kind`, summed over its terms with the trainer's loss weights for `config`."""
    from curate.train.hdpo import HDPOConfig, term_weights

    weights = term_weights(HDPOConfig(model="", shards=[], out=Path(), **config))
    found = {term: run["log"].get(f"tool_signal_{term}/{kind}") for term in weights}
    if all(value is None for value in found.values()):
        return None
    return sum(weights[term] * value for term, value in found.items() if value is not None)


def cell(values: list[float | None]) -> str:
    """mean ± s.e. of the values there are ("-" for none); a mean that rounds to zero is 0.00, not -0.00."""
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    average, error = mean_se(present)
    return f"{average:.2f}".replace("-0.00", "0.00") + f"±{error:.2f}"


def table(results: dict[str, Any], suite: str, seeds: int) -> str:
    buckets = list(results["cold/0"]["rates"])
    header = ["configuration"] + [f"{b}: tools / calls / acc" for b in buckets] + ["tool productivity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ["before (cold start)", *SUITES[suite]["configs"]]:
        runs = finished(results, name, seeds)
        if not runs:
            continue
        cells = [f"{name} (n={len(runs)})"]
        for b in buckets:
            cells.append(" / ".join(cell([r["rates"][b][f] for r in runs]) for f in ("tool_calls", "mean_calls", "accuracy")))
        cells.append(cell([r["tool_productivity"] for r in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def signal_table(results: dict[str, Any], suite: str, seeds: int) -> str:
    """From the training logs: the group types' shares, the weighted tool signal each type gave (positive: fewer
    calls rewarded among rollouts of equal correctness), and the training accuracy early and late."""
    header = ["configuration", "groups all-correct / mixed / all-wrong",
              "tool signal, all-correct / mixed / all-wrong", "training accuracy, first → last quarter"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, config in SUITES[suite]["configs"].items():
        runs = [r for r in finished(results, name, seeds) if "log" in r]
        if not runs:
            continue
        kinds = ("all_correct", "mixed", "all_wrong")
        shares = " / ".join(cell([r["log"][f"groups/{kind}"] for r in runs]) for kind in kinds)
        signals = " / ".join(cell([weighted_signal(r, config, kind) for r in runs]) for kind in kinds)
        accuracy = (cell([r["log"]["train_accuracy_first"] for r in runs]) + " → "
                    + cell([r["log"]["train_accuracy_last"] for r in runs]))
        lines.append(f"| {name} (n={len(runs)}) | {shares} | {signals} | {accuracy} |")
    return "\n".join(lines)


def figure(results: dict[str, Any], suite: str, seeds: int, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, needed, unneeded = (SUITES[suite][key] for key in ("configs", "needed", "unneeded"))
    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    for name in ["before (cold start)", *configs]:
        runs = finished(results, name, seeds)
        if not runs:
            continue
        x, x_se = mean_se([pooled(r, unneeded, "tool_calls") for r in runs])
        y, y_se = mean_se([pooled(r, needed, "accuracy") for r in runs])
        family = name.split()[0]
        members = [n for n in configs if n.startswith(family)]
        shade = 0.4 + 0.6 * (members.index(name) + 1) / len(members) if name in members else 1.0
        color = {"coupled": plt.cm.Reds, "hdpo": plt.cm.Blues}.get(family, lambda _: "black")(shade)
        style = {"grpo": "s", "otc": "D", "coupled": "o", "hdpo": "^", "before": "x"}[family]
        axis.errorbar(x, y, xerr=x_se, yerr=y_se, fmt=style, color=color, capsize=3, label=name)
    axis.set_xlabel(f"tool-call rate where the tool is not needed ({', '.join(unneeded)})")
    axis.set_ylabel(f"accuracy where the tool is needed ({', '.join(needed)})")
    axis.set_title(f"{suite} suite, mean ± s.e. over up to {seeds} seeds: up and left is better")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


def chosen(suite: str, configs: str | None) -> list[str]:
    """The configurations named in `configs` (comma-separated names or families, e.g. `grpo,hdpo`); all without."""
    names = list(SUITES[suite]["configs"])
    if not configs:
        return names
    wanted = [part.strip() for part in configs.split(",")]
    picked = [name for name in names if any(name == part or name.split()[0] == part for part in wanted)]
    unknown = [part for part in wanted if not any(name == part or name.split()[0] == part for name in names)]
    if unknown:
        raise SystemExit(f"--configs: no configuration {', '.join(unknown)} in the {suite} suite; choose from: "
                         f"{', '.join(names)} (or a family: grpo, coupled, otc, hdpo)")
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=list(SUITES), default="dilemma")
    parser.add_argument("--configs", help="comma-separated configurations or families to run now (default: all)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    parser.add_argument("-G", "--rollouts", type=int, default=8, help="rollouts per prompt in RL")
    parser.add_argument("--samples", type=int, default=2, help="rollouts per prompt when measuring (all 384 prompts)")
    parser.add_argument("--out", type=Path, help="results folder (default: runs/ablation-<suite>)")
    parser.add_argument("--report", action="store_true", help="only print the tables and figure of the saved runs")
    args = parser.parse_args()
    out = args.out or Path(f"runs/ablation-{args.suite}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    budget = {"steps": args.steps, "prompts_per_step": args.prompts, "rollouts": args.rollouts}
    if args.report:
        results = json.loads((out / "results.json").read_text())
    else:
        names = chosen(args.suite, args.configs)
        before = len(json.loads((out / "results.json").read_text())) if (out / "results.json").exists() else 0
        results = run_all(out, args.suite, names, args.seeds, args.workers, args.samples, budget)
    print(table(results, args.suite, args.seeds))
    print()
    print(signal_table(results, args.suite, args.seeds))
    print(f"\nfigure: {figure(results, args.suite, args.seeds, out / 'ablation.png')}")
    if not args.report:
        print(f"{len(results) - before} runs in {time.perf_counter() - started:.0f} s of wall time on {args.workers} "
              f"workers; all {len(results)} saved runs are {sum(r['seconds'] for r in results.values()):.0f} s of work")


if __name__ == "__main__":
    main()
