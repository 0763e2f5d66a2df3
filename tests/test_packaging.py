"""The package outside the clone: the wheel holds only `curate` (stage packages, recipes and sample inside it);
a checkout imports the same names; a bundled recipe runs by name from any folder; `curate init` starts one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, assert_accounting
from curate_testkit.harness import run_curate


def curate_in(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_curate(*args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600, check=check)


def test_a_checkout_imports_the_stage_packages_inside_curate() -> None:
    # The working directory (the checkout's root) first on sys.path, as under `python -m pytest` there.
    script = ("import sys; from curate.registry import stage_classes; stages = stage_classes();"
              " assert 'filters' not in sys.modules and 'judges' not in sys.modules;"
              " print(stages['image_dedup'].__module__, stages['strategic_tool_judge'].__module__)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.stdout.split() == ["curate.filters.image_dedup", "curate.judges.strategic_tool"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    return next(out.glob("curate_tooluse-*.whl"))


def test_the_wheel_puts_nothing_but_curate_at_the_top_and_ships_recipes_and_sample(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"curate", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    for needed in ("curate/filters/image_dedup.py", "curate/judges/stage.py", "curate/judges/rubrics/ambiguity.md",
                   "curate/recipes/metis_sft.yaml", "curate/recipes/starter.yaml",
                   "curate/data/sample/sft_messages.jsonl"):
        assert needed in names
    sample = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "data" / "sample").rglob("*") if p.is_file())
    assert set(f"curate/{path}" for path in sample) <= set(names)
    metadata = zipfile.ZipFile(wheel).read("curate_tooluse-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: torch>=2.4" in metadata


def test_a_bundled_recipe_runs_by_name_from_any_folder(tmp_path: Path) -> None:
    result = curate_in(tmp_path, "run", "starter", "--no-progress")
    manifest = assert_accounting(tmp_path / "runs" / "starter")
    assert manifest["input_rows"] > 0 and f"{manifest['kept_rows']} kept" in result.stdout
    missing = curate_in(tmp_path, "run", "metis_sf", check=False)
    assert missing.returncode == 2 and "no bundled recipe (metis_rl, metis_sft, starter)" in missing.stderr


def test_init_writes_a_starter_recipe_with_the_sample_and_never_overwrites(tmp_path: Path) -> None:
    curate_in(tmp_path, "init", "project")
    recipe = (tmp_path / "project" / "recipe.yaml").read_text()
    assert "sample/sft_messages.jsonl" in recipe and "../data" not in recipe
    expected = json.loads((REPO / "data" / "sample" / "EXPECTED.json").read_text())
    assert json.loads((tmp_path / "project" / "sample" / "EXPECTED.json").read_text()) == expected
    curate_in(tmp_path / "project", "run", "recipe.yaml", "-o", "out", "--no-progress")
    assert_accounting(tmp_path / "project" / "out")
    again = curate_in(tmp_path, "init", "project", check=False)
    assert again.returncode == 2 and "exists; `curate init` writes only new files" in again.stderr
