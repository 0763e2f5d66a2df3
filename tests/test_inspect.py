"""The inspection API, CLI and notebook on real runs of the bundled sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import polars as pl
import pytest
from conftest import REPO
from stage_fixtures import RecordedVsActual

from curate.executor import LocalExecutor
from curate.formats import get_format, records
from curate.inspect import Run
from curate.recipe import load_recipe
from curate.registry import register_stage
from curate.rundir import RunDir

register_stage(RecordedVsActual)


def run_recipe(tmp_path: Path, name: str, cache: Path, recipe: str = "metis_sft", extra_stage: bool = False, batch_size: int = 256) -> Path:
    source = (REPO / "recipes" / f"{recipe}.yaml").read_text()
    recipe_path = REPO / "recipes" / f"{recipe}.yaml"
    if extra_stage or batch_size != 256:
        import yaml

        data = yaml.safe_load(source)
        data["input"]["paths"] = [{**p, "path": str((recipe_path.parent / p["path"]).resolve())} for p in data["input"]["paths"]]
        if extra_stage:
            data["stages"].append({"recorded_vs_actual": {}})
        data["batch_size"] = batch_size
        recipe_path = tmp_path / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(data))
    LocalExecutor(load_recipe(recipe_path, profile="local"), tmp_path / name, cache_path=cache,
                  progress=False).run()
    return tmp_path / name


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, probe_cache: Path) -> Path:
    return run_recipe(tmp_path_factory.mktemp("inspect"), "sft", probe_cache, extra_stage=True)


def test_funnel_and_reasons_equal_the_manifest(sft_run: Path) -> None:
    run = Run(sft_run)
    manifest = json.loads((sft_run / "manifest.json").read_text())
    assert run.funnel().to_dicts() == [
        {"stage": s["name"], "in": s["in"], "kept": s["kept"], "rejected": s["rejected"], "seconds": s["seconds"]}
        for s in manifest["stages"]
    ]
    assert run.reasons()["rows"].sum() == manifest["rejected_rows"]
    by_stage = run.reasons().group_by("stage").agg(pl.col("rows").sum())
    assert dict(by_stage.iter_rows()) == {s["name"]: s["rejected"] for s in manifest["stages"] if s["rejected"]}


def test_every_rejected_id_is_found_with_its_verdict(sft_run: Path) -> None:
    run = Run(sft_run)
    rejected = pl.read_parquet(sft_run / "rejected" / "*.parquet")
    assert run.rejected().select(pl.len()).collect().item() == rejected.height
    for row in rejected.iter_rows(named=True):
        sample, verdict = run.sample(row["id"])
        assert sample.id == row["id"] and verdict == {k: row[k] for k in ("stage", "reason", "detail")}
    assert run.summary(stage="image_integrity", reason="empty_image").height == 2
    assert set(run.summary(source="sft_messages.jsonl")["reason"]) == {"malformed"}


def test_sample_html_has_images_verdict_and_recorded_vs_actual_diff(sft_run: Path) -> None:
    run = Run(sft_run)
    sample_id = run.summary(stage="recorded_vs_actual")["id"][0]
    page = run.html(sample_id)
    sample, _ = run.sample(sample_id)
    assert page.count('<img src="data:image/') == len(sample.images) >= 2
    assert "rejected by recorded_vs_actual: mismatch" in page
    comparison = sample.meta["recorded_vs_actual"]["comparisons"][0]
    assert f"<td>{comparison['recorded']}</td>" in page and f"<td>{comparison['actual']}</td>" in page
    assert "--- recorded" in page and "+++ actual" in page
    assert "curate-call" in page and "python:" in page


def test_kept_samples_open_too_and_scores_collect_numeric_annotations(sft_run: Path) -> None:
    run = Run(sft_run)
    kept_id = run.kept().select("id").head(1).collect().item()
    sample, verdict = run.sample(kept_id)
    assert verdict is None and sample.id == kept_id
    scores = run.scores()
    assert "recorded_vs_actual.score" in scores.columns
    assert scores.filter(pl.col("kept")).height + scores.filter(~pl.col("kept")).height == scores.height
    assert scores.filter(pl.col("kept")).height == run.manifest["kept_rows"]


def test_export_writes_a_file_a_recipe_reads(sft_run: Path, tmp_path: Path) -> None:
    run = Run(sft_run)
    picked = run.summary(stage="format")["id"].to_list()
    assert run.export(picked, tmp_path / "readmit.jsonl", "messages") == len(picked) > 0
    back = [get_format("messages").parse(r, tmp_path) for r in records(tmp_path / "readmit.jsonl")]
    assert [s.id for s in back] == picked


def test_rl_run_scores_and_samples(tmp_path: Path, probe_cache: Path) -> None:
    run = Run(run_recipe(tmp_path, "rl", probe_cache, recipe="metis_rl"))
    kept_id = run.kept().select(pl.col("extra_info").struct.field("id")).head(1).collect().item()
    sample, verdict = run.sample(kept_id)
    assert verdict is None and "image_dedup" in sample.meta  # stage annotations survive the verl schema
    assert run.summary(reason="no_ground_truth").height == 2


def test_killed_and_resumed_run_opens_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe_cache: Path) -> None:
    clean = Run(run_recipe(tmp_path, "clean", probe_cache, batch_size=32))
    commit, calls = RunDir.commit_batch, {"n": 0}

    def die_on_fourth(self, *args):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        commit(self, *args)

    monkeypatch.setattr(RunDir, "commit_batch", die_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path, "resumed", probe_cache, batch_size=32)
    monkeypatch.setattr(RunDir, "commit_batch", commit)
    resumed = Run(run_recipe(tmp_path, "resumed", probe_cache, batch_size=32))
    assert resumed.manifest["resumed"] == 1
    assert resumed.funnel().drop("seconds").equals(clean.funnel().drop("seconds"))
    assert resumed.summary().sort("id").equals(clean.summary().sort("id"))


def test_cli_inspect_filters_and_shows(sft_run: Path) -> None:
    def curate(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "curate", "inspect", str(sft_run), *args], capture_output=True,
                              text=True, check=True, cwd=REPO).stdout

    assert "2 rows rejected by image_integrity for empty_image" in curate("--stage", "image_integrity", "--reason", "empty_image")
    sample_id = Run(sft_run).summary(reason="duplicate_image")["id"][0]
    shown = curate("--show", sample_id)
    assert shown.startswith(sample_id) and "REJECTED by image_dedup: duplicate_image" in shown and "[image 0: " in shown
    missing = subprocess.run([sys.executable, "-m", "curate", "inspect", str(sft_run), "--show", "nope"],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "no sample with id 'nope'" in missing.stderr


def test_notebook_executes_and_draws_its_charts(sft_run: Path) -> None:
    notebook = nbformat.read(REPO / "notebooks" / "inspect_rejections.ipynb", as_version=4)
    os.environ["CURATE_RUN_DIR"] = str(sft_run)
    try:
        nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["CURATE_RUN_DIR"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # funnel, reasons, a score histogram
    assert any('<img src="data:image/' in o.get("data", {}).get("text/html", "") for o in outputs)  # the gallery
