"""`--force` deletes a curate run directory's own files and nothing else: a folder holding a user's file, the
working or home directory, a bucket's root are refused whole; a real run directory is cleared and run again."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import yaml
from conftest import assert_accounting
from curate_testkit.s3_server import S3, s3, s3_server  # noqa: F401 (fixtures)

from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.recipe import load_recipe
from curate.rundir import RunDir


def recipe(tmp_path: Path, input_file: Path | str, first: int = 30) -> Path:
    path = tmp_path / f"recipe-{first}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "force", "input": {"paths": [str(input_file)]}, "stages": [{"format": {}}],
        "output": {"kind": "sft", "shard_rows": 16}, "batch_size": 8 if first == 30 else 5}))
    return path


def run(tmp_path: Path, recipe_path: Path, run_dir: str | Path, force: bool = False) -> dict:
    executor = LocalExecutor(load_recipe(recipe_path), run_dir, cache_path=tmp_path / "cache.sqlite", progress=False)
    return executor.run(force)


def test_force_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(tmp_path: Path, messages_file: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a curate run directory.*--force deletes only"):
        run(tmp_path, recipe(tmp_path, messages_file), folder, force=True)
    assert (folder / "notes" / "thesis.tex").read_text() == "years of work"


def test_force_refuses_a_run_directory_holding_a_users_file_and_deletes_nothing(tmp_path: Path,
                                                                                messages_file: Path) -> None:
    run_dir = tmp_path / "run"
    run(tmp_path, recipe(tmp_path, messages_file), run_dir)
    (run_dir / "kept" / "my-notes.txt").write_text("mine")
    shards = sorted(p.name for p in (run_dir / "kept").iterdir())
    with pytest.raises(UserError, match=r"holds kept/my-notes\.txt, which curate did not write"):
        run(tmp_path, recipe(tmp_path, messages_file, first=20), run_dir, force=True)
    assert sorted(p.name for p in (run_dir / "kept").iterdir()) == shards
    assert (run_dir / "manifest.json").exists()


@pytest.mark.parametrize("where", ["working", "home", "above", "root"])
def test_force_never_deletes_the_working_or_home_directory_or_the_root(tmp_path: Path, messages_file: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        where: str) -> None:
    # A real run lives in the working directory: even so, --force must not delete it (-o .).
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    run(tmp_path, recipe(tmp_path, messages_file), ".")
    target = {"working": ".", "home": str(work), "above": str(tmp_path), "root": "/"}[where]
    with pytest.raises(UserError, match="--force never deletes"):
        run(tmp_path, recipe(tmp_path, messages_file, first=20), target, force=True)
    assert (work / "manifest.json").exists() and (work / "kept").is_dir()


def test_force_clears_a_real_run_directory_and_runs_again(tmp_path: Path, messages_file: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(tmp_path, recipe(tmp_path, messages_file), run_dir)
    (run_dir / "scratch" / "stage" / "deep").mkdir(parents=True)
    (run_dir / "scratch" / "stage" / "deep" / "left.bin").write_bytes(b"x")  # a stage's scratch file is ours
    stale_shard = run_dir / "kept" / "shard-00099.parquet"
    stale_shard.write_bytes((run_dir / "kept" / "shard-00000.parquet").read_bytes())
    second = run(tmp_path, recipe(tmp_path, messages_file, first=20), run_dir, force=True)
    assert second["recipe_sha256"] != first["recipe_sha256"]
    assert not stale_shard.exists() and not (run_dir / "scratch" / "stage").exists()
    assert_accounting(run_dir)


def test_force_on_an_interrupted_run_without_manifest_clears_it(tmp_path: Path, messages_file: Path) -> None:
    run_dir = tmp_path / "run"
    run(tmp_path, recipe(tmp_path, messages_file), run_dir)
    (run_dir / "manifest.json").unlink()  # a run killed while finalising: the state objects identify it
    run(tmp_path, recipe(tmp_path, messages_file, first=20), run_dir, force=True)
    assert_accounting(run_dir)


def test_resume_deletes_unnamed_parts_but_not_a_foreign_file_among_them(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    state = run_dir.open("sha", {"name": "t"}, [], force=False)
    run_dir.commit_batch(state, [], [], rows=0)
    parts = tmp_path / "run" / "state" / "kept"
    debris = parts / "part-000001-0123abcd.parquet"  # a batch whose state a kill never wrote
    debris.write_bytes(b"torn")
    (parts / "readme.txt").write_text("not a part")
    resumed = run_dir.open("sha", {"name": "t"}, [], force=False)
    assert not debris.exists() and (parts / "readme.txt").read_text() == "not a part"
    assert sorted(p.name for p in parts.iterdir()) == sorted([*resumed.parts, "readme.txt"])


def test_force_refuses_a_bucket_root_and_clears_a_run_inside_one(s3: S3, tmp_path: Path,  # noqa: F811
                                                                 messages_file: Path) -> None:
    with s3.environment():
        fs = fsspec.filesystem("s3")
        fs.mkdir("precious")
        fs.pipe_file("precious/data/user.jsonl", b"{}\n")
        run(tmp_path, recipe(tmp_path, messages_file), "s3://precious/run")
        with pytest.raises(UserError, match="bucket's root; --force never deletes one"):
            run(tmp_path, recipe(tmp_path, messages_file, first=20), "s3://precious", force=True)
        with pytest.raises(UserError, match="not a curate run directory"):
            run(tmp_path, recipe(tmp_path, messages_file, first=20), "s3://precious/data", force=True)
        assert fs.cat_file("precious/data/user.jsonl") == b"{}\n"
        manifest = run(tmp_path, recipe(tmp_path, messages_file, first=20), "s3://precious/run", force=True)
        assert manifest["input_rows"] == manifest["kept_rows"] + manifest["rejected_rows"]
        fs.invalidate_cache()
        assert fs.cat_file("precious/data/user.jsonl") == b"{}\n"
        assert fs.exists("precious/run/manifest.json")


def test_a_checkpoint_folder_curate_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    import torch
    from curate_testkit.toy import build_toy_policy

    from curate.generation.hf import load_model
    from curate.train.checkpoint import save_checkpoint

    loaded = load_model(str(build_toy_policy(tmp_path / "toy", hidden=32, heads=1)), "cpu", "float32")
    optimizer = torch.optim.AdamW(loaded.net.parameters())
    ours = save_checkpoint(tmp_path / "out", 1, loaded, optimizer, {})
    assert save_checkpoint(tmp_path / "out", 1, loaded, optimizer, {"again": 1}) == ours  # its own: replaced
    theirs = tmp_path / "out" / "checkpoint-000002"
    theirs.mkdir()
    (theirs / "weights.bin").write_bytes(b"someone's")
    with pytest.raises(UserError, match="not a curate checkpoint"):
        save_checkpoint(tmp_path / "out", 2, loaded, optimizer, {})
    assert (theirs / "weights.bin").read_bytes() == b"someone's"
