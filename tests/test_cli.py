"""The command line as a user runs it: real subprocesses, real files, kill -9 and resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, BundledRuns, assert_accounting, bundled_recipe_data, cli, shard_ids
from curate_testkit.harness import killed_mid_run, run_curate

MODEL_STAGES = {"base_model_solvable", "strategic_tool_judge"}
CPU_STAGES = [{"image_integrity": {}}, {"image_dedup": {}}, {"format": {}}]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generated")
    subprocess.run(
        [sys.executable, "-m", "curate_testkit.sample_generator", "--rows", "600", "--kind", "sft", "--format",
         "messages", "--out", str(folder)],
        check=True, cwd=REPO, capture_output=True,
    )
    (path,) = folder.glob("*.jsonl")
    return path


def cpu_recipe(tmp_path: Path, data: Path, batch_size: int) -> Path:
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump({"name": "cpu", "input": {"paths": [str(data)]}, "stages": CPU_STAGES,
                                    "output": {"kind": "sft", "shard_rows": 100}, "batch_size": batch_size}))
    return path


def result_of(run_dir: Path) -> tuple[list[str], list[tuple[str, str, str]], dict]:
    manifest = assert_accounting(run_dir)
    rejected = pq.read_table(run_dir / "rejected", columns=["id", "stage", "reason"]).to_pylist()
    funnel = [(s["name"], s["in"], s["kept"], s["rejected"], s["reasons"]) for s in manifest["stages"]]
    return shard_ids(run_dir / "kept"), sorted((r["id"], r["stage"], r["reason"]) for r in rejected), funnel


@pytest.mark.parametrize("workers", ["1", "2"])
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path: Path, generated: Path, workers: str) -> None:
    recipe = cpu_recipe(tmp_path, generated, batch_size=8)
    cache = str(tmp_path / "cache.sqlite")
    run_curate("run", str(recipe), "-o", str(tmp_path / "clean"), "--workers", workers, "--cache", cache,
               "--no-progress")

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "curate", "run", str(recipe), "-o", str(killed), "--workers", workers,
               "--cache", cache, "--no-progress"]
    with killed_mid_run(command, killed, 5, poll=0.02):
        pass
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"

    run_curate("run", str(recipe), "-o", str(killed), "--workers", workers, "--cache", cache, "--no-progress")
    assert result_of(killed) == result_of(tmp_path / "clean")


def test_user_errors_are_one_line_without_traceback(tmp_path: Path, generated: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"input": {"paths": [str(generated)]}, "stages": [{"image_dedupe": {}}],
                                       "output": {"kind": "sft"}}))
    cases = {
        (str(bad_yaml),): "invalid YAML",
        (str(unknown),): "unknown stage 'image_dedupe' (did you mean 'image_dedup'?)",
        (str(tmp_path / "nope.yaml"),): "recipe not found",
        (str(cpu_recipe(tmp_path, generated, 8)), "--format", "jsonl"): "unknown format 'jsonl'",
        (str(cpu_recipe(tmp_path, generated, 8)), "--input", str(tmp_path / "missing.parquet")): "input file not found",
    }
    for args, message in cases.items():
        result = cli("run", *args, "-o", str(tmp_path / "out"))
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_stages_lists_builtin_stages_with_options() -> None:
    listing = cli("stages").stdout
    for name in ("image_integrity", "image_dedup", "format"):
        assert f"\n{name}  [" in f"\n{listing}"
    assert "max_distance" in listing


def test_sample_recipe_runs_and_inspect_prints_funnel(bundled_runs: BundledRuns) -> None:
    run_dir, result = bundled_runs.run("metis_sft")  # `curate run recipes/metis_sft.yaml --local`
    manifest = assert_accounting(run_dir)
    assert f"{manifest['input_rows']} rows in, {manifest['kept_rows']} kept" in result.stdout
    # Every stage of the recipe rejects something planted in the bundled sample, but the local judge, whose
    # thresholds are at the minimum score (see the recipe): it judges every trajectory and keeps it.
    judge = manifest["stages"][-1]
    assert judge["name"] == "strategic_tool_judge" and judge["in"] == judge["kept"] > 0
    assert all(stage["rejected"] > 0 for stage in manifest["stages"][:-1]), manifest["stages"]
    inspect = run_curate("inspect", str(run_dir)).stdout
    for stage in manifest["stages"]:
        assert stage["name"] in inspect
        for reason in stage["reasons"]:
            assert reason in inspect


def test_entry_point_plugin_stage_is_found_and_runs(tmp_path: Path, generated: Path) -> None:
    """A third-party package declares a stage under the `curate.stages` entry point group."""
    site = tmp_path / "site"
    (site / "my_plugin").mkdir(parents=True)
    (site / "my_plugin" / "__init__.py").write_text(
        "from curate.stage import Stage, reject\n"
        "class EvenRows(Stage):\n"
        "    '''Keeps rows whose input row number is even.'''\n"
        "    name = 'even_rows'\n"
        "    def check(self, sample):\n"
        "        return sample.meta['input']['row'] % 2 == 0 or reject('odd_row')\n"
    )
    dist = site / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[curate.stages]\neven_rows = my_plugin:EvenRows\n")
    recipe = tmp_path / "plugin.yaml"
    recipe.write_text(yaml.safe_dump({"input": {"paths": [str(generated)]}, "stages": [{"even_rows": {}}],
                                      "output": {"kind": "sft"}}))
    env = {**os.environ, "PYTHONPATH": str(site)}
    listing = run_curate("stages", env=env)
    assert "even_rows  [workers, batch 64]  Keeps rows whose input row number is even." in listing.stdout
    run_curate("run", str(recipe), "-o", str(tmp_path / "run"), "--workers", "2", "--no-progress", "--cache",
               str(tmp_path / "c.sqlite"), env=env)
    manifest = assert_accounting(tmp_path / "run")
    assert manifest["stages"][1] == {**manifest["stages"][1], "name": "even_rows", "in": 600, "kept": 300,
                                     "reasons": {"odd_row": 300}}


def test_kill_9_during_sandbox_stages_leaves_no_process_and_resumes(tmp_path: Path) -> None:
    import psutil

    # The bundled SFT recipe up to its sandbox stages: the model stages after them are not what is killed here.
    data = bundled_recipe_data("metis_sft")
    data["stages"] = [stage for stage in data["stages"] if next(iter(stage)) not in MODEL_STAGES]
    local = data["profiles"]["local"]
    local["stages"] = {name: options for name, options in local["stages"].items() if name not in MODEL_STAGES}
    assert [next(iter(stage)) for stage in data["stages"]][-2:] == ["execution_failure", "consistency"]
    data["batch_size"] = 16
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(data))
    cache = str(tmp_path / "cache.sqlite")
    run_curate("run", str(recipe), "--local", "-o", str(tmp_path / "clean"), "--cache", cache, "--no-progress")
    killed = tmp_path / "killed"
    def is_sandbox(child: psutil.Process) -> bool:
        try:
            return "zygote.py" in " ".join(child.cmdline())
        except psutil.NoSuchProcess:  # a short-lived child that ended between listing and reading
            return False

    command = [sys.executable, "-m", "curate", "run", str(recipe), "--local", "-o", str(killed), "--workers", "2",
               "--cache", cache, "--no-progress"]
    with killed_mid_run(command, killed, 3) as process:
        sandboxes = [p for p in psutil.Process(process.pid).children(recursive=True) if is_sandbox(p)]
        assert sandboxes, "the run had no sandbox workers when it was killed"
    assert not (killed / "manifest.json").exists()
    # bwrap's --die-with-parent and the workers' closed pipes take the sandboxes down with the run.
    gone, alive = psutil.wait_procs(sandboxes, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    run_curate("run", str(recipe), "--local", "-o", str(killed), "--workers", "2", "--cache", cache,
               "--no-progress")
    assert result_of(killed) == result_of(tmp_path / "clean")
