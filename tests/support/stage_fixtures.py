"""Small stages used by the executor tests (importable, so spawned workers find them)."""

from __future__ import annotations

import hashlib
import os
import time

from pydantic import Field

from curate.sample import Sample
from curate.stage import KEEP, Stage, StageOptions, Verdict, reject


class HashBucket(Stage):
    """Rejects samples whose id hash falls in bucket 0 of `buckets`; annotates the bucket."""

    name = "hash_bucket"

    class Options(StageOptions):
        buckets: int = Field(default=3, gt=0, description="number of buckets")

    def check(self, sample: Sample) -> Verdict:
        bucket = int(hashlib.sha256(sample.id.encode()).hexdigest(), 16) % self.options.buckets
        sample.meta[self.name] = {"bucket": bucket}
        return reject("bucket_zero", f"bucket {bucket}") if bucket == 0 else KEEP


class FirstN(Stage):
    """Keeps the first `n` rows it sees over the whole run: stateful and order-sensitive."""

    name = "first_n"
    stateful = True

    class Options(StageOptions):
        n: int = 10

    def setup(self, context: object) -> None:
        self.seen = 0

    def check(self, sample: Sample) -> bool:
        self.seen += 1
        return self.seen <= self.options.n

    def state_dict(self) -> int:
        return self.seen

    def load_state_dict(self, state: int) -> None:
        self.seen = state


class Explode(Stage):
    """Raises on a sample whose question contains `marker`."""

    name = "explode"

    class Options(StageOptions):
        marker: str = "BOOM"

    def check(self, sample: Sample) -> bool:
        if self.options.marker in sample.question:
            raise ValueError(f"exploded on {sample.id}")
        return True


class RecordedVsActual(Stage):
    """Annotates each python call's recorded observation against a stand-in 'actual' output (the observation
    with digits shifted) and rejects when they differ: the shape a re-executing stage gives the inspector."""

    name = "recorded_vs_actual"

    def check(self, sample: Sample) -> Verdict:
        comparisons = []
        for position, call in sample.indexed_tool_calls:
            recorded = sample.messages[position + 1].text if position + 1 < len(sample.messages) else ""
            actual = "".join(str((int(c) + 1) % 10) if c.isdigit() else c for c in recorded)
            comparisons.append({"call": position, "recorded": recorded, "actual": actual})
        sample.meta[self.name] = {"comparisons": comparisons, "score": len(comparisons)}
        differ = [c for c in comparisons if c["recorded"] != c["actual"]]
        return reject("mismatch", f"call {differ[0]['call']} differs") if differ else KEEP


class PreparedInWorkers(Stage):
    """Stateful (runs in the driver) with a `prepare` step: records which process did which part."""

    name = "prepared_in_workers"
    stateful = True

    def prepare(self, batch: list[Sample]) -> None:
        for sample in batch:
            sample.meta[self.name] = {"prepared_in": os.getpid()}

    def check(self, sample: Sample) -> bool:
        sample.meta.setdefault(self.name, {})["processed_in"] = os.getpid()
        return "prepared_in" in sample.meta[self.name]


class Slow(Stage):
    """Sleeps per batch, so a test can stop a run part-way through."""

    name = "slow"

    class Options(StageOptions):
        seconds: float = 0.3

    def process(self, batch: list[Sample]) -> list[Verdict]:
        time.sleep(self.options.seconds)
        return [KEEP] * len(batch)


class Misbehave(Stage):
    """On a batch holding a sample whose question contains `marker`: `count` returns one verdict too few (a
    stage's bug), `transient` raises what an API still failing after its retries raises."""

    name = "misbehave"

    class Options(StageOptions):
        marker: str = "BOOM"
        mode: str = "count"

    def process(self, batch: list[Sample]) -> list[Verdict]:
        from curate.retry import TransientFailure

        if any(self.options.marker in sample.question for sample in batch):
            if self.options.mode == "transient":
                raise TransientFailure("gemini g failed after 6 attempts: HTTP 503 UNAVAILABLE")
            return [KEEP] * (len(batch) - 1)
        return [KEEP] * len(batch)


class DiesOnItsSecondBatch(Stage):
    """Stateful: counts the batches it has seen and ends its own process on the second, as a crashed worker would.
    A fresh instance (a restarted actor) would count from zero again and never die."""

    name = "dies_on_its_second_batch"
    stateful = True

    def setup(self, context: object) -> None:
        self.batches = 0

    def process(self, batch: list[Sample]) -> list[Verdict]:
        self.batches += 1
        if self.batches == 2:
            os._exit(1)
        return [KEEP] * len(batch)

    def state_dict(self) -> int:
        return self.batches

    def load_state_dict(self, state: int) -> None:
        self.batches = state
