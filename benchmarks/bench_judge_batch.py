"""Batch mode against online, through the real google-genai client and a local Gemini server in its own process.

N distinct strategic-tool judgements go through `JudgeRunner` online (concurrency C, each `generateContent`
answered after `latency` seconds), then through `BatchRunner` as one job, inline and as an uploaded JSONL file
(the server runs the job for one poll, then answers it at once). Printed per mode: wall time, time per request,
and for batch the client's own cost per request: submission (rendering, keying, the create call and, for a file,
the upload), polling and result download (with parsing and caching), measured side by side in one run. The
provider's turnaround (up to 24 h) is not simulated: what is measured is what curate adds.

    python benchmarks/bench_judge_batch.py [--requests 2000] [--latency 0.1] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_judge import requests, start_server
from curate_testkit.gemini_server import GeminiBatchServer

from curate.cache import Cache
from curate.judges.backend import BatchBackend
from curate.judges.batch import BatchRunner
from curate.judges.gemini import GeminiBackend
from curate.judges.runner import JudgeRunner
from curate.judges.stage import load_rubric


class Timed:
    """The backend's batch calls, timed by phase."""

    def __init__(self, backend: BatchBackend) -> None:
        self.backend = backend
        self.seconds: dict[str, float] = {"submit": 0.0, "poll": 0.0, "results": 0.0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def _timed(self, phase: str, call: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds[phase] += time.perf_counter() - started

    def submit_batch(self, *args: Any) -> str:
        return self._timed("submit", self.backend.submit_batch, *args)

    def batch_state(self, *args: Any) -> str:
        return self._timed("poll", self.backend.batch_state, *args)

    def batch_results(self, *args: Any) -> Any:
        return self._timed("results", self.backend.batch_results, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    server, base_url = start_server(args.latency, GeminiBatchServer)  # jobs finish on their second poll
    rubric_id = load_rubric("strategic_tool_use").id
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "cache.sqlite")
        runner = JudgeRunner(GeminiBackend("gemini-bench", base_url=base_url), cache, rubric_id, args.concurrency)
        started = time.perf_counter()
        runner.run(requests(n, "online"))
        online = time.perf_counter() - started
        runner.close()
        print(f"online, C = {args.concurrency}, latency {args.latency * 1000:.0f} ms: {online:.2f} s, "
              f"{online / n * 1000:.2f} ms/request")
        for mode, inline_limit in (("inline", 10**12), ("file", 0)):
            backend = GeminiBackend("gemini-bench", base_url=base_url, inline_limit=inline_limit)
            timed = Timed(backend)
            online_runner = JudgeRunner(backend, cache, rubric_id)
            batch = BatchRunner(online_runner, poll_seconds=0.05, max_poll_seconds=0.05, progress=False)
            batch.backend = timed  # type: ignore[assignment]
            started = time.perf_counter()
            outcomes = batch.run(requests(n, mode))
            total = time.perf_counter() - started
            assert len(outcomes) == n and all(hasattr(o, "tool_rationale") for o in outcomes)
            phases = ", ".join(f"{phase} {seconds / n * 1000:.3f}" for phase, seconds in timed.seconds.items())
            print(f"batch {mode}: {total:.2f} s, {total / n * 1000:.2f} ms/request ({phases} ms/request; "
                  f"{total / online:.2f}x online's wall time)")
            batch.close()
    server.terminate()


if __name__ == "__main__":
    main()
