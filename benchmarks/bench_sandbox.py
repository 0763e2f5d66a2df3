"""Sandbox throughput, side by side in one run.

1. Snippets: the warm sandbox (a pre-imported zygote forks a fresh child per trajectory) vs a naive
   sandbox that starts a fresh isolated `python` per snippet with the same imports (numpy, PIL,
   matplotlib), the same bwrap / namespace command line, environment and parallelism. Target >= 10x.
2. End to end: `execution_failure` + `consistency` on N generated trajectories with `--workers 2`,
   rows per second.

    python benchmarks/bench_sandbox.py [--snippets 200] [--rows 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from curate.executor import LocalExecutor
from curate.recipe import load_recipe
from curate.sandbox import Sandbox, SandboxOptions

SNIPPET = "import numpy as np\nvalues = np.arange(1000)\nprint(int(values.sum()))"
IMPORTS = "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot, numpy, PIL.Image\n"
REPO = Path(__file__).resolve().parent.parent


def warm(sandbox: Sandbox, count: int) -> float:
    sandbox.run([SNIPPET])  # the first run pays nothing the others do not, but keep it out of the timing
    started = time.perf_counter()
    results = sandbox.run_many([([SNIPPET], {}, [])] * count)
    assert all(r.cells[0].stdout == "499500\n" for r in results)
    return time.perf_counter() - started


def naive(sandbox: Sandbox, count: int) -> float:
    """A fresh isolated interpreter per snippet: the worker's own command with `-c` instead of the zygote."""
    worker = sandbox._workers[0]
    command = worker.command[: -len(["python", "zygote", "--uid", "N"])] + [sys.executable, "-c", IMPORTS + SNIPPET]
    if command[0] == "bwrap":
        setenv = [arg for name, value in worker.environment.items() for arg in ("--setenv", name, value)]
        at = command.index("--clearenv") + 1
        command, environment = command[:at] + setenv + command[at:], None
    else:
        environment = worker.environment

    def once(_: int) -> None:
        output = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=worker.home, check=True)
        assert output.stdout == "499500\n", output.stderr

    started = time.perf_counter()
    with ThreadPoolExecutor(sandbox.options.parallelism) as pool:
        list(pool.map(once, range(count)))
    return time.perf_counter() - started


def end_to_end(rows: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "curate.samples.generate", "--rows", str(rows), "--kind", "sft",
                        "--format", "messages", "--out", tmp], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        (data,) = Path(tmp).glob("*.jsonl")
        recipe = Path(tmp) / "recipe.yaml"
        options = {"timeout": 6, "cpu_seconds": 3, "parallelism": 1}
        recipe.write_text(yaml.safe_dump({"input": {"paths": [str(data)]}, "output": {"kind": "sft"},
                                          "stages": [{"execution_failure": options}, {"consistency": options}]}))
        started = time.perf_counter()
        manifest = LocalExecutor(load_recipe(recipe), Path(tmp) / "run", workers=2, cache_path=Path(tmp) / "c.sqlite",
                                 progress=False).run()
        return time.perf_counter() - started, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snippets", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    with Sandbox(SandboxOptions(parallelism=2)) as sandbox:
        warm_s = warm(sandbox, args.snippets)
        naive_count = max(20, args.snippets // 10)  # the naive way is slow: fewer snippets, same per-snippet rate
        naive_s = naive(sandbox, naive_count)
        level = sandbox.level
    warm_rate, naive_rate = args.snippets / warm_s, naive_count / naive_s
    print(f"snippets ({level}, 2 in parallel): warm sandbox {warm_rate:.1f}/s ({args.snippets} in {warm_s:.2f} s), "
          f"fresh interpreter per snippet {naive_rate:.1f}/s ({naive_count} in {naive_s:.2f} s): "
          f"{warm_rate / naive_rate:.1f}x (target >= 10x)")
    seconds, manifest = end_to_end(args.rows)
    funnel = {s["name"]: s["rejected"] for s in manifest["stages"]}
    print(f"execution_failure + consistency on {args.rows} trajectories, --workers 2: {seconds:.1f} s, "
          f"{args.rows / seconds:.1f} rows/s (rejected: {funnel})")


if __name__ == "__main__":
    main()
