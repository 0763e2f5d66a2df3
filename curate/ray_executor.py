"""The Ray executor: the same recipe, stages and run directory as the local executor, on a Ray cluster.

Ray Data streams the input through the recipe as a pipeline of operators, with its own scheduling and
backpressure (a slow GPU stage holds back the readers instead of letting batches pile up in memory):

    read (one task per input file) -> parse + CPU stages (tasks, or actors when a stage holds state)
        -> each driver stage as its own actor pool (GPU stages get num_gpus) -> ... -> this process

One Ray row is one batch of the recipe's `batch_size` input rows: first the raw rows, then the batch's
`BatchResult` (survivors, rejections with their reasons, per-stage counters). Carrying the whole batch
keeps every rejected sample and every counter with its rows, so this process commits exactly what the
local executor commits, in input order (Ray Data's `preserve_order`), and a killed run resumes after the
last committed batch, whichever executor started it.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import traceback
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.cache import DEFAULT_CACHE_PATH
from curate.errors import UserError
from curate.executor import (
    BatchResult,
    Executor,
    SourceReader,
    StageError,
    parse_rows,
    run_segment,
    segments,
    stage_error,
    take_batch,
)
from curate.formats import count_records, records
from curate.recipe import Recipe, StageSpec
from curate.rundir import RunState
from curate.stage import Stage, StageContext

# Settings the stages read in the workers (endpoints, regions, model and cache folders, where third-party stages
# are imported from); a cluster started elsewhere does not have the driver's environment, so they travel in the
# job's runtime_env. Secrets never do: Ray shows a job's runtime_env on its dashboard and in its job records.
# The workers read API keys and cloud credentials from their own environment (the cluster's configuration).
FORWARDED_ENV_PREFIXES = ("CURATE_", "GEMINI_", "GOOGLE_", "OPENAI_", "HF_", "TRANSFORMERS_", "VLLM_", "PYTHONPATH",
                          "AWS_", "FSSPEC_")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SESSION|AUTH", re.IGNORECASE)


def forwarded_environment(environment: dict[str, str]) -> dict[str, str]:
    """The driver's variables a job's workers get: the stages' settings, without any that looks like a secret."""
    return {name: value for name, value in environment.items()
            if name.startswith(FORWARDED_ENV_PREFIXES) and not SECRET_NAME.search(name)}


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # Ray Data is the part of Ray this executor needs
    except ImportError as exc:
        raise UserError(
            "--executor ray needs Ray Data: pip install 'curate-tooluse[ray]' (or pip install 'ray[data]')"
        ) from exc
    return ray


# --- one Ray row: a batch --------------------------------------------------------


def envelope(rows: int, payload: Any) -> pa.Table:
    """A one-row block: how many input rows the batch covers, and what it carries so far."""
    return pa.table({"rows": pa.array([rows], pa.int64()), "payload": pa.array([pickle.dumps(payload)], pa.binary())})


def row_count(path: str) -> int:
    counted = count_records(path)
    return counted if counted is not None else sum(1 for _ in records(path))


@dataclass
class Failure:
    """An error the user must see as it is (a stage's, or a one-line UserError), carried to the driver as data:
    Ray's own error path would pickle it into a wrapper and lose it. It travels in input order, so the
    batches before it are committed and a rerun resumes there."""

    error: Exception
    traceback: str


class RemoteTraceback(Exception):
    def __str__(self) -> str:
        return str(self.args[0])


def failure(exc: Exception) -> Failure:
    return Failure(exc, "".join(traceback.format_exception(exc.__cause__ or exc)))


def read_batches(source_index: int, source: SourceReader, skip: int, batch_rows: int,
                 batch_bytes: int = 64 << 20) -> Iterator[pa.Table]:
    """The file's rows from `skip` on, in batches of at most `batch_rows` rows and about `batch_bytes` (a
    generator, so Ray streams a large file block by block)."""
    numbered = islice(enumerate(records(source.path)), skip, None)
    rows = ((source_index, row_index, record) for row_index, record in numbered)
    try:
        while batch := take_batch(rows, batch_rows, batch_bytes):
            yield envelope(len(batch), batch)
    except UserError as exc:  # an unreadable file: its one-line message, after the rows before it
        yield envelope(0, failure(exc))


def input_datasource(sources: list[SourceReader], batch_rows: int, skip: int, batch_bytes: int = 64 << 20) -> Any:
    """A Ray Data source with one read task per input file, skipping the first `skip` rows of the input;
    None when every row is committed already. The files are counted once, here."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    tasks = []
    to_skip = skip
    for index, source in enumerate(sources):
        # Files are counted only to skip what a killed run committed: a fresh run reads each file once, in its
        # read task, on a worker.
        count = row_count(source.path) if to_skip else count_records(source.path)
        if to_skip and to_skip >= count:  # this file was committed whole before the run was stopped
            to_skip -= count
            continue
        batches = None if count is None else math.ceil((count - to_skip) / batch_rows)
        metadata = BlockMetadata(num_rows=batches, size_bytes=storage.size(source.path), input_files=[source.path],
                                 exec_stats=None)
        tasks.append(ReadTask(lambda i=index, s=source, k=to_skip: read_batches(i, s, k, batch_rows, batch_bytes),
                              metadata))
        to_skip = 0
    if not tasks:
        return None

    class InputBatches(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(task.metadata.size_bytes for task in tasks)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return tasks

    return InputBatches()


# --- what runs in the workers ----------------------------------------------------


class Segment:
    """Consecutive stages applied to each batch in one worker: the parse of raw rows when first, the stages,
    then the preparation of the driver stage that follows. As a Ray Data actor it sets its stages up once."""

    def __init__(self, specs: list[StageSpec], labels: list[str], prepare: str | None, context: StageContext,
                 sources: list[SourceReader] | None = None, states: dict[str, Any] | None = None) -> None:
        self.labels, self.prepare, self.sources = labels, prepare, sources
        self.stages: dict[str, Stage] = {spec.label: spec.build() for spec in specs}
        self.set_up: list[Stage] = []
        self.setup_failure: Failure | None = None
        try:
            for label in labels:  # the prepared stage only lends its options: it is never set up here
                self.stages[label].setup(context)
                self.set_up.append(self.stages[label])
                if states and label in states:
                    self.stages[label].load_state_dict(states[label])
        except UserError as exc:  # e.g. a missing API key: reported with the first batch, as one line
            self.setup_failure = failure(UserError(
                f"on a Ray worker ({os.uname().nodename}): {exc}; the cluster's workers read secrets from their own "
                "environment, never from the job's: set it where the cluster is started"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        return {"rows": list(batch["rows"]), "payload": [pickle.dumps(self.advance(pickle.loads(p)))
                                                         for p in batch["payload"]]}

    def advance(self, carried: Any) -> BatchResult | Failure:
        if isinstance(carried, Failure):
            return carried
        if self.setup_failure is not None:
            return self.setup_failure
        try:
            before: BatchResult = parse_rows(self.sources, carried) if self.sources is not None else carried
            return run_segment(self.stages, self.labels, before.kept, self.prepare, before)
        except (StageError, UserError) as exc:  # a stage's exception (as the local executor has it), a reader's stop
            return failure(exc)
        except Exception as exc:  # a reader's or a preparation's: the same type, so the driver reports it alike
            return failure(stage_error(self.labels[0] if self.labels else "read", [], exc))

    def teardown(self) -> None:
        while self.set_up:
            self.set_up.pop().teardown()

    def __del__(self) -> None:  # Ray Data drops an actor's UDF on graceful shutdown
        self.teardown()


def segment_task(batch: dict[str, np.ndarray], **segment: Any) -> dict[str, list[Any]]:
    """A segment of stages without state worth keeping: built per task, cheap, and Ray may run it anywhere."""
    runner = Segment(**segment)
    try:
        return runner(batch)
    finally:
        runner.teardown()


# --- the plan: which operator runs which stages, and where ------------------------


@dataclass
class Operator:
    labels: list[str]
    prepare: str | None
    parse: bool
    actors: tuple[int, int] | None  # the actor pool's (min, max) size; None: stateless tasks
    num_cpus: float
    num_gpus: float = 0.0
    stateful: bool = False  # sees every batch in input order, one at a time, and is never restarted


def plan_operators(specs: tuple[StageSpec, ...], stages: dict[str, Stage], workers: int,
                   cluster_gpus: float) -> list[Operator]:
    """CPU segments become tasks (an autoscaling actor pool when a stage has setup state, e.g. a sandbox pool);
    every driver stage becomes its own actor pool sized from its declared resources."""
    groups = segments(specs, stages)
    ops: list[Operator] = []
    if not groups or not groups[0][0]:
        ops.append(Operator([], None, True, None, 1.0))  # parse in a task even when a driver stage is first
    for in_workers, labels in groups:
        if in_workers:
            group = [stages[label] for label in labels]
            has_state = any(type(stage).setup is not Stage.setup for stage in group)
            ops.append(Operator(labels, None, not ops, (1, workers) if has_state else None,
                                max(stage.resources.cpus for stage in group)))
            continue
        for label in labels:
            stage, resources = stages[label], stages[label].resources
            if resources.gpus and not stage.stateful:
                size = max(1, int(cluster_gpus // resources.gpus))  # one instance per GPU (or tensor-parallel group)
                ops.append(Operator([label], None, False, (size, size), resources.cpus, resources.gpus))
            else:
                # One instance per run (a stateful index, a rate-limited client, a model on the CPU). It asks Ray
                # for no CPU: the pipeline cannot flow without it, so it must never wait behind the CPU workers.
                ops.append(Operator([label], None, False, (1, 1), 0.0, stateful=stage.stateful))
    for previous, following in pairwise(ops):
        # A driver stage's stateless preparation runs in the CPU operator before it, as in the local executor.
        previous_on_cpu = not previous.labels or stages[previous.labels[0]].runs_in_workers()
        if previous_on_cpu and stages[following.labels[0]].has_prepare():
            previous.prepare = following.labels[0]
    return ops


# --- the executor -----------------------------------------------------------------


class RayExecutor(Executor):
    """`curate run --executor ray [--address ADDR]`: Ray Data runs the stages, this process commits."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, workers: int | None = None,
                 cache_path: Path = DEFAULT_CACHE_PATH, progress: bool = True, address: str | None = None) -> None:
        super().__init__(recipe, run_dir, workers or 1, cache_path, progress)
        self.workers_given = workers  # None: as many as the cluster has CPUs
        self.address = address

    def _results(self, state: RunState) -> Generator[tuple[BatchResult, int], None, None]:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            env = forwarded_environment(dict(os.environ))
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env} if env else None)
        try:
            yield from self._stream(ray, state)
        finally:
            if started_here:
                ray.shutdown()

    def _stream(self, ray: Any, state: RunState) -> Iterator[tuple[BatchResult, int]]:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # commits must follow the input order
        context.enable_progress_bars = False  # the funnel's bars, updated at each commit, say the same
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        reads = input_datasource(self.sources, self.recipe.batch_size, state.rows_done, self.recipe.batch_bytes)
        if reads is None:
            return
        dataset = ray.data.read_datasource(reads)
        stages = {spec.label: spec.build() for spec in self.recipe.stages}
        cluster = ray.cluster_resources()
        workers = self.workers_given or max(1, int(cluster.get("CPU", 1)))  # None given: the cluster's CPUs
        for op in plan_operators(self.recipe.stages, stages, workers, cluster.get("GPU", 0)):
            dataset = self._add(ray, dataset, op, state, workers)
        for row in dataset.iter_rows():
            result = pickle.loads(row["payload"])
            if isinstance(result, Failure):
                raise result.error from RemoteTraceback(result.traceback)
            yield result, int(row["rows"])

    def _add(self, ray: Any, dataset: Any, op: Operator, state: RunState, workers: int) -> Any:
        specs = [spec for spec in self.recipe.stages if spec.label in op.labels or spec.label == op.prepare]
        segment = {"specs": specs, "labels": op.labels, "prepare": op.prepare, "context": self.context,
                   "sources": self.sources if op.parse else None}
        resources = {"num_cpus": op.num_cpus, "num_gpus": op.num_gpus or None}
        if op.actors is None:
            return dataset.map_batches(segment_task, batch_size=1, fn_kwargs=segment,
                                       compute=ray.data.TaskPoolStrategy(size=workers), **resources)
        states = {label: state.stage_states[label] for label in op.labels if label in state.stage_states}
        with warnings.catch_warnings():
            # max_restarts and allow_out_of_order_execution have no named parameter yet (Ray 2.60): they still
            # go as plain remote arguments.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            return dataset.map_batches(
                Segment, batch_size=1, fn_constructor_kwargs={**segment, "states": states},
                compute=ray.data.ActorPoolStrategy(min_size=op.actors[0], max_size=op.actors[1]),
                # A restarted stateful actor would have lost its index: fail instead, and resume from the commit.
                max_restarts=0 if op.stateful else -1,
                # Ray Data lets actor tasks run out of order (it reorders only the outputs): a stateful stage
                # must see the batches in input order, as in the local executor.
                allow_out_of_order_execution=not op.stateful, **resources,
            )
