"""`curate estimate`: what a recipe's paid stages would cost, before anything is sent.

Every input row is read and parsed as a run reads it, and every paid stage renders the requests it would
send for it, exactly as in a run (the same bounds, the same cache keys); requests the cache already holds
are left out. A stage is paid when it declares `cost_estimate(cache)` and that returns an estimator (the
judge stages on a paid backend do). Earlier stages do not run: a row they would reject is counted anyway,
so the figures are an upper bound of what reaches each paid stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from curate.cache import Cache
from curate.executor import input_rows, parse_rows, source_readers, take_batch
from curate.recipe import Recipe
from curate.stage.cost import CostEstimator, StageCost


@dataclass
class Estimate:
    rows: int = 0
    malformed: int = 0
    seconds: float = 0.0
    stages: list[StageCost] = field(default_factory=list)


def estimate(recipe: Recipe, cache_path: Path) -> Estimate:
    stages = [stage for stage in (spec.build() for spec in recipe.stages) if hasattr(stage, "cost_estimate")]
    result = Estimate()
    started = time.perf_counter()
    with Cache(cache_path) as cache:
        estimators: list[CostEstimator] = [e for e in (stage.cost_estimate(cache) for stage in stages) if e is not None]
        sources = source_readers(recipe)
        rows = input_rows(sources)
        while batch := take_batch(rows, recipe.batch_size, recipe.batch_bytes):
            parsed = parse_rows(sources, batch)  # in the run's batches, as the run reads them
            result.rows += len(batch)
            result.malformed += len(parsed.rejected)  # the run rejects them at `read`: no request
            for sample in parsed.kept:
                for estimator in estimators:
                    estimator.add(sample)
    result.seconds = time.perf_counter() - started
    result.stages = [estimator.cost for estimator in estimators]
    return result
