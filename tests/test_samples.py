"""The generator and the bundled sample: deterministic, truly consistent, and every planted defect caught."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, BundledRuns, assert_accounting
from curate_testkit.sample_generator import SFT_DEFECTS, generate_rl, generate_sft, run_python, write_sample_data
from PIL import Image as PILImage

from curate.formats import get_format, records
from curate.recipe import Recipe, load_recipe

SAMPLE_DIR = REPO / "data" / "sample"


def test_generator_is_deterministic() -> None:
    first = [(s.id, [im.data for im in s.images], s.answer) for s, _ in generate_sft(20, seed=3)]
    second = [(s.id, [im.data for im in s.images], s.answer) for s, _ in generate_sft(20, seed=3)]
    assert first == second
    assert first != [(s.id, [im.data for im in s.images], s.answer) for s, _ in generate_sft(20, seed=4)]


def test_good_trajectories_record_what_their_code_really_prints_and_saves() -> None:
    checked = 0
    for sample, defect in generate_sft(40, seed=1):
        if defect is not None:
            continue
        for position, call in sample.indexed_tool_calls:
            if call.name != "python":
                continue
            inputs = [sample.images[i] for i in sample.messages[0].image_indices]
            stdout, saved = run_python(call.code, inputs)
            observation = sample.messages[position + 1]
            assert observation.text == stdout
            assert [sample.images[i].data for i in observation.image_indices] == [im.data for im in saved]
            checked += 1
    assert checked >= 25


def test_every_image_of_good_rows_decodes() -> None:
    for sample, defect in list(generate_sft(30, seed=2)) + list(generate_rl(30, seed=2)):
        if defect is None:
            for image in sample.images:
                PILImage.open(io.BytesIO(image.data)).load()


def test_bundled_sample_is_what_the_generator_writes(tmp_path: Path) -> None:
    expected = write_sample_data(tmp_path)
    assert json.loads((SAMPLE_DIR / "EXPECTED.json").read_text()) == json.loads(json.dumps(expected))
    for name, fmt in [("sft_messages.jsonl", "messages"), ("sft_metis.parquet", "metis_coldstart"),
                      ("sft_deepeyes.json", "deepeyes"), ("sft_thyme.jsonl", "thyme"), ("rl_verl.parquet", "verl")]:
        assert list(records(SAMPLE_DIR / name)) == list(records(tmp_path / name)), name
    kinds = {d["kind"] for d in expected["defects"].values()}
    assert {kind for kind, *_ in SFT_DEFECTS} | {"near_duplicate_question", "eval_question", "eval_image"} <= kinds
    assert sum(len(rows) for rows in expected["malformed"].values()) == 6


def catchable(defect: dict, recipe: Recipe) -> bool:
    """Whether the recipe's options can reject the planted defect. The local RL profile keeps prompts its
    text-only model never solves (p = 0, low_inclusive), so the planted too-hard ones stay; the local
    judges' thresholds are at the minimum score (their 135M model's scores are noise), so they keep all."""
    options = {spec.name: spec.options for spec in recipe.stages}
    if defect["reason"] == "too_hard":
        return not (options["pass_rate_variance"].low == 0 and options["pass_rate_variance"].low_inclusive)
    if defect["stage"].endswith("_judge"):
        return any(score > 1 for score in options[defect["stage"]].min_scores.values())
    return True


@pytest.mark.parametrize("recipe", ["metis_sft", "metis_rl"])
def test_recipes_reject_exactly_the_planted_defects_of_their_stages(tmp_path: Path, recipe: str,
                                                                    bundled_runs: BundledRuns) -> None:
    loaded = load_recipe(REPO / "recipes" / f"{recipe}.yaml", profile="local")
    run_dir = bundled_runs[recipe]
    manifest = assert_accounting(run_dir)
    expected = json.loads((SAMPLE_DIR / "EXPECTED.json").read_text())
    files = {Path(source.path).name for source in loaded.inputs}
    stages = {spec.name for spec in loaded.stages}
    planted = {sample_id: d for sample_id, d in expected["defects"].items()
               if d["file"] in files and d["stage"] in stages and catchable(d, loaded)}
    rejected = pl.read_parquet(run_dir / "rejected" / "*.parquet")
    by_stage = rejected.filter(pl.col("stage") != "read")
    assert {row["id"]: (row["stage"], row["reason"]) for row in by_stage.iter_rows(named=True)} == {
        sample_id: (d["stage"], d["reason"]) for sample_id, d in planted.items()
    }
    malformed = rejected.filter(pl.col("stage") == "read")
    assert malformed.height == sum(len(expected["malformed"].get(name, [])) for name in files)
    assert set(malformed["reason"]) == {"malformed"}
    assert all(stage["rejected"] > 0 for stage in manifest["stages"] if not stage["name"].endswith("_judge")), \
        manifest["stages"]
    kept_format = get_format("messages" if recipe == "metis_sft" else "verl")
    kept = [kept_format.parse(r, tmp_path) for shard in sorted((run_dir / "kept").glob("*.parquet")) for r in records(shard)]
    assert len(kept) == manifest["kept_rows"] and not {s.id for s in kept} & set(planted)
