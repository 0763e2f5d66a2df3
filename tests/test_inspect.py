"""The inspection API, CLI and notebook on real runs of the bundled sample."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbclient
import nbformat
import polars as pl
import pytest
from conftest import REPO, BundledRuns, bundled_recipe_data, cli, stopped_at_commit
from curate_testkit.stage_fixtures import RecordedVsActual

from curate.executor import LocalExecutor
from curate.formats import get_format, records
from curate.inspect import Run
from curate.recipe import load_recipe
from curate.registry import register_stage

register_stage(RecordedVsActual)


MODEL_STAGES = {"base_model_solvable", "strategic_tool_judge", "ambiguity_judge", "pass_rate_variance"}


def run_recipe(tmp_path: Path, name: str, cache: Path, extra_stage: bool = False, batch_size: int = 256,
               cpu_only: bool = False) -> Path:
    """The bundled SFT recipe's `--local` run, changed as asked: `cpu_only` leaves out its model stages (probe,
    judge), `extra_stage` appends `recorded_vs_actual`."""
    import yaml

    data = bundled_recipe_data("metis_sft")
    if cpu_only:
        data["stages"] = [stage for stage in data["stages"] if next(iter(stage)) not in MODEL_STAGES]
        for profile in data.get("profiles", {}).values():
            profile["stages"] = {k: v for k, v in profile["stages"].items() if k not in MODEL_STAGES}
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


def test_rl_run_scores_and_samples(bundled_runs: BundledRuns) -> None:
    run = Run(bundled_runs["metis_rl"])
    kept_id = run.kept().select(pl.col("extra_info").struct.field("id")).head(1).collect().item()
    sample, verdict = run.sample(kept_id)
    assert verdict is None and "image_dedup" in sample.meta  # stage annotations survive the verl schema
    assert run.summary(reason="no_ground_truth").height == 2


def test_killed_and_resumed_run_opens_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache.sqlite"  # the recipe's CPU stages: what is tested is the run directory, not a model
    clean = Run(run_recipe(tmp_path, "clean", cache, batch_size=32, cpu_only=True))
    with stopped_at_commit(monkeypatch, 3):  # dies at the fourth commit
        run_recipe(tmp_path, "resumed", cache, batch_size=32, cpu_only=True)
    resumed = Run(run_recipe(tmp_path, "resumed", cache, batch_size=32, cpu_only=True))
    assert resumed.manifest["resumed"] == 1
    assert resumed.funnel().drop("seconds").equals(clean.funnel().drop("seconds"))
    # A timeout's detail names the limit that ended the code first (its CPU seconds, or the wall clock on a loaded
    # machine): every other detail, and every id, stage and reason, must be the same.
    def opened(run: Run) -> pl.DataFrame:
        summary = run.summary().sort("id")
        return summary.with_columns(pl.when(pl.col("reason") == "timeout").then(None).otherwise(pl.col("detail"))
                                    .alias("detail"))

    assert opened(resumed).equals(opened(clean))


def test_cli_inspect_filters_and_shows(sft_run: Path) -> None:
    def curate(*args: str) -> str:
        result = cli("inspect", str(sft_run), *args)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    assert "2 rows rejected by image_integrity for empty_image" in curate("--stage", "image_integrity", "--reason", "empty_image")
    sample_id = Run(sft_run).summary(reason="duplicate_image")["id"][0]
    shown = curate("--show", sample_id)
    assert shown.startswith(sample_id) and "REJECTED by image_dedup: duplicate_image" in shown and "[image 0: " in shown
    missing = cli("inspect", str(sft_run), "--show", "nope")
    assert missing.exit_code == 2 and "no sample with id 'nope'" in missing.stderr


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
