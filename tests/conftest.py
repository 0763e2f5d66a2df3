"""Shared fixtures: small real input files and the accounting check every run must pass."""

from __future__ import annotations

import os

# Under pytest-xdist the workers share the cores: each gets its share of torch's threads, and so do the processes it
# starts (before anything imports torch), rather than every worker spinning one thread per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import base64
import contextlib
import fcntl
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from curate_testkit.harness import run_curate
from curate_testkit.pictures import png_bytes

from curate.sample import Sample
from curate.stage import Stage, StageContext, Verdict

REPO = Path(__file__).resolve().parent.parent


def bundled_recipe_data(name: str) -> dict[str, Any]:
    """A bundled recipe's YAML with every file path it names (inputs, evaluation sets) made absolute, so a test can
    change it and write it anywhere."""
    import yaml

    folder = REPO / "recipes"
    data = yaml.safe_load((folder / f"{name}.yaml").read_text())
    data["input"]["paths"] = [{**p, "path": str((folder / p["path"]).resolve())} for p in data["input"]["paths"]]
    for stage in data["stages"]:
        for benchmark in ((stage.get("decontaminate") or {}).get("benchmarks") or {}).values():
            benchmark["paths"] = [str((folder / path).resolve()) for path in benchmark["paths"]]
    return data


# Tests whose expensive state lives in one process run on one xdist worker (`--dist loadgroup`): the bundled
# sample's probe answers (the session's `probe_cache`, computed by the first run of each recipe) and the Ray cluster
# (a test that starts one of its own is marked `xdist_group(ONE_WORKER)` too: one local cluster at a time).
ONE_WORKER = "shared-state"
SHARED_STATE_FIXTURES = {"probe_cache", "cluster"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SHARED_STATE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(ONE_WORKER))


@pytest.fixture(autouse=True)
def alone_under_xdist(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A test marked `alone` checks processes machine-wide (the sandbox attack tests: no process of a sandbox's
    uids is left): under pytest-xdist it holds this lock exclusively and every other test holds it shared, so no
    other worker's test runs beside it."""
    if not hasattr(request.config, "workerinput"):
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "alone.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if request.node.get_closest_marker("alone") else fcntl.LOCK_SH)
        yield


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's (the dev extra)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker a core, at most four, and at most one per 6 GiB of memory (a test with a vLLM engine
    holds about 4.5 GiB)."""
    import psutil

    return max(1, min(os.cpu_count() or 1, 4, psutil.virtual_memory().total // (6 << 30)))


def messages_row(index: int, question: str | None = None) -> dict[str, Any]:
    """A generic `messages` row: question with an image, one python call, its observation, an answer."""
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(index)).decode()
    return {
        "id": f"row-{index:05d}",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question or f"What is {index} + 1?"}]},
            {
                "role": "assistant",
                "content": "Let me compute.",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "python", "arguments": json.dumps({"code": f"print({index} + 1)"})}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": f"{index + 1}\n"},
            {"role": "assistant", "content": f"<answer>{index + 1}</answer>"},
        ],
        "images": [data_uri],
        "answer": str(index + 1),
    }


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    with path.open("w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generation cache for every test that runs a recipe: the bundled sample's probe answers are
    computed once per session (content-addressed, so sharing is exactly what a user's cache does)."""
    return tmp_path_factory.mktemp("probe-cache") / "cache.sqlite"


class BundledRuns:
    """The bundled recipes' `--local` runs on the bundled sample, each run once per session as a user types it
    (`curate run recipes/NAME.yaml --local`) on the session's probe cache: the tests that read such a run share it."""

    def __init__(self, folder: Path, cache: Path) -> None:
        self.folder, self.cache = folder, cache
        self._runs: dict[str, tuple[Path, subprocess.CompletedProcess[str]]] = {}

    def run(self, recipe: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
        """(the run directory, the finished `curate run` process: its console output)."""
        if recipe not in self._runs:
            run_dir = self.folder / recipe
            self._runs[recipe] = run_dir, run_curate("run", f"recipes/{recipe}.yaml", "--local", "-o", str(run_dir),
                                                     "--cache", str(self.cache), timeout=1200)
        return self._runs[recipe]

    def __getitem__(self, recipe: str) -> Path:
        return self.run(recipe)[0]


@pytest.fixture(scope="session")
def bundled_runs(tmp_path_factory: pytest.TempPathFactory, probe_cache: Path) -> BundledRuns:
    return BundledRuns(tmp_path_factory.mktemp("bundled-runs"), probe_cache)


@pytest.fixture
def messages_file(tmp_path: Path) -> Path:
    """40 good rows plus two malformed ones (bad JSON, missing messages)."""
    rows: list[dict[str, Any] | str] = [messages_row(i) for i in range(40)]
    rows.insert(7, "{not json")
    rows.insert(20, {"id": "no-messages", "answer": "1"})
    return write_jsonl(tmp_path / "input.jsonl", rows)


def shard_ids(folder: Path, column: str = "id") -> list[str]:
    ids: list[str] = []
    for shard in sorted(folder.glob("*.parquet"), key=lambda p: int(p.stem.split("-")[1])):
        ids.extend(pq.read_table(shard, columns=[column]).column(column).to_pylist())
    return ids


def assert_accounting(run_dir: Path) -> dict[str, Any]:
    """The invariant, recounted from the shards themselves rather than trusted from the manifest."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    kept = sum(pq.ParquetFile(run_dir / o["path"]).metadata.num_rows for o in manifest["outputs"])
    rejected = sum(pq.ParquetFile(run_dir / o["path"]).metadata.num_rows for o in manifest["rejected"])
    assert manifest["input_rows"] == kept + rejected == manifest["kept_rows"] + manifest["rejected_rows"]
    assert kept == manifest["kept_rows"] and rejected == manifest["rejected_rows"]
    assert sum(stage["rejected"] for stage in manifest["stages"]) == rejected
    return manifest


def cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """`curate ARGS` in this process (click's runner: exit code, stdout and stderr apart), for what a subprocess would
    prove no more of: argument handling, one-line errors, printed output. `env` sets (None: unsets) variables."""
    from curate.cli import main

    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def processed(stage: Stage, batch: list[Sample], cache: Path) -> list[Verdict]:
    """The stage's verdicts on one batch, set up with `cache` (scratch beside it) and torn down after."""
    stage.setup(StageContext(cache, cache.parent))
    try:
        return stage.process(batch)
    finally:
        stage.teardown()


@contextlib.contextmanager
def stopped_at_commit(monkeypatch: pytest.MonkeyPatch, batches_done: int, debris: Path | None = None) -> Iterator[None]:
    """The run inside stops (KeyboardInterrupt, as a kill would) at the commit that follows `batches_done` committed
    batches. With `debris`, that batch's kept rows are first written there, a part no state names (a kill between
    writing a part and its state). Commits work again afterwards."""
    from curate.rundir import RunDir
    from curate.sample import ROW_SCHEMA

    commit = RunDir.commit_batch

    def stop(self: RunDir, state: Any, kept: list[Sample], *rest: Any, **options: Any) -> None:
        if state.batches_done == batches_done:
            if debris is not None:
                debris.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist([s.to_row() for s in kept], schema=ROW_SCHEMA), debris)
            raise KeyboardInterrupt
        commit(self, state, kept, *rest, **options)

    monkeypatch.setattr(RunDir, "commit_batch", stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(RunDir, "commit_batch", commit)
