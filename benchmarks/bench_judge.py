"""Judge throughput against a local Gemini server with a fixed latency, through the real google-genai client.

For each concurrency C, N requests of a strategic-tool judgement go through `JudgeRunner` (cache, limiter,
budget, retries) to a local `generateContent` server that answers after `latency` seconds. The server runs
in its own process, as a remote API would, so its CPU time does not count against the client. The ideal is
C / latency requests per second; target: achieved >= 0.8 x ideal. Then the same requests again: target 0
requests (all from the cache).

    python benchmarks/bench_judge.py [--requests 400] [--latency 0.1] [--concurrency 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from curate_testkit.gemini_server import GeminiServer

from curate.cache import Cache
from curate.generation import Prompt
from curate.sample import Message, TextPart
from curate.judges.backend import JudgeRequest
from curate.judges.gemini import GeminiBackend
from curate.judges.runner import JudgeRunner
from curate.judges.stage import load_rubric
from curate.judges.strategic_tool import StrategicScores

VERDICT = json.dumps({"visual_relevance": 4, "reasoning_coherence": 4, "tool_rationale": 4, "justification": "ok"})


def requests(count: int, tag: str) -> list[JudgeRequest]:
    rubric = load_rubric("strategic_tool_use")
    return [JudgeRequest(rubric.text, Prompt((Message("user", [TextPart(f"trajectory {tag}-{i}")]),)), StrategicScores)
            for i in range(count)]


def serve(server_class: type[GeminiServer], latency: float, address: multiprocessing.Queue) -> None:
    with server_class(answer=lambda body: VERDICT, latency=latency) as server:
        address.put(server.base_url)
        multiprocessing.Event().wait()  # until the benchmark terminates this process


def start_server(latency: float, server_class: type[GeminiServer] = GeminiServer) -> tuple[multiprocessing.Process, str]:
    """A local Gemini server in its own process, as a remote API would be; its base URL. Sets a dummy key."""
    os.environ.setdefault("GEMINI_API_KEY", "benchmark-key")
    address: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(server_class, latency, address), daemon=True)
    server.start()
    return server, address.get(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    server, base_url = start_server(args.latency)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "cache.sqlite")
        rubric_id = load_rubric("strategic_tool_use").id
        for concurrency in args.concurrency:
            runner = JudgeRunner(GeminiBackend("gemini-bench", base_url=base_url), cache, rubric_id, concurrency)
            batch = requests(args.requests, f"c{concurrency}")
            started = time.perf_counter()
            runner.run(batch)
            achieved = args.requests / (time.perf_counter() - started)
            ideal = concurrency / args.latency
            sent = runner.requests
            runner.run(batch)
            repeated = runner.requests - sent
            runner.close()
            print(f"concurrency {concurrency}, latency {args.latency * 1000:.0f} ms: {achieved:.1f} requests/s of an "
                  f"ideal {ideal:.0f}: {achieved / ideal:.2f} (target >= 0.8); repeated run: {repeated} requests")
    server.terminate()


if __name__ == "__main__":
    main()
