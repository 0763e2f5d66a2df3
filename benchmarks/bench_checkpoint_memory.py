"""Peak host memory per rank of loading the policy, saving a checkpoint and resuming from it, under torchrun (2
processes, gloo, FSDP2), the way the trainer did it before (every rank loads the whole float32 model, then keeps its
shard; rank 0 gathers the whole model and optimizer state and writes a `save_pretrained` folder and `optimizer.pt`)
against today's (the policy built on the meta device, each rank materialising only its shards; a sharded
`torch.distributed.checkpoint` that each rank writes and reads its own part of), side by side in one run.

The model is a random-weight toy Llama (`build_toy_policy`, hidden 1024, 8 layers: 109M parameters, 417 MB in
float32), stored in bfloat16 as hub checkpoints are and trained in float32. Each phase's figures are the rank's peak resident memory and peak anonymous memory (resident less
file pages mapped in, which a safetensors file read through mmap adds and the page cache can take back), sampled
every 5 ms, above what it held just before the phase (after the process group was up, for the load; the model's shards and AdamW's state, for the
save). The resume starts in a fresh pair of processes. As in bench_trainer_memory.py, glibc's mmap threshold is
fixed so that freed tensors leave resident memory.

    python benchmarks/bench_checkpoint_memory.py [--layers 8] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def resident() -> tuple[int, int]:
    """(resident memory, its anonymous part) in bytes: file pages mapped in (a safetensors file read through mmap)
    count in the first, not in the second, and are the page cache's, shared and reclaimable."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024)


def peak_above_now(action: Callable[[], object]) -> tuple[object, list[float]]:
    """(what `action` returned, [peak resident, peak anonymous] memory in MB while it ran, above that before)."""
    before = resident()
    peak = list(before)
    running = True

    def sample() -> None:
        while running:
            now = resident()
            peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = action()
    finally:
        running = False
        sampler.join()
    now = resident()
    return result, [(max(peak[kind], now[kind]) - before[kind]) / 2**20 for kind in (0, 1)]


def legacy_load(model: str, ranks, lr: float):  # the trainer's code before, as it was
    import torch

    from curate.generation.hf import load_model
    from curate.train.distributed import shard

    loaded = load_model(model, "cpu", "float32")
    shard(loaded.net, ranks, False, False)
    return loaded, torch.optim.AdamW(loaded.net.parameters(), lr=lr)


def legacy_save(out: Path, loaded, optimizer, ranks) -> None:
    import torch
    import torch.distributed.checkpoint.state_dict as dcp

    whole = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = dcp.get_model_state_dict(loaded.net, options=whole)
    first = {name for name, _ in loaded.net.named_parameters()}
    every = {name for name, _ in loaded.net.named_parameters(remove_duplicate=False)}
    weights = {name: tensor for name, tensor in weights.items() if name in first or name not in every}
    optimizer_state = dcp.get_optimizer_state_dict(loaded.net, optimizer, options=whole)
    if ranks.main:
        loaded.net.save_pretrained(out, state_dict=weights)
        loaded.processor.save_pretrained(out)
        torch.save({"optimizer": optimizer_state, "step": 1}, out / "optimizer.pt")


def legacy_resume(checkpoint: Path, ranks, lr: float) -> None:
    import torch
    import torch.distributed.checkpoint.state_dict as dcp

    loaded, optimizer = legacy_load(str(checkpoint), ranks, lr)
    state = torch.load(checkpoint / "optimizer.pt") if ranks.main else {"optimizer": {}}
    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp.set_optimizer_state_dict(loaded.net, optimizer, state["optimizer"], options=options)


def one_step(loaded, optimizer) -> None:
    """A forward, backward and AdamW step on a short row: the optimizer's state allocated, as in training."""
    import torch

    ids = torch.arange(1, 33)[None]
    loaded.net(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def worker(mode: str, phase: str, model: str, out: str) -> None:
    """One rank of one mode: `phase` "load-save" (load the model, one step, save) or "resume" (from that save)."""
    from curate.train.checkpoint import latest_checkpoint, load_policy, save_checkpoint, start_or_resume
    from curate.train.distributed import process_group

    lr = 1e-4
    folder = Path(out) / mode
    with process_group("cpu") as (ranks, _):
        figures = {}
        if phase == "load-save":
            if mode == "before":
                (loaded, optimizer), figures["load"] = peak_above_now(lambda: legacy_load(model, ranks, lr))
            else:
                import torch

                loaded, figures["load"] = peak_above_now(lambda: load_policy(model, "cpu", ranks))
                optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=lr)
            one_step(loaded, optimizer)
            if mode == "before":
                target = folder / "checkpoint-000001"
                target.mkdir(parents=True, exist_ok=True)
                _, figures["save"] = peak_above_now(lambda: legacy_save(target, loaded, optimizer, ranks))
            else:
                _, figures["save"] = peak_above_now(lambda: save_checkpoint(folder, 1, loaded, optimizer, {}, ranks))
        elif mode == "before":
            _, figures["resume"] = peak_above_now(lambda: legacy_resume(latest_checkpoint(folder), ranks, lr))
        else:
            _, figures["resume"] = peak_above_now(lambda: start_or_resume(folder, model, "cpu", lr, True, ranks))
        (Path(out) / f"{mode}-{phase}-rank{ranks.rank}.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    from curate_testkit.toy import build_toy_policy

    from curate.generation.hf import load_model

    with tempfile.TemporaryDirectory() as scratch:
        model = build_toy_policy(Path(scratch) / "model", hidden=args.hidden, layers=args.layers,
                                 heads=args.hidden // 64)
        # Stored in bfloat16 as hub checkpoints are: the trainer's float32 copy is then memory of its own, where a
        # float32 file would be mapped in as it is.
        net = load_model(str(model), "cpu", "bfloat16").net
        net.save_pretrained(model)
        parameters = sum(p.numel() for p in net.parameters())
        print(f"model: {parameters / 1e6:.0f}M parameters, {parameters * 4 / 2**20:.0f} MB in float32")
        for phase in ("load-save", "resume"):
            for mode in ("before", "after"):  # side by side: each phase of both modes one after the other
                subprocess.run([*TORCHRUN, __file__, "--worker", mode, phase, str(model), scratch], check=True,
                               env=ENV, capture_output=True)
        for kind, what in ((0, "resident memory"), (1, "anonymous memory (resident, less mapped file pages)")):
            print(f"\npeak {what} above the phase's start, MB per rank (rank 0 / rank 1)")
            print(f"{'phase':8} {'before':>15} {'after':>15} {'after/before':>15}")
            for phase, name in (("load-save", "load"), ("load-save", "save"), ("resume", "resume")):
                figures = {mode: [json.loads((Path(scratch) / f"{mode}-{phase}-rank{rank}.json").read_text())[name]
                                  [kind] for rank in (0, 1)] for mode in ("before", "after")}
                before, after = figures["before"], figures["after"]
                print(f"{name:8} {before[0]:7.0f} /{before[1]:6.0f} {after[0]:7.0f} /{after[1]:6.0f} "
                      f"{after[0] / before[0]:7.2f} /{after[1] / before[1]:6.2f}")

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:6])
    else:
        main()
