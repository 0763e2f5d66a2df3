"""Faults in one session, over a multi-batch run on the local S3 server (input and run directory) with the
strategic judge on the local Gemini server and execution_failure in the sandbox: bursts of 429/500/503, a
full outage, a sandbox worker killed and one stopped, and kill -9 of the run at random points. Once the faults
end, the same command is run again until it completes; then the kept and rejected sets equal a fault-free
run's, no row is lost or duplicated, and no request that got an answer was answered twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, assert_accounting, shard_ids
from curate_testkit.gemini_server import GeminiServer
from curate_testkit.s3_server import S3, s3, s3_server  # noqa: F401 (fixtures)
from test_judges import KEY, pointless_if_hello, trajectory

from curate.formats import get_format

ROWS, BATCH = 16, 4


def outcome(run_dir: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    assert_accounting(run_dir)
    rejected = pq.read_table(run_dir / "rejected").select(["id", "stage", "reason"]).to_pylist()
    kept = shard_ids(run_dir / "kept")
    assert len(kept) == len(set(kept)) and len(rejected) == len({r["id"] for r in rejected})  # nothing twice
    return sorted(kept), sorted((r["id"], r["stage"], r["reason"]) for r in rejected)


def recipe(tmp_path: Path, input_url: str, base_url: str) -> Path:
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump({
        "name": "faults", "input": {"paths": [input_url], "format": "messages"},
        "stages": [{"execution_failure": {"parallelism": 2, "timeout": 3, "worker_grace": 1}},
                   {"strategic_tool_judge": {"model": "gemini-test", "backoff": 0.05, "max_retries": 3,
                                             "concurrency": 2, "backend_options": {"base_url": base_url}}}],
        "output": {"kind": "sft"}, "batch_size": BATCH}))
    return path


def sandbox_workers(process: subprocess.Popen) -> list[list[psutil.Process]]:
    """Each sandbox worker of the run (bwrap, or the zygote at the namespace level) with its processes."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []
    workers = []
    for child in tree:
        try:
            if any("zygote" in part for part in child.cmdline()) and "zygote" not in " ".join(child.parent().cmdline()):
                workers.append([child, *child.children(recursive=True)])
        except psutil.Error:
            continue
    return workers


def harass_sandbox(process: subprocess.Popen, done: threading.Event) -> list[str]:
    """Once the run's sandbox is up: SIGKILL one worker, then SIGSTOP another, every process of it (the watchdog
    must replace both)."""
    did: list[str] = []

    def work() -> None:
        for action in ("kill", "stop"):
            while not done.is_set() and process.poll() is None:
                workers = sandbox_workers(process)
                if len(workers) >= 2:
                    try:
                        for member in workers[0] if action == "kill" else workers[-1]:
                            member.kill() if action == "kill" else member.suspend()
                        did.append(action)
                    except psutil.Error:
                        pass
                    break
                done.wait(0.05)
            done.wait(0.5)

    threading.Thread(target=work, daemon=True).start()
    return did


@pytest.mark.timeout(600)
def test_faults_of_every_kind_then_a_rerun_gives_the_fault_free_result(tmp_path: Path, s3: S3) -> None:
    rows = [trajectory(f"t{i:02d}", "1/0" if i % 7 == 3 else ("print('hello')" if i % 3 == 0 else f"print({i})"))
            for i in range(ROWS)]
    get_format("messages").write(rows, tmp_path / "in.jsonl")
    with s3.environment():
        import fsspec

        fsspec.filesystem("s3").mkdir("faults")
    s3.upload(tmp_path / "in.jsonl", "s3://faults/in/in.jsonl")
    env = {**os.environ, **s3.env, "GEMINI_API_KEY": KEY}
    chooser = random.Random(32)

    with GeminiServer(answer=pointless_if_hello) as server:
        path = recipe(tmp_path, "s3://faults/in/in.jsonl", server.base_url)

        def command(run_dir: str, cache: str) -> list[str]:
            return [sys.executable, "-m", "curate", "run", str(path), "-o", run_dir, "--no-progress",
                    "--cache", str(tmp_path / cache)]

        clean = subprocess.run(command(str(tmp_path / "clean"), "clean.sqlite"), env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=600)
        assert clean.returncode == 0, clean.stderr[-3000:]
        server.answered.clear()
        faulty = command("s3://faults/run", "faulty.sqlite")

        # 1. Bursts of 429/500/503, a sandbox worker killed and one stopped, then kill -9 at a random point.
        server.faults.extend(["429", "500", "503", "503", "429", "500"])
        first = subprocess.Popen(faulty, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = threading.Event()
        harassed = harass_sandbox(first, done)
        deadline = time.monotonic() + 240
        while len(harassed) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        try:  # killed at a random point after the sandbox faults
            first.wait(timeout=chooser.uniform(0.5, 4))
        except subprocess.TimeoutExpired:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
        done.set()
        print(f"phase 1 done: {harassed}, exit {first.returncode}", flush=True)
        # 2. A full outage: the run stops with one line, committing nothing of the batch it was on.
        server.outage = 503
        down = subprocess.run(faulty, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if down.returncode != 0:  # the earlier run may have finished every row the judge had to see
            assert down.returncode == 2 and down.stderr.strip().count("\n") == 0, down.stderr[-3000:]
            assert "HTTP 503" in down.stderr and "run the same command again to resume" in down.stderr
        server.outage = None
        print(f"phase 2 done: exit {down.returncode}: {down.stderr.strip()[-300:]}", flush=True)
        # 3. Another kill -9 at a random point, with a burst in flight.
        server.faults.extend(["503", "429"])
        third = subprocess.Popen(faulty, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            third.wait(timeout=chooser.uniform(3, 8))
        except subprocess.TimeoutExpired:
            os.kill(third.pid, signal.SIGKILL)
            third.wait()
        print(f"phase 3 done: exit {third.returncode}", flush=True)
        # The faults are over: the same command, until it completes.
        for _ in range(4):
            final = subprocess.run(faulty, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
            if final.returncode == 0:
                break
        assert final.returncode == 0, final.stderr[-3000:]
        answered_twice = [digest for digest, count in server.answered.items() if count > 1]

    with s3.environment():
        fsspec.filesystem("s3").get("faults/run", str(tmp_path / "from_s3"), recursive=True)
    assert outcome(tmp_path / "from_s3") == outcome(tmp_path / "clean")
    assert not answered_twice, "an answered request was paid for again"
    assert harassed == ["kill", "stop"]  # the sandbox faults really happened
