"""Inputs and run directories on an object store: a real S3 API server on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import nbclient
import nbformat
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, assert_accounting, cli, shard_ids
from curate_testkit.harness import killed_mid_run
from curate_testkit.s3_server import S3, s3, s3_server  # noqa: F401 (fixtures)

from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.inspect import Run
from curate.recipe import load_recipe
from curate.rundir import RunDir

SAMPLE = REPO / "data" / "sample"
# The bundled sample: four formats, two of them (DeepEyesV2, Thyme) with image files beside them.
SAMPLE_INPUTS = [("sft_messages.jsonl", "messages"), ("sft_metis.parquet", "metis_coldstart"),
                 ("sft_deepeyes.json", "deepeyes"), ("sft_thyme.jsonl", "thyme")]
CPU_STAGES = [{"image_integrity": {}}, {"image_dedup": {"max_distance": 3}}, {"format": {}}]


@pytest.fixture(scope="module")
def sample_on_s3(s3: S3) -> str:
    with s3.environment():
        fsspec.filesystem("s3").mkdir("data")
    s3.upload(SAMPLE, "s3://data/sample")
    return "s3://data/sample"


def recipe_file(path: Path, inputs: list[dict | str], batch_size: int = 16) -> Path:
    path.write_text(yaml.safe_dump({"name": "store", "input": {"paths": inputs}, "stages": CPU_STAGES,
                                    "output": {"kind": "sft", "shard_rows": 40}, "batch_size": batch_size}))
    return path


def download(s3: S3, url: str, local: Path) -> Path:
    with s3.environment():
        fsspec.filesystem("s3").get(url.removeprefix("s3://"), str(local), recursive=True)
    return local


def outcome(run_dir: Path) -> tuple[list[str], list[tuple[str, str, str]], list[tuple]]:
    manifest = assert_accounting(run_dir)
    rejected = pq.read_table(run_dir / "rejected", columns=["id", "stage", "reason"]).to_pylist()
    funnel = [(s["name"], s["in"], s["kept"], s["rejected"], s["reasons"]) for s in manifest["stages"]]
    return shard_ids(run_dir / "kept"), sorted((r["id"], r["stage"], r["reason"]) for r in rejected), funnel


@pytest.fixture(scope="module")
def sample_runs(s3: S3, sample_on_s3: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The bundled sample's run from local files into a local folder, and from S3 into S3."""
    tmp = tmp_path_factory.mktemp("sample")
    local_recipe = recipe_file(tmp / "local.yaml", [{"path": str(SAMPLE / f), "format": k} for f, k in SAMPLE_INPUTS])
    s3_recipe = recipe_file(tmp / "s3.yaml", [{"path": f"{sample_on_s3}/{f}", "format": k} for f, k in SAMPLE_INPUTS])
    LocalExecutor(load_recipe(local_recipe), tmp / "local", cache_path=tmp / "c.sqlite", progress=False).run()
    with s3.environment():
        fsspec.filesystem("s3").mkdir("runs")
        LocalExecutor(load_recipe(s3_recipe), "s3://runs/sample", cache_path=tmp / "c.sqlite", progress=False).run()
    return tmp / "local", "s3://runs/sample"


def test_bundled_sample_from_s3_into_an_s3_run_equals_the_local_run(s3: S3, sample_runs: tuple[Path, str],
                                                                     tmp_path: Path) -> None:
    local, remote = sample_runs
    with s3.environment():
        opened = Run(remote)
        assert opened.funnel().drop("seconds").equals(Run(local).funnel().drop("seconds"))
        assert opened.summary().sort("id").equals(Run(local).summary().sort("id"))
        some_id = opened.summary()["id"][0]
        assert opened.sample(some_id)[1] == Run(local).sample(some_id)[1]
    copy = download(s3, remote, tmp_path / "from_s3")
    assert outcome(copy) == outcome(local)
    assert [o["sha256"] for o in opened.manifest["outputs"]] == [o["sha256"] for o in Run(local).manifest["outputs"]]
    # Images beside the DeepEyesV2 and Thyme files were read from the store, relative to each file's URL.
    kept = pq.read_table(copy / "kept", columns=["meta", "images"]).to_pylist()
    with_images = {json.loads(row["meta"])["input"]["file"] for row in kept if row["images"]}
    assert {"sft_deepeyes.json", "sft_thyme.jsonl"} <= with_images
    # The credentials are nowhere in the run directory.
    blobs = b"".join(p.read_bytes() for p in copy.rglob("*") if p.is_file())
    assert s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in blobs and s3.env["AWS_ACCESS_KEY_ID"].encode() not in blobs


def test_notebook_and_cli_open_a_run_on_s3(s3: S3, sample_runs: tuple[Path, str]) -> None:
    _, remote = sample_runs
    with s3.environment():
        manifest = Run(remote).manifest
        notebook = nbformat.read(REPO / "notebooks" / "inspect_rejections.ipynb", as_version=4)
        os.environ["CURATE_RUN_DIR"] = remote
        try:
            nbclient.NotebookClient(notebook, timeout=300,
                                    resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
        finally:
            del os.environ["CURATE_RUN_DIR"]
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert f"{manifest['input_rows']} rows in, {manifest['kept_rows']} kept" in printed
    shown = cli("inspect", remote, env=s3.env)
    assert shown.exit_code == 0, shown.stderr
    inspect = shown.stdout
    assert all(stage["name"] in inspect for stage in manifest["stages"])


def test_globs_expand_on_the_store_in_order(s3: S3, sample_on_s3: str, tmp_path: Path) -> None:
    recipe = recipe_file(tmp_path / "glob.yaml", [f"{sample_on_s3}/sft_*.jsonl"])
    with s3.environment():
        loaded = load_recipe(recipe)
    assert [source.path for source in loaded.inputs] == [f"{sample_on_s3}/sft_messages.jsonl",
                                                         f"{sample_on_s3}/sft_thyme.jsonl"]
    local = load_recipe(recipe_file(tmp_path / "local.yaml", [str(SAMPLE / "sft_*.jsonl")]))
    assert [Path(source.path).name for source in local.inputs] == ["sft_messages.jsonl", "sft_thyme.jsonl"]


@pytest.fixture(scope="module")
def generated_on_s3(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("generated")
    subprocess.run([sys.executable, "-m", "curate_testkit.sample_generator", "--rows", "160", "--kind", "sft",
                    "--format", "messages", "--out", str(folder)], check=True, cwd=REPO, capture_output=True)
    (path,) = folder.glob("*.jsonl")
    with s3.environment():
        fsspec.filesystem("s3").mkdir("gen")
    s3.upload(path, "s3://gen/raw/trajectories.jsonl")
    return path, "s3://gen/raw/trajectories.jsonl"


def test_kill_9_then_resume_on_s3_equals_the_uninterrupted_run(s3: S3, generated_on_s3: tuple[Path, str],
                                                                tmp_path: Path) -> None:
    local_input, url = generated_on_s3
    cache = str(tmp_path / "c.sqlite")
    LocalExecutor(load_recipe(recipe_file(tmp_path / "local.yaml", [str(local_input)], batch_size=8)),
                  tmp_path / "clean", cache_path=Path(cache), progress=False).run()
    recipe = recipe_file(tmp_path / "s3.yaml", [url], batch_size=8)
    command = [sys.executable, "-m", "curate", "run", str(recipe), "-o", "s3://gen/runs/killed", "--workers", "2",
               "--cache", cache, "--no-progress"]
    env = {**os.environ, **s3.env}
    with s3.environment():
        run_dir = RunDir("s3://gen/runs/killed")
        with killed_mid_run(command, "s3://gen/runs/killed", 3, env=env):
            pass
        assert not run_dir.is_complete(), "the run finished before it could be killed"
        assert 3 <= run_dir.load_state().batches_done < 20
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    copy = download(s3, "s3://gen/runs/killed", tmp_path / "from_s3")
    assert outcome(copy) == outcome(tmp_path / "clean")
    assert not (copy / "state" / "kept").exists()  # the parts went once the shards held every row
    assert len(list((copy / "state").glob("state-*.pkl"))) == 1


def bad_run(tmp_path: Path, inputs: list[str], run_dir: str) -> str:
    """The one-line error of a run, in this process."""
    recipe = recipe_file(tmp_path / "bad.yaml", inputs)
    with pytest.raises(UserError) as caught:
        LocalExecutor(load_recipe(recipe), run_dir, cache_path=tmp_path / "c.sqlite", progress=False).run()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_storage_input_is_one_line_naming_the_url_before_any_work(s3: S3, s3_server: tuple[S3, dict],
                                                                       sample_on_s3: str, tmp_path: Path) -> None:
    good = f"{sample_on_s3}/sft_messages.jsonl"
    closed_port = unused_port()
    cases = [
        # (environment overrides, inputs, run dir, what the line says)
        ({}, ["s3://no-such-bucket/raw.jsonl"], str(tmp_path / "r1"), "input file not found: s3://no-such-bucket"),
        ({}, [f"{sample_on_s3}/missing.jsonl"], str(tmp_path / "r2"), f"input file not found: {sample_on_s3}/missing"),
        ({}, [good], "s3://no-such-bucket/run", "s3://no-such-bucket/run: not found"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, [good], str(tmp_path / "r3"), f"{good}: access denied"),
        (s3_server[1], [good], str(tmp_path / "r4"), f"{good}: access denied"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_CONFIG_FILE": "/nonexistent"}, [good], str(tmp_path / "r5"), f"{good}: no credentials found"),
        # (one attempt: the test need not wait for botocore's retries, about 10 s)
        ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}", "AWS_MAX_ATTEMPTS": "1"}, [good], str(tmp_path / "r6"),
         f"{good}: cannot reach the storage endpoint"),
    ]
    for overrides, inputs, run_dir, expected in cases:
        with s3.environment(**overrides):
            message = bad_run(tmp_path, inputs, run_dir)
        assert expected in message, (expected, message)
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in message
        assert not Path(run_dir).exists() or run_dir.startswith("s3://"), "the run started before the error"
    # The command line prints the same, as one line.
    recipe = recipe_file(tmp_path / "cli.yaml", [f"{sample_on_s3}/missing.jsonl"])
    result = cli("run", str(recipe), "-o", str(tmp_path / "cli"), env=s3.env)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: input file not found: {sample_on_s3}/missing.jsonl"


def unused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
