"""Ray executor vs local executor: the CPU stages on generated trajectories, side by side on this machine.

Each executor runs in a fresh process with the same recipe, input and worker count. Prints the wall time
of each (Ray's also without its cluster start), the overhead ratio Ray/local, and the peak memory of each
whole process tree (driver, worker processes, and for Ray its GCS, raylet and object store), summed as
PSS so pages shared between processes (the object store, forked interpreters) count once.

    python benchmarks/bench_ray.py [--rows 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from bench_pipeline import CPU_STAGES, REPO, generate

RUN_ONE = """
import json, sys, time
from pathlib import Path
from benchmarks.process_tree import peak_memory_sampler

peak_mib = peak_memory_sampler(pss=True, every=0.25)
executor, recipe, out, workers, cache = sys.argv[1:6]
from curate.recipe import load_recipe
started = time.perf_counter()
if executor == "ray":
    import ray
    from curate.ray_executor import RayExecutor
    ray.init(num_cpus=int(workers), include_dashboard=False, logging_level="error")
    cluster_start = time.perf_counter() - started
    runner = RayExecutor(load_recipe(Path(recipe)), Path(out), int(workers), Path(cache), progress=False)
else:
    from curate.executor import LocalExecutor
    cluster_start = 0.0
    runner = LocalExecutor(load_recipe(Path(recipe)), Path(out), int(workers), Path(cache), progress=False)
manifest = runner.run()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "cluster_start": cluster_start, "peak_mib": peak_mib(),
                  "rows": manifest["input_rows"], "kept": manifest["kept_rows"]}))
"""


def measure(executor: str, recipe: Path, workers: int, scratch: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", RUN_ONE, executor, str(recipe), str(scratch / f"run-{executor}"), str(workers),
         str(scratch / f"cache-{executor}.sqlite")],
        check=True, cwd=REPO, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = generate(args.rows, scratch / "data")
        recipe = scratch / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "bench_ray", "input": {"paths": [str(data)], "format": "messages"},
                                          "stages": CPU_STAGES, "output": {"kind": "sft"}, "batch_size": 256}))
        local = measure("local", recipe, args.workers, scratch)
        on_ray = measure("ray", recipe, args.workers, scratch)
    assert (local["rows"], local["kept"]) == (on_ray["rows"], on_ray["kept"]), (local, on_ray)
    pipeline = on_ray["seconds"] - on_ray["cluster_start"]
    print(f"{args.rows} rows, {args.workers} workers, stages: image_integrity, image_dedup, format")
    print(f"local executor: {local['seconds']:7.2f} s  {args.rows / local['seconds']:7.1f} rows/s"
          f"  peak PSS {local['peak_mib']:7.1f} MiB")
    print(f"ray executor:   {on_ray['seconds']:7.2f} s  ({on_ray['cluster_start']:.2f} s cluster start,"
          f" {pipeline:.2f} s pipeline)  {args.rows / on_ray['seconds']:7.1f} rows/s  peak PSS {on_ray['peak_mib']:7.1f} MiB")
    print(f"time ratio ray/local: {on_ray['seconds'] / local['seconds']:.2f} (pipeline only: {pipeline / local['seconds']:.2f})")
    print(f"peak memory ratio ray/local: {on_ray['peak_mib'] / local['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
