"""Pipeline scale: the CPU stages on 1k and 10k generated trajectories, side by side.

Each size runs in a fresh process (so peak RSS is that run's own) with the same
recipe and workers. Prints rows/s, the 10k/1k time ratio (target <= 11: linear
plus the fixed start-up) and the peak-RSS ratio (target <= 1.3: memory must not
grow with the dataset).

    python benchmarks/bench_pipeline.py [--sizes 1000 10000] [--workers 2]

With --s3 it runs one size twice instead, inputs and run directory on local disk, then both on a
local S3 API server (moto, started here on 127.0.0.1, as in the tests), and prints the time ratio:

    python benchmarks/bench_pipeline.py --s3 [--rows 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
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
manifest = LocalExecutor(load_recipe(Path(recipe)), out, workers=int(workers), cache_path=Path(cache),
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
    return run_recipe(str(data), str(scratch / f"run-{rows}"), workers, scratch, {})


def run_recipe(data: str, out: str, workers: int, scratch: Path, env: dict[str, str]) -> dict[str, float]:
    """The CPU stages on `data` into `out` (paths or URLs), in a fresh interpreter with `env` added."""
    recipe = scratch / f"recipe-{abs(hash(out))}.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bench", "input": {"paths": [data], "format": "messages"},
                                      "stages": CPU_STAGES, "output": {"kind": "sft"}, "batch_size": 256}))
    result = subprocess.run(
        [sys.executable, "-c", RUN_ONE, str(recipe), out, str(workers), str(scratch / "c.sqlite")],
        check=True, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_s3(rows: int, workers: int) -> None:
    """The same run on local disk and on a local S3 server, side by side."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import running_s3_server

    with tempfile.TemporaryDirectory() as tmp, running_s3_server() as (s3, _):
        scratch = Path(tmp)
        data = generate(rows, scratch / "data")
        with s3.environment():
            import fsspec

            fsspec.filesystem("s3").mkdir("bench")
        s3.upload(data, "s3://bench/raw/data.jsonl")
        local = run_recipe(str(data), str(scratch / "run-local"), workers, scratch, {})
        remote = run_recipe("s3://bench/raw/data.jsonl", "s3://bench/runs/s3", workers, scratch, s3.env)
    for label, r in (("local disk", local), ("S3 (moto)", remote)):
        print(f"pipeline {rows} rows, {label:>10}: {r['seconds']:7.2f} s  {rows / r['seconds']:8.1f} rows/s"
              f"  peak RSS {r['peak_mib']:7.1f} MiB")
    print(f"time ratio S3/local: {remote['seconds'] / local['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--s3", action="store_true", help="local disk vs a local S3 server, --rows rows")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    if args.s3:
        compare_s3(args.rows, args.workers)
        return
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
