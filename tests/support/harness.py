"""The subprocess and kill -9 harnesses: `curate` run as a user types it, and a run killed mid-way, after a given
number of committed batches, with its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/support/ in the checkout


def run_curate(*args: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
               check: bool = True, cwd: str | Path = REPO) -> subprocess.CompletedProcess[str]:
    """`python -m curate ARGS` in `cwd` (the checkout's root unless told), its output captured. With `check`, an
    exit other than 0 fails the test with the command and the end of its stderr."""
    result = subprocess.run([sys.executable, "-m", "curate", *args], capture_output=True, text=True, cwd=cwd,
                            env=env, check=False, timeout=timeout)
    assert not check or result.returncode == 0, (
        f"curate {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def wait_for_batches(run_dir: str | Path, batches: int, process: subprocess.Popen | None = None,
                     timeout: float = 120, poll: float = 0.05) -> None:
    """Until the run in `run_dir` has committed `batches` batches, or `process` (its driver, when given) has ended,
    or `timeout` seconds have passed: the moment a kill -9 test kills the run, mid-run."""
    from curate.rundir import RunDir

    run = RunDir(run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        state = run.load_state()
        if state is not None and state.batches_done >= batches:
            return
        time.sleep(poll)


@contextlib.contextmanager
def killed_mid_run(command: Sequence[str], run_dir: str | Path, batches: int, env: Mapping[str, str] | None = None,
                   poll: float = 0.05) -> Iterator[subprocess.Popen]:
    """Starts the run `command` writes to `run_dir` in a session of its own, and once it has committed `batches`
    batches (or ended) yields its driver; on leaving, SIGKILL to the whole session: the driver and its workers,
    mid-run."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_for_batches(run_dir, batches, process, poll=poll)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
