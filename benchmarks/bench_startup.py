"""Start-up of `curate stages` and of loading a CPU recipe: wall and CPU seconds, modules imported, and whether
torch, vLLM or google-genai were imported, for one or more checkouts side by side (interleaved rounds, medians).

Each command runs in a fresh interpreter with the checkout first on PYTHONPATH and the venv's editable install of
curate switched off (a `sitecustomize` drops its import finder), so each checkout's own code is what runs, with the
venv's dependencies; CPU seconds (user + system of the child) move less than wall seconds on a loaded machine.
Compare a checkout with an older one (e.g. `git worktree add /tmp/old <commit>`; `--recipe` names a recipe both
have):

    python benchmarks/bench_startup.py [CHECKOUT ...] [--repeats 5] [--recipe recipes/starter.yaml]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "vllm", "google.genai")
REPORT = f"print(len(sys.modules), *[name for name in {HEAVY!r} if name in sys.modules])"
LOAD_RECIPE = "import sys; from pathlib import Path; from curate.recipe import load_recipe; " \
              "load_recipe(Path({recipe!r})); " + REPORT
LIST_STAGES = f"import sys; from click.testing import CliRunner; from curate.cli import main; " \
              f"assert CliRunner().invoke(main, ['stages']).exit_code == 0; {REPORT}"
# Without the editable install's finder: the checkout on PYTHONPATH is the curate that runs.
NO_EDITABLE_FINDER = ("import sys\nsys.meta_path[:] = [finder for finder in sys.meta_path\n"
                      "    if not getattr(finder, '__module__', '').startswith('__editable___curate')]\n")
SITE = Path(tempfile.mkdtemp(prefix="bench-startup-"))


def run(checkout: Path, args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds and stdout of `python ARGS` in `checkout`."""
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{SITE}", "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=checkout, env=env, capture_output=True, text=True,
                         check=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkouts", nargs="*", type=Path, default=[Path(__file__).resolve().parents[1]])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", default="recipes/starter.yaml", help="the recipe loaded, relative to each checkout")
    args = parser.parse_args()
    (SITE / "sitecustomize.py").write_text(NO_EDITABLE_FINDER)
    load = LOAD_RECIPE.format(recipe=args.recipe)
    commands = {"curate stages": ["-m", "curate", "stages"], f"load {args.recipe}": ["-c", load]}
    for checkout in args.checkouts:  # compile the bytecode before timing
        for command in commands.values():
            run(checkout, command)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for label, command in commands.items():
        times: dict[Path, list[tuple[float, float]]] = {checkout: [] for checkout in args.checkouts}
        for _ in range(args.repeats):
            for checkout in args.checkouts:
                times[checkout].append(run(checkout, command)[:2])
        for checkout, pairs in times.items():
            walls, cpus = zip(*pairs, strict=True)
            print(f"{label}  {checkout}: wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}), "
                  f"CPU median {statistics.median(cpus):.2f} s")
    for checkout in args.checkouts:
        stages, recipe = run(checkout, ["-c", LIST_STAGES])[2].split(), run(checkout, ["-c", load])[2].split()
        print(f"{checkout}: curate stages: {stages[0]} modules, heavy: {stages[1:] or 'none'}; "
              f"{args.recipe}: {recipe[0]} modules, heavy: {recipe[1:] or 'none'}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
