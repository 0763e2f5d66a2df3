"""Pipeline scale: the CPU stages on 1k and 10k generated trajectories, side by side.

Each size runs in a fresh process (so peak RSS is that run's own) with the same
recipe and workers. Prints rows/s, the 10k/1k time ratio (target <= 11: linear
plus the fixed start-up) and the peak-RSS ratio (target <= 1.3: memory must not
grow with the dataset).

    python benchmarks/bench_pipeline.py [--sizes 1000 10000] [--workers 2]

With --realistic the rows are Metis-ColdStart-shaped instead (one parquet file in row groups of 64, about
40 KB of reasoning and 4 images a row, the `format` stage alone, batches of 256), and it prints the peak RSS
of the driver and of the largest worker at each size (target: driver ratio <= 1.2):

    python benchmarks/bench_pipeline.py --realistic [--sizes 1000 10000] [--workers 2]

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

# Runs one recipe in a fresh interpreter; reports wall time and the peak RSS of the driver, of its largest worker
# and of all of them together (`peak_mib`).
RUN_ONE = """
import json, sys, time
from pathlib import Path
from benchmarks.process_tree import peak_memory_by_process
from curate.executor import LocalExecutor
from curate.recipe import load_recipe

peaks = peak_memory_by_process()
recipe, out, workers, cache = sys.argv[1:5]
started = time.perf_counter()
manifest = LocalExecutor(load_recipe(Path(recipe)), out, workers=int(workers), cache_path=Path(cache),
                         progress=False).run()
seconds = time.perf_counter() - started
peak = peaks()
print(json.dumps({"seconds": seconds, **peak, "peak_mib": peak["total"], "rows": manifest["input_rows"],
                  "kept": manifest["kept_rows"]}))
"""


def metis_rows(rows: int, path: Path, text_kb: int = 40, images: int = 4) -> Path:
    """A Metis-ColdStart parquet file: `messages` a JSON string with `text_kb` KB of reasoning, `images` base64
    JPEGs of noise (incompressible, ~12 KB each), row groups of 64 rows, as the real dataset is stored."""
    import base64
    import io
    import random

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(seed: int) -> str:
        pixels = np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        return base64.b64encode(buffer.getvalue()).decode()

    pool = [jpeg(seed) for seed in range(16)]
    words = "the bar chart shows values rising steadily across each quarter so we compare the heights".split()
    chooser = random.Random(0)
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("messages", pa.string()),
                        ("images", pa.list_(pa.string())), ("answer", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 64):
            group = []
            for index in range(start, min(rows, start + 64)):
                reasoning = " ".join(chooser.choice(words) for _ in range(text_kb * 1024 // 6))
                code = f"print(image_1.size, {index})"
                turns = [
                    {"role": "user", "content": "<image>" * images + f"Question {index}: what is the tallest bar?"},
                    {"role": "assistant", "content": f"<think>{reasoning}</think>\n<tool_call>"
                     + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>"},
                    {"role": "user", "content": f"<tool_response>(96, 96) {index}</tool_response>"},
                    {"role": "assistant", "content": "<think>The crop confirms it.</think><answer>60</answer>"},
                ]
                group.append({"id": f"row-{index:07d}", "source": "bench", "messages": json.dumps(turns),
                              "images": [pool[(index + k) % len(pool)] for k in range(images)],
                              "answer": json.dumps("60")})
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
    return path


def measure_realistic(rows: int, workers: int, scratch: Path) -> dict[str, float]:
    data = metis_rows(rows, scratch / f"metis-{rows}.parquet")
    recipe = scratch / f"realistic-{rows}.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bench", "input": {"paths": [str(data)], "format": "metis_coldstart"},
                                      "stages": [{"format": {}}], "output": {"kind": "sft"}, "batch_size": 256}))
    result = subprocess.run(
        [sys.executable, "-c", RUN_ONE, str(recipe), str(scratch / f"run-{rows}"), str(workers),
         str(scratch / "c.sqlite")], check=True, cwd=REPO, capture_output=True, text=True)
    data.unlink()
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_realistic(small: int, large: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: measure_realistic(n, workers, Path(tmp)) for n in (small, large)}
    for n, r in results.items():
        print(f"realistic {n:>6} rows ({r['kept']} kept): {r['seconds']:7.1f} s  peak RSS driver {r['driver']:7.1f} MiB"
              f"  largest worker {r['worker']:7.1f} MiB  all {r['total']:7.1f} MiB")
    for role in ("driver", "worker", "total"):
        print(f"peak RSS ratio {large}/{small}, {role}: {results[large][role] / results[small][role]:.2f}"
              + (" (target <= 1.2)" if role == "driver" else ""))


def generate(rows: int, folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "curate_testkit.sample_generator", "--rows", str(rows), "--kind", "sft", "--format", "messages",
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
    from curate_testkit.s3_server import running_s3_server

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
    parser.add_argument("--realistic", action="store_true", help="Metis-ColdStart-shaped rows, the format stage")
    args = parser.parse_args()
    if args.realistic:
        compare_realistic(*args.sizes, args.workers)
        return
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
