"""The trainer in 2 processes (torchrun, gloo, FSDP2) against 1, side by side in one run, on the CPU:

1. step time: SFT on the toy policy, the same global batch a step (1 process: 2 micro-batches a step; 2
   processes: 1 each), median seconds a step after the first; and one HDPO step (rollouts + update) on the toy;
2. peak memory per rank: SFT on a bigger toy (hidden 1024, 8 layers, 109M parameters, so that parameters,
   gradients and AdamW's state dominate), peak RSS of each rank above its RSS before loading the model;
3. what FSDP's collectives cost here: gloo's all-gather and reduce-scatter of 200 MB (a float32 model of 50M
   parameters) between the 2 processes, which a sharded step runs for every block, forward and backward.

Every process runs one compute thread (OMP_NUM_THREADS=1): 2 processes use 2 cores, 1 uses 1.

    python benchmarks/bench_distributed.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def collectives(out: str) -> None:
    """Seconds of gloo's all-gather and reduce-scatter of a 200 MB float32 tensor (median of 3), to OUT/comm.json."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    whole, shard = torch.empty(50_000_000), torch.randn(25_000_000)
    seconds = {}
    for name, collective in (("all_gather", lambda: dist.all_gather_into_tensor(whole, shard)),
                             ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, whole))):
        collective()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            collective()
            times.append(time.perf_counter() - started)
        seconds[name] = statistics.median(times)
    if dist.get_rank() == 0:
        (Path(out) / "comm.json").write_text(json.dumps(seconds))
    dist.destroy_process_group()


def worker(kind: str, model: str, data: str, out: str, count: int) -> None:
    """Run under torchrun or alone: train (SFT: one epoch at `count` micro-batches a rank a step; HDPO: `count`
    steps), then write this rank's memory figures to OUT/memory-<rank>.json."""
    import transformers  # noqa: F401

    import curate.train.hdpo  # noqa: F401  (imports before the baseline: their memory is not the model's)

    baseline = peak_rss_mib()
    if kind == "sft":
        from curate.train.sft import SFTConfig, train_sft

        train_sft(SFTConfig(model=model, shards=[Path(data)], out=Path(out), epochs=1, lr=1e-4, batch_size=4,
                            grad_accum=count, max_tokens=64, device="cpu"))
    else:
        from curate_testkit.toy_runs import MAX_NEW_TOKENS, MAX_TOKENS, MAX_TURNS

        from curate.train.hdpo import HDPOConfig, train_hdpo

        train_hdpo(HDPOConfig(model=model, shards=[Path(data)], out=Path(out), steps=count, prompts_per_step=8,
                              rollouts=4, lr=1e-4, max_turns=MAX_TURNS, max_new_tokens=MAX_NEW_TOKENS,
                              max_tokens=MAX_TOKENS, device="cpu", sandbox_workers=1))
    rank = os.environ.get("RANK", "0")
    (Path(out) / f"memory-{rank}.json").write_text(json.dumps({"baseline_mib": baseline, "peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss, which keeps the peak of the
    process image it replaced, here the benchmark's own)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run(kind: str, model: Path, data: Path, out: Path, processes: int, count: int) -> dict:
    """Step seconds (median after the first) and each rank's peak memory in one run."""
    command = [str(Path(__file__).resolve()), "--worker", kind, str(model), str(data), str(out), str(count)]
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    subprocess.run([*launcher, *command], check=True, env=ENV, capture_output=True)
    log = out / ("sft_log.jsonl" if kind == "sft" else "hdpo_log.jsonl")
    seconds = [json.loads(line)["seconds"] for line in log.read_text().splitlines()]
    memory = [json.loads((out / f"memory-{rank}.json").read_text()) for rank in range(processes)]
    return {"step_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0], "steps": len(seconds),
            "above_baseline_mib": [round(m["peak_mib"] - m["baseline_mib"]) for m in memory],
            "peak_mib": [round(m["peak_mib"]) for m in memory]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="SFT optimizer steps per run")
    parser.add_argument("--hdpo-steps", type=int, default=3)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, model, data, out, steps = args.worker
        if kind == "comm":
            collectives(out)
        else:
            worker(kind, model, data, out, int(steps))
        return

    from curate_testkit.toy import build_toy_policy, cold_start_data, toy_prompts

    from curate.formats import get_format

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        toy = build_toy_policy(folder / "toy")
        big = build_toy_policy(folder / "big", hidden=1024, layers=8, heads=16)
        sft_data = folder / "sft.parquet"
        # 2 micro-batches of 4 per step, `steps` steps, in one epoch
        get_format("messages").write(cold_start_data(("hash", "chain"), range(1, 1 + 4 * args.steps)), sft_data)
        prompts = folder / "prompts.parquet"
        get_format("verl").write(toy_prompts(), prompts)
        # the worker's grad_accum is per rank: 2 micro-batches a step in one process, 1 a rank in two
        results = {}
        for name, model in (("toy", toy), ("big", big)):
            for processes, accum in ((1, 2), (2, 1)):
                results[name, processes] = run("sft", model, sft_data, folder / f"{name}-{processes}", processes,
                                               accum)
        subprocess.run([*TORCHRUN, str(Path(__file__).resolve()), "--worker", "comm", "-", "-", scratch, "0"],
                       check=True, env=ENV, capture_output=True)
        comm = json.loads((folder / "comm.json").read_text())
        for processes in (1, 2):
            results["hdpo", processes] = run("hdpo", toy, prompts, folder / f"hdpo-{processes}", processes,
                                             args.hdpo_steps)
    for key, value in results.items():
        print(key, json.dumps(value))
    ratio = lambda name, field: results[name, 2][field] / results[name, 1][field]  # noqa: E731
    print(f"SFT step, toy: 1 process {results['toy', 1]['step_s']:.3f} s, 2 processes {results['toy', 2]['step_s']:.3f} s:"
          f" ratio {ratio('toy', 'step_s'):.2f}")
    print(f"SFT step, big toy: 1 process {results['big', 1]['step_s']:.3f} s, 2 processes "
          f"{results['big', 2]['step_s']:.3f} s: ratio {ratio('big', 'step_s'):.2f}")
    print(f"HDPO step, toy (8 prompts x G 4): 1 process {results['hdpo', 1]['step_s']:.2f} s, 2 processes "
          f"{results['hdpo', 2]['step_s']:.2f} s: ratio {ratio('hdpo', 'step_s'):.2f}")
    (alone,), (rank0, rank1) = results["big", 1]["above_baseline_mib"], results["big", 2]["above_baseline_mib"]
    print(f"peak memory above the process's own before loading, big toy SFT: unsharded {alone} MiB; FSDP over 2, rank 1 "
          f"{rank1} MiB: ratio {rank1 / alone:.2f}; rank 0, which also gathers the whole weights and optimizer state "
          f"to write the checkpoint, {rank0} MiB: ratio {rank0 / alone:.2f} (whole RSS: {results['big', 1]['peak_mib']}"
          f" vs {results['big', 2]['peak_mib']} MiB)")
    print(f"gloo between the 2 processes, 200 MB: all-gather {comm['all_gather']:.3f} s, reduce-scatter "
          f"{comm['reduce_scatter']:.3f} s (a sharded step of the big toy moves 437 MB each way, 3 times)")


if __name__ == "__main__":
    main()
