"""Peak memory and time of one HDPO update as the rollouts grow, micro-batched (`--micro-batch-tokens`, chunked
log-probs) against the one-pass update with full-vocabulary logits that the trainer ran before.

Each (path, rollouts) runs in a fresh process: the model loaded, then one update of `rollouts` rollout-shaped
rows (a masked prompt, policy tokens, a masked observation, policy tokens) of `--tokens` tokens; its peak is the
process's resident memory sampled every 5 ms during the update, less what it held just before (the model and
the optimizer's state, allocated by a first update of two short rows). The processes run with glibc's mmap
threshold fixed (`MALLOC_MMAP_THRESHOLD_`): every large tensor then gets its own mapping, returned when freed, so
resident memory follows the tensors alive; with glibc's default, which raises the threshold as large blocks are
freed, a freed micro-batch's activations stayed resident in the heap and the peak read the allocator's
fragmentation rather than what the update held. The time ratio comes
from the same processes: the update's seconds, the two paths run one after the other at each size.

    python benchmarks/bench_trainer_memory.py [--rollouts 8,16,64] [--legacy-up-to 16] [--tokens 256]
        [--micro-batch-tokens 2048] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from curate.generation.hf import LoadedModel, load_model
from curate.sample import Message, Sample, TextPart
from curate.train.hdpo import HDPOConfig, update
from curate.train.loss import hdpo_loss
from curate.train.rollout import Rollout, padded


def rollouts(rows: int, tokens: int, vocab: int) -> list[Rollout]:
    generator = torch.Generator().manual_seed(0)
    prompt = Sample("p", "bench", [Message("user", [TextPart("q")])], [], "1")
    quarter = tokens // 4
    mask = [0] * quarter + [1] * quarter + [0] * quarter + [1] * (tokens - 3 * quarter)
    return [Rollout(prompt, torch.randint(100, vocab, (tokens,), generator=generator).tolist(), mask, {}, {}, [])
            for _ in range(rows)]


def legacy_update(loaded: LoadedModel, optimizer: torch.optim.Optimizer, batch_rollouts: list[Rollout],
                  adv_acc: torch.Tensor, adv_tool: torch.Tensor, config: HDPOConfig) -> None:
    """The update as the trainer ran it before: every row in one forward and backward pass, log-probs from the
    full-vocabulary float32 logits."""
    batch = padded(batch_rollouts, loaded.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    logits = loaded.net(**inputs).logits[:, :-1].float() / config.temperature
    logprobs = torch.gather(logits.log_softmax(-1), 2, batch["input_ids"][:, 1:, None]).squeeze(-1)
    losses = hdpo_loss(logprobs, logprobs.detach(), batch["loss_mask"][:, 1:], adv_acc.flatten(), adv_tool.flatten(),
                       config.w_acc, config.w_tool, config.epsilon, config.dual_clip)
    optimizer.zero_grad()
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(loaded.net.parameters(), config.max_grad_norm)
    optimizer.step()


def one(model: str, path: str, rows: int, tokens: int, micro_batch_tokens: int) -> dict[str, float]:
    """One update in this process: its peak memory over the memory before it, and its seconds."""
    torch.manual_seed(0)
    loaded = load_model(model, "cpu", "float32")
    loaded.net.train()
    batch_rollouts = rollouts(rows, tokens, loaded.net.config.vocab_size)
    generator = torch.Generator().manual_seed(1)
    adv_acc, adv_tool = torch.randn(1, rows, generator=generator), torch.randn(1, rows, generator=generator)
    optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=1e-6)
    config = HDPOConfig(model=model, shards=[], out=Path("."), micro_batch_tokens=micro_batch_tokens)
    # A first update of two short rows allocates AdamW's state: the measured one holds only what the rows cost.
    update(loaded, optimizer, rollouts(2, 8, loaded.net.config.vocab_size),
           {"acc": adv_acc[:, :2], "tool": adv_tool[:, :2]}, config)
    process = psutil.Process()
    before = process.memory_info().rss
    peak, running = [before], True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if path == "legacy":
        legacy_update(loaded, optimizer, batch_rollouts, adv_acc, adv_tool, config)
    else:
        update(loaded, optimizer, batch_rollouts, {"acc": adv_acc, "tool": adv_tool}, config)
    seconds = time.perf_counter() - started
    running = False
    sampler.join()
    return {"peak_gib": (peak[0] - before) / 2**30, "seconds": seconds,
            "params": sum(p.numel() for p in loaded.net.parameters())}


def run_one(args: argparse.Namespace, path: str, rows: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--one", path, str(rows), "--model", args.model,
                             "--tokens", str(args.tokens), "--micro-batch-tokens", str(args.micro_batch_tokens)],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rollouts", default="8,16,64")
    parser.add_argument("--legacy-up-to", type=int, default=16, help="The one-pass path only up to this many rows.")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--one", nargs=2, metavar=("PATH", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one[0], int(args.one[1]), args.tokens, args.micro_batch_tokens)))
        return
    print(f"model {args.model}, {args.tokens} tokens per rollout, micro-batches of {args.micro_batch_tokens} tokens; "
          f"peak: resident memory over that before the update")
    print(f"{'rollouts':>8} {'micro GiB':>10} {'one-pass GiB':>13} {'memory ratio':>13} {'micro s':>8} "
          f"{'one-pass s':>11} {'time ratio':>11}")
    for rows in [int(n) for n in args.rollouts.split(",")]:
        micro = run_one(args, "micro", rows)
        legacy = run_one(args, "legacy", rows) if rows <= args.legacy_up_to else None
        line = f"{rows:>8} {micro['peak_gib']:>10.2f}"
        if legacy:
            line += (f" {legacy['peak_gib']:>13.2f} {micro['peak_gib'] / legacy['peak_gib']:>13.2f}"
                     f" {micro['seconds']:>8.1f} {legacy['seconds']:>11.1f}"
                     f" {micro['seconds'] / legacy['seconds']:>11.2f}")
        else:
            line += f" {'-':>13} {'-':>13} {micro['seconds']:>8.1f} {'-':>11} {'-':>11}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
