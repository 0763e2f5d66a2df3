"""Pipeline scale: the CPU stages on 1k and 10k generated trajectories, side by side.

Each size runs in a fresh process (so peak RSS is that run's own) with the same
recipe and workers. Prints rows/s, the 10k/1k time ratio (target <= 11: linear
plus the fixed start-up) and the peak-RSS ratio (target <= 1.3: memory must not
grow with the dataset).

    python benchmarks/bench_pipeline.py [--sizes 1000 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CPU_STAGES = [{"image_integrity": {}}, {"image_dedup": {}}, {"format": {}}]

# Runs one recipe in a fresh interpreter; reports wall time and the peak summed RSS of it and its workers.
RUN_ONE = """
import json, sys, time
from pathlib import Path
from benchmarks.process_tree import peak_memory_sampler
from curate.executor import LocalExecutor
from curate.recipe import load_recipe

peak_mib = peak_memory_sampler()
recipe, out, workers, cache = sys.argv[1:5]
started = time.perf_counter()
manifest = LocalExecutor(load_recipe(Path(recipe)), Path(out), workers=int(workers), cache_path=Path(cache),
                         progress=False).run()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_mib": peak_mib(), "rows": manifest["input_rows"],
                  "kept": manifest["kept_rows"]}))
"""

def generate(rows: int, folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "curate.samples.generate", "--rows", str(rows), "--kind", "sft", "--format", "messages",
         "--out", str(folder)],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )
    (path,) = folder.glob("*.jsonl")
    return path


def measure(rows: int, workers: int, scratch: Path) -> dict[str, float]:
    data = generate(rows, scratch / f"data-{rows}")
    recipe = scratch / f"recipe-{rows}.yaml"
    recipe.write_text(yaml.safe_dump({"name": f"bench{rows}", "input": {"paths": [str(data)], "format": "messages"},
                                      "stages": CPU_STAGES, "output": {"kind": "sft"}, "batch_size": 256}))
    result = subprocess.run(
        [sys.executable, "-c", RUN_ONE, str(recipe), str(scratch / f"run-{rows}"), str(workers), str(scratch / "c.sqlite")],
        check=True, cwd=REPO, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    small, large = args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: measure(n, args.workers, Path(tmp)) for n in (small, large)}
    for n, r in results.items():
        print(f"pipeline {n:>6} rows: {r['seconds']:7.2f} s  {n / r['seconds']:8.1f} rows/s  peak RSS {r['peak_mib']:7.1f} MiB")
    time_ratio = results[large]["seconds"] / results[small]["seconds"]
    rss_ratio = results[large]["peak_mib"] / results[small]["peak_mib"]
    print(f"time ratio {large}/{small}: {time_ratio:.2f} (target <= 11)")
    print(f"peak RSS ratio {large}/{small}: {rss_ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
