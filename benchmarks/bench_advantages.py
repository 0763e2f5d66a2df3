"""Vectorised HDPO advantages (`curate.train.advantages`) vs a per-sample reference.

The reference (`curate_testkit.reference`, tests/support/reference.py) loops over prompts and rollouts in plain
Python floats, written straight from the formulas; `tests/test_train_advantages.py` checks the vectorised side
against the same one.

Both compute the accuracy advantages (GRPO over all G rollouts) and the tool advantages (GRPO over the
correct rollouts) of the same random batch, interleaved, repeated, medians reported. Target: >= 50x.

    python benchmarks/bench_advantages.py [--prompts 128] [--rollouts 16] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from curate_testkit.reference import reference_grpo, reference_tool
from torch import Tensor

from curate.train.advantages import accuracy_rewards, grpo_advantages, tool_advantages, tool_rewards


def random_batch(prompts: int, rollouts: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(r_acc, r_tool) for a batch whose prompts range from never to always solved."""
    generator = torch.Generator().manual_seed(seed)
    solve_rate = torch.rand(prompts, 1, generator=generator)
    correct = torch.rand(prompts, rollouts, generator=generator) < solve_rate
    format_ok = torch.rand(prompts, rollouts, generator=generator) < 0.9
    tool_calls = torch.randint(0, 6, (prompts, rollouts), generator=generator)
    return accuracy_rewards(correct, format_ok), tool_rewards(correct, tool_calls)


def timed(run: Callable[[], object], times: list[float]) -> None:
    """Run once and append its wall time to `times`."""
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    r_acc, r_tool = random_batch(args.prompts, args.rollouts)

    def vectorised() -> tuple[Tensor, Tensor]:
        return grpo_advantages(r_acc), tool_advantages(r_tool)

    def per_sample() -> tuple[Tensor, Tensor]:
        return reference_grpo(r_acc), reference_tool(r_tool)

    fast, slow = vectorised(), per_sample()  # also warms up both
    equal = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, slow))
    fast_times: list[float] = []
    slow_times: list[float] = []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        timed(vectorised, fast_times)
        timed(per_sample, slow_times)
    fast_s, slow_s = statistics.median(fast_times), statistics.median(slow_times)
    print(f"{args.prompts} prompts x {args.rollouts} rollouts, {args.repeats} repeats, torch threads "
          f"{torch.get_num_threads()}")
    print(f"vectorised {fast_s * 1e6:.0f} us, per-sample {slow_s * 1e6:.0f} us (medians)")
    print(f"vectorised vs per-sample: {slow_s / fast_s:.1f}x (target >= 50x)")
    print(f"results equal (allclose, atol 1e-5): {equal}")


if __name__ == "__main__":
    main()
