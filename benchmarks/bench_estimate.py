"""`curate estimate` speed on the bundled sample's formats: rows per second, against reading alone.

Both recipes' inputs (messages, Metis-ColdStart, DeepEyes, Thyme, verl) are estimated with an empty cache
(every request rendered, bounded, keyed and looked up, as a run would) and, side by side in the same
process, only read and parsed; medians of `--repeats` interleaved rounds. Target: >= 1,000 rows/s.

    python benchmarks/bench_estimate.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from curate import storage
from curate.estimate import estimate
from curate.formats import MalformedRow, get_format, records, sniff_format
from curate.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def read_only(recipe: Recipe) -> int:
    rows = 0
    for source in recipe.inputs:
        reader = get_format(sniff_format(source.path) if source.format == "auto" else source.format)
        for record in records(source.path):
            rows += 1
            try:
                reader.parse(record, storage.parent(source.path))
            except MalformedRow:
                continue
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    recipes = [load_recipe(RECIPES / name) for name in ("metis_sft.yaml", "metis_rl.yaml")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "empty.sqlite"
        for recipe in recipes:  # warm: imports, rubric loading, the schema cache
            estimate(recipe, cache)
        estimated, read = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            rows = sum(estimate(recipe, cache).rows for recipe in recipes)
            estimated.append(rows / (time.perf_counter() - started))
            started = time.perf_counter()
            read_rows = sum(read_only(recipe) for recipe in recipes)
            read.append(read_rows / (time.perf_counter() - started))
    e, r = statistics.median(estimated), statistics.median(read)
    print(f"estimate: {e:,.0f} rows/s (target >= 1,000); reading alone: {r:,.0f} rows/s; "
          f"estimate / reading: {e / r:.2f} ({rows} rows, medians of {args.repeats})")


if __name__ == "__main__":
    main()
