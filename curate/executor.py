"""The local executor: stream the input in batches through the recipe's stages.

One loop owns what every stage shares: batching, statistics, progress bars,
the rejected-sample writer, commits and resume. Stages that only need CPU run
in `workers` processes, a batch per worker, so parsing and filtering overlap;
stateful, GPU and network stages run once, in this process, on each batch in
input order. At most `2 * workers` batches are in flight, so memory does not
grow with the input.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from curate import storage
from curate.cache import DEFAULT_CACHE_PATH
from curate.errors import UserError
from curate.formats import (Format, MalformedRow, count_records, get_format, input_files, raw_text, records,
                            sniff_format)
from curate.recipe import Recipe, StageSpec
from curate.rundir import Rejection, RunDir, RunState, StageStats, fingerprint
from curate.sample import Sample, content_id
from curate.stage import Stage, StageContext

READ_STAGE = "read"


class StageError(RuntimeError):
    """What either executor raises for any exception a stage raised on a batch: the batch is not committed, so
    rerunning the same command resumes before it. `one_line`: the cause says all there is to say (a
    UserError: a budget reached, an API still failing after its retries); else it is a bug worth its traceback."""

    def __init__(self, message: str, one_line: bool = False) -> None:
        super().__init__(message, one_line)  # both in args: the error travels pickled from Ray workers

    @property
    def one_line(self) -> bool:
        return bool(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])

    def with_resume_hint(self, run_dir: str) -> StageError:
        hinted = StageError(f"{self}; committed batches are kept in {run_dir}: run the same command again to resume",
                            self.one_line)
        hinted.__cause__ = self.__cause__
        return hinted


def stage_error(label: str, chunk: list[Sample], exc: BaseException) -> StageError:
    """`exc`, raised by stage `label` on `chunk`, as the executors report it."""
    if isinstance(exc, StageError):
        return exc
    if isinstance(exc, UserError):
        error = StageError(f"stage {label!r} stopped: {exc}", one_line=True)
    elif chunk:
        ids = ", ".join(sample.id for sample in chunk[:5]) + (" ..." if len(chunk) > 5 else "")
        error = StageError(f"stage {label!r} failed on a batch of {len(chunk)} rows ({ids}): {exc!r}")
    else:
        error = StageError(f"stage {label!r} failed: {exc!r}")
    error.__cause__ = exc
    return error


@dataclass(frozen=True)
class SourceReader:
    """One input file (a local path or a URL: each process opens it itself) and the format that parses its rows."""

    path: str
    format_name: str

    @property
    def format(self) -> Format:
        return get_format(self.format_name)


@dataclass
class BatchResult:
    kept: list[Sample]
    rejected: list[Rejection]
    stats: dict[str, StageStats]
    # The state of each stateful stage after this batch: committed with it, so a resume restores it.
    stage_states: dict[str, Any] = field(default_factory=dict)


Row = tuple[int, int, Any]  # (source index, row index in that file, raw record)


def source_readers(recipe: Recipe) -> list[SourceReader]:
    """The recipe's inputs, each with the format that parses its rows (sniffed where the recipe says `auto`)."""
    return [SourceReader(s.path, sniff_format(s.path) if s.format == "auto" else s.format) for s in recipe.inputs]


def input_rows(sources: list[SourceReader], skip: int = 0) -> Iterator[Row]:
    """Every raw row of the inputs, in order, after the first `skip`."""
    rows = (
        (source_index, row_index, record)
        for source_index, source in enumerate(sources)
        for row_index, record in enumerate(records(source.path))
    )
    return islice(rows, skip, None)


def record_bytes(record: Any) -> int:
    """About how many bytes a raw record holds: its strings and bytes, counted through dicts and lists."""
    if isinstance(record, str | bytes | bytearray):
        return len(record)
    if isinstance(record, dict):
        return sum(record_bytes(value) for value in record.values())
    if isinstance(record, list | tuple):
        return sum(record_bytes(value) for value in record)
    return 8


def take_batch(rows: Iterator[Row], max_rows: int, max_bytes: int) -> list[Row]:
    """The next batch: up to `max_rows` rows, fewer when their raw size reaches `max_bytes` (never none while
    rows are left), so that a batch of very large rows holds about `max_bytes`, not `max_rows` times a row."""
    batch: list[Row] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += record_bytes(row[2])
        if len(batch) >= max_rows or size >= max_bytes:
            break
    return batch


# --- pure functions shared by the driver and the workers --------------------


def parse_rows(sources: list[SourceReader], rows: list[Row]) -> BatchResult:
    """Raw rows -> Samples; a row that cannot be parsed is rejected by the `read` stage as `malformed`."""
    started = time.perf_counter()
    kept: list[Sample] = []
    rejected: list[Rejection] = []
    for source_index, row_index, record in rows:
        source = sources[source_index]
        file_name = storage.name(source.path)
        origin = {"file": file_name, "row": row_index}
        try:
            sample = source.format.parse(record, storage.parent(source.path))
        except MalformedRow as exc:
            raw = raw_text(record)
            bad = Sample(id=content_id(file_name, row_index, raw), source=file_name, meta={"input": origin, "raw": raw})
            rejected.append(Rejection(bad, READ_STAGE, "malformed", f"{file_name} row {row_index}: {exc}"))
            continue
        sample.meta["input"] = origin
        kept.append(sample)
    stats = StageStats(READ_STAGE, len(rows), len(kept), len(rejected), seconds=time.perf_counter() - started)
    stats.reasons.update(r.reason for r in rejected)
    return BatchResult(kept, rejected, {READ_STAGE: stats})


def apply_stages(stages: list[tuple[str, Stage]], samples: list[Sample]) -> BatchResult:
    """Run samples through stages in order; each stage sees only the survivors of the previous one."""
    rejected: list[Rejection] = []
    all_stats: dict[str, StageStats] = {}
    for label, stage in stages:
        stats = StageStats(label, rows_in=len(samples))
        started = time.perf_counter()
        survivors: list[Sample] = []
        for offset in range(0, len(samples), stage.batch_size):
            chunk = samples[offset : offset + stage.batch_size]
            try:
                verdicts = stage.process(chunk)
                if len(verdicts) != len(chunk):
                    raise RuntimeError(f"stage {label!r} returned {len(verdicts)} verdicts for {len(chunk)} samples")
            except Exception as exc:
                raise stage_error(label, chunk, exc) from exc
            for sample, verdict in zip(chunk, verdicts):
                if verdict.keep:
                    survivors.append(sample)
                else:
                    rejected.append(Rejection(sample, label, verdict.reason or label, verdict.detail))
                    stats.reasons[verdict.reason or label] += 1
        stats.kept, stats.rejected = len(survivors), len(samples) - len(survivors)
        stats.seconds = time.perf_counter() - started
        all_stats[label] = stats
        samples = survivors
    return BatchResult(samples, rejected, all_stats)


def merge_results(first: BatchResult, second: BatchResult) -> BatchResult:
    """`second` processed `first.kept`; the union is what the batch went through."""
    stats = dict(first.stats)
    for label, more in second.stats.items():
        if label in stats:  # the stage's preparation ran earlier, in a worker
            more.add(stats[label])
        stats[label] = more
    return BatchResult(second.kept, first.rejected + second.rejected, stats,
                       {**first.stage_states, **second.stage_states})


def prepare_stage(label: str | None, stage: Stage | None, samples: list[Sample]) -> dict[str, StageStats]:
    """Run a driver stage's `prepare` here (in a worker); its time counts toward that stage."""
    if label is None or stage is None:
        return {}
    started = time.perf_counter()
    stage.prepare(samples)
    return {label: StageStats(label, seconds=time.perf_counter() - started)}


# --- worker processes ---------------------------------------------------------

_worker_stages: dict[str, Stage] = {}


def _init_worker(specs: list[StageSpec], context: StageContext, prepare_only: set[str],
                 teardown_at_exit: bool = True) -> None:
    for spec in specs:
        stage = spec.build()
        _worker_stages[spec.label] = stage
        if spec.label in prepare_only:  # a driver stage's instance for `prepare`: options only, no heavy state
            continue
        stage.setup(context)
        if teardown_at_exit:
            # Finalize runs when a worker process exits normally, so stages release what they hold.
            multiprocessing.util.Finalize(None, stage.teardown, exitpriority=10)


def run_segment(stages: dict[str, Stage], labels: list[str], samples: list[Sample], prepare: str | None,
                before: BatchResult | None = None) -> BatchResult:
    """Stages `labels` on `samples`, then the preparation of the driver stage that follows them; stateful
    stages among them report their state after the batch. `before` is what the batch went through already."""
    result = apply_stages([(label, stages[label]) for label in labels], samples)
    result.stage_states = {label: stages[label].state_dict() for label in labels if stages[label].stateful}
    if before is not None:
        result = merge_results(before, result)
    result.stats.update(prepare_stage(prepare, stages.get(prepare or ""), result.kept))
    return result


def _worker_read_and_filter(sources: list[SourceReader], rows: list[Row], labels: list[str],
                            prepare: str | None) -> BatchResult:
    parsed = parse_rows(sources, rows)
    return run_segment(_worker_stages, labels, parsed.kept, prepare, parsed)


def _worker_filter(labels: list[str], samples: list[Sample], prepare: str | None) -> BatchResult:
    return run_segment(_worker_stages, labels, samples, prepare)


# --- the driver ----------------------------------------------------------------


def segments(specs: tuple[StageSpec, ...], stages: dict[str, Stage]) -> list[tuple[bool, list[str]]]:
    """Consecutive stages grouped by where they run: (in workers?, labels)."""
    groups: list[tuple[bool, list[str]]] = []
    for spec in specs:
        in_workers = stages[spec.label].runs_in_workers()
        if groups and groups[-1][0] == in_workers:
            groups[-1][1].append(spec.label)
        else:
            groups.append((in_workers, [spec.label]))
    return groups


class Executor:
    """What every executor shares: open or resume the run directory, commit each batch's result in input
    order (so `rows_done` is a prefix of the input and a killed run resumes right after it), finalise.
    Subclasses say where the stages run, in `_results`."""

    on_open: Callable[[], None] | None = None  # called once the run directory is opened (a checked run dir)

    def __init__(self, recipe: Recipe, run_dir: str | Path, workers: int = 1, cache_path: Path = DEFAULT_CACHE_PATH,
                 progress: bool = True) -> None:
        self.recipe = recipe
        self.run_dir = RunDir(run_dir)
        self.workers = max(1, workers)
        self.progress = progress
        # The cache and the scratch folder stay on local disk, whatever store the run directory is on.
        self.context = StageContext(cache_path=Path(cache_path), scratch_dir=storage.local_scratch(run_dir))
        self.sources = source_readers(recipe)

    def run(self, force: bool = False) -> dict[str, Any]:
        for spec in self.recipe.stages:  # e.g. no working sandbox: stop before the run directory is touched
            spec.build().preflight()
        # Every file each input resolves to (globs were expanded by the recipe; a registration names its files).
        inputs = fingerprint(file for source in self.sources for file in input_files(source.path))
        state = self.run_dir.open(self.recipe.sha256, self.recipe.resolved, inputs, force)
        if self.on_open is not None:  # e.g. the CLI's log, which may go into the run directory only now
            self.on_open()
        if self.run_dir.is_complete():
            return self.run_dir.manifest()
        if state.rows_done:
            state.resumed += 1
        labels = [READ_STAGE] + [spec.label for spec in self.recipe.stages]
        for label in labels:
            state.stats.setdefault(label, StageStats(label))
        self.context.scratch_dir.mkdir(parents=True, exist_ok=True)
        bars = self._progress_bars(labels, state)
        results = self._results(state)
        try:
            for result, rows in results:
                for label, stats in result.stats.items():
                    state.stats[label].add(stats)
                    bars[label].update(stats.rows_in)
                state.stage_states.update(result.stage_states)
                self.run_dir.commit_batch(state, result.kept, result.rejected, rows)
        except StageError as exc:
            raise exc.with_resume_hint(self.run_dir.location) from exc.__cause__
        finally:
            results.close()  # tears the stages down even when a commit failed
            for bar in bars.values():
                bar.close()
        settings = {spec.label: spec.build().settings() for spec in self.recipe.stages}
        return self.run_dir.finalize(state, self.recipe.output_kind, self.recipe.shard_rows, settings)

    def _results(self, state: RunState) -> Generator[tuple[BatchResult, int], None, None]:
        """Each batch's result with the number of input rows it covers, in input order, from `state.rows_done` on."""
        raise NotImplementedError

    def _progress_bars(self, labels: list[str], state: RunState) -> dict[str, tqdm]:
        counts = [count_records(s.path) for s in self.sources]
        total = None if None in counts else sum(counts)  # type: ignore[arg-type]
        return {
            label: tqdm(
                total=total if label == READ_STAGE else None,
                initial=state.stats[label].rows_in,
                desc=f"{label:>24}",
                unit="row",
                position=position,
                disable=not self.progress,
                leave=True,
                dynamic_ncols=True,
            )
            for position, label in enumerate(labels)
        }


class LocalExecutor(Executor):
    def _results(self, state: RunState) -> Generator[tuple[BatchResult, int], None, None]:
        # Every stage is built here to read its declarations; only those that run here are set up here.
        stages = {spec.label: spec.build() for spec in self.recipe.stages}
        plan = segments(self.recipe.stages, stages)
        local = {label: stages[label] for in_workers, group in plan if not in_workers for label in group}
        set_up: list[Stage] = []
        try:
            for label, stage in local.items():
                stage.setup(self.context)
                set_up.append(stage)
                if label in state.stage_states:
                    stage.load_state_dict(state.stage_states[label])
            # Workers also get the driver stages that prepare in them (e.g. image hashing before a dedup index).
            prepare_only = {label for label, stage in local.items() if stage.has_prepare()}
            worker_specs = [spec for spec in self.recipe.stages if spec.label not in local or spec.label in prepare_only]
            with self._pool(worker_specs, prepare_only) as pool:
                yield from self._batches(pool, plan, local, state)
        finally:
            for stage in reversed(set_up):  # a stage whose setup failed (a missing API key) has nothing to release
                stage.teardown()

    def _pool(self, worker_specs: list[StageSpec], prepare_only: set[str]) -> ProcessPoolExecutor | _InlinePool:
        if self.workers == 1:
            return _InlinePool(worker_specs, self.context, prepare_only)
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(worker_specs, self.context, prepare_only),
        )

    def _rows(self, skip: int) -> Iterator[Row]:
        return input_rows(self.sources, skip)

    def _batches(self, pool: Any, plan: list[tuple[bool, list[str]]], local: dict[str, Stage],
                 state: RunState) -> Iterator[tuple[BatchResult, int]]:
        """Submit batches to the workers (bounded), then finish each in order in this process."""
        first_in_workers = plan[0][1] if plan and plan[0][0] else []
        rest = plan[1:] if first_in_workers else plan

        def prepared_next(position: int) -> str | None:
            """The driver stage at rest[position], if it prepares in the workers."""
            if position < len(rest) and not rest[position][0] and local[rest[position][1][0]].has_prepare():
                return rest[position][1][0]
            return None

        rows = self._rows(state.rows_done)
        in_flight: list[tuple[Future[BatchResult], int]] = []
        while True:
            while len(in_flight) < 2 * self.workers:
                batch = take_batch(rows, self.recipe.batch_size, self.recipe.batch_bytes)
                if not batch:
                    break
                future = pool.submit(_worker_read_and_filter, self.sources, batch, first_in_workers, prepared_next(0))
                in_flight.append((future, len(batch)))
            if not in_flight:
                return
            future, count = in_flight.pop(0)
            result = future.result()
            for position, (in_workers, group) in enumerate(rest):
                if in_workers:
                    more = self._fan_out(pool, group, result.kept, prepared_next(position + 1))
                else:
                    more = run_segment(local, group, result.kept, None)  # reports the stateful stages' state
                result = merge_results(result, more)
            yield result, count

    def _fan_out(self, pool: Any, labels: list[str], samples: list[Sample], prepare: str | None) -> BatchResult:
        """Split one batch over the workers for a CPU segment that follows a driver stage."""
        size = max(1, -(-len(samples) // self.workers))
        futures = [pool.submit(_worker_filter, labels, samples[i : i + size], prepare) for i in range(0, len(samples), size)]
        results = [f.result() for f in futures]
        stats = {label: StageStats(label) for label in labels + ([prepare] if prepare else [])}
        for result in results:
            for label, s in result.stats.items():
                stats[label].add(s)
        return BatchResult(
            [s for r in results for s in r.kept], [rej for r in results for rej in r.rejected], stats
        )


class _InlinePool:
    """The pool interface, run in this process: `--workers 1` needs no processes."""

    def __init__(self, specs: list[StageSpec], context: StageContext, prepare_only: set[str]) -> None:
        self.specs, self.context, self.prepare_only = specs, context, prepare_only

    def __enter__(self) -> _InlinePool:
        _init_worker(self.specs, self.context, self.prepare_only, teardown_at_exit=False)
        return self

    def __exit__(self, *_: object) -> None:
        for label, stage in _worker_stages.items():
            if label not in self.prepare_only:
                stage.teardown()
        _worker_stages.clear()

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # surfaces at .result(), in batch order, as with a process pool
            future.set_exception(exc)
        return future
