"""One HDPO update vs a bare forward + backward of the same batch with the same model, side by side.

The batch is rollout-shaped (8 rows of prompt + policy tokens + a masked observation), the model
SmolLM2-135M-Instruct on the CPU. The HDPO update is `curate.train.hdpo.update`: log-probabilities,
both advantage channels' clipped losses, backward and the optimizer step. Target: <= 1.25x.

    python benchmarks/bench_hdpo.py [--rows 8] [--tokens 192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from curate.generation.hf import load_model
from curate.sample import Message, Sample, TextPart
from curate.train.advantages import grpo_advantages, tool_advantages
from curate.train.hdpo import HDPOConfig, update
from curate.train.logprobs import token_logprobs
from curate.train.rollout import Rollout, padded


def rollouts(rows: int, tokens: int, vocab: int) -> list[Rollout]:
    """Rows of random tokens: a prompt quarter (masked), policy tokens, an observation block (masked)."""
    generator = torch.Generator().manual_seed(0)
    prompt = Sample("p", "bench", [Message("user", [TextPart("q")])], [], "1")
    out = []
    for _ in range(rows):
        ids = torch.randint(100, vocab, (tokens,), generator=generator).tolist()
        mask = [0] * (tokens // 4) + [1] * (tokens // 4) + [0] * (tokens // 4) + [1] * (tokens - 3 * (tokens // 4))
        out.append(Rollout(prompt, ids, mask, {}, {}, []))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(args.model, "cpu", "float32")
    loaded.net.train()
    batch_rollouts = rollouts(args.rows, args.tokens, loaded.net.config.vocab_size)
    batch = padded(batch_rollouts, loaded.tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(1)
    correct = torch.rand(1, args.rows, generator=generator) > 0.5
    calls = torch.randint(0, 3, (1, args.rows), generator=generator)
    adv_acc = grpo_advantages(correct.float())
    adv_tool = tool_advantages(torch.where(correct, 1.0 / (calls + 1), 0.0))
    optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=1e-6)
    config = HDPOConfig(model=args.model, shards=[Path(".")], out=Path("."))

    def bare() -> None:
        loaded.net.zero_grad()
        (token_logprobs(loaded.net, batch) * batch["loss_mask"][:, 1:]).sum().backward()

    def hdpo() -> None:
        update(loaded, optimizer, batch_rollouts, {"acc": adv_acc, "tool": adv_tool}, config)

    timings: dict[str, list[float]] = {"bare": [], "hdpo": []}
    for step in (bare, hdpo):  # warm up both
        step()
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        for name, step in (("bare", bare), ("hdpo", hdpo)):
            started = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - started)
    bare_s, hdpo_s = statistics.median(timings["bare"]), statistics.median(timings["hdpo"])
    print(f"{args.rows} rows x {args.tokens} tokens, {args.model}: bare forward+backward {bare_s:.3f} s, "
          f"HDPO update {hdpo_s:.3f} s (medians of {args.repeats})")
    print(f"HDPO update vs bare forward+backward: {hdpo_s / bare_s:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    main()
