"""Rollout tool calls: one round of calling turns through `RolloutEngine.advance` with the sandbox's calls run
together on 2 warm workers (`run_many`, what HDPO does) vs 1 worker (one call at a time), side by side.

Each of R rollouts makes one python call doing a little work (tens of ms, as a tool call in a rollout may).
SmolLM2-135M's tokenizer and chat template frame the observations; no generation is timed.

    python benchmarks/bench_rollout_tools.py [--rollouts 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from curate.generation.hf import load_model
from curate.sample import Message, Sample, TextPart
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.rollout import RolloutConfig, RolloutEngine

CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(sum(i * i for i in range(200000)))"}}</tool_call>'


def round_seconds(workers: int, rollouts: int, loaded, call_ids: list[int]) -> float:
    """Seconds for one round of R calling turns, with a sandbox of `workers` warm workers."""
    prompt = Sample("p", "bench", [Message("user", [TextPart("Sum the squares below 200000.")])], [], "1")
    with Sandbox(SandboxOptions(parallelism=workers)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=4))
        engine.advance([engine.start(prompt)], [call_ids])  # warm the workers' interpreters
        batch = [engine.start(prompt) for _ in range(rollouts)]
        started = time.perf_counter()
        engine.advance(batch, [call_ids] * rollouts)
        elapsed = time.perf_counter() - started
    assert all(r.tool_calls == 1 and not r.done for r in batch)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", "cpu", "float32")
    call_ids = loaded.tokenizer(CALL, add_special_tokens=False).input_ids
    one, two = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        one.append(round_seconds(1, args.rollouts, loaded, call_ids))
        two.append(round_seconds(2, args.rollouts, loaded, call_ids))
    serial, parallel = statistics.median(one), statistics.median(two)
    print(f"{args.rollouts} calling turns, medians of {args.repeats}: 1 worker {serial:.3f} s, "
          f"2 workers {parallel:.3f} s: {serial / parallel:.2f}x")


if __name__ == "__main__":
    main()
