"""The trainer on several processes: torch.distributed under `torchrun` (or `--nproc N`), the policy sharded with
FSDP2 (`fully_shard`: parameters, gradients and AdamW's state split across ranks).

A run is data-parallel: each rank takes its share of a step's batch (SFT: micro-batches; HDPO: prompts, each
with all G of its rollouts, so advantages need no exchange) and FSDP averages the gradients over the ranks.
The losses are scaled so that the average equals the one-process gradient of the whole batch (`Ranks.world`
times a rank's share of the global mean), which makes an N-process step the one-process step on the same data.

Without torchrun nothing here acts: `Ranks()` is one process whose collectives are identities.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from curate.errors import UserError

# A rank that waits longer than this in a collective ends the run with an error instead of hanging (a rank that
# dies is noticed sooner: torchrun's agent stops the others). Long: HDPO's ranks meet after their rollouts,
# which take as long as the slowest rank's sampling and tool calls.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run, and the collectives the trainer needs (identities in one process)."""

    rank: int = 0
    world: int = 1
    active: bool = False  # under torchrun: a process group is up and the policy is sharded

    @property
    def main(self) -> bool:
        """The rank that writes files and shows progress."""
        return self.rank == 0

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the ranks (a token count, a loss share)."""
        if not self.active:
            return value
        summed = value.detach().clone()
        dist.all_reduce(summed)
        return summed

    def most(self, value: int) -> int:
        """The largest of the ranks' `value`s (how many passes every rank must run)."""
        if not self.active:
            return value
        largest = torch.tensor(value)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest)

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks, in one collective."""
        if not self.active or not values:
            return values
        summed = self.total(torch.tensor(list(values.values()), dtype=torch.float64))
        return dict(zip(values, summed.tolist(), strict=True))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's `rows` (equal shapes), concatenated in rank order along the first dimension."""
        if not self.active:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def wait(self) -> None:
        """Until every rank is here."""
        if self.active:
            dist.barrier()

    def share(self, items: list, what: str) -> list:
        """This rank's contiguous part of `items`, which must split evenly (every rank runs the same passes)."""
        check_even_split(len(items), self.world, what)
        size = len(items) // self.world
        return items[self.rank * size:(self.rank + 1) * size]


def check_even_split(count: int, processes: int, what: str) -> None:
    """A one-line error unless `count` items split evenly over `processes` (every rank runs the same passes)."""
    if count % processes:
        raise UserError(f"{what}: {count} do not split evenly over {processes} processes: use a multiple of {processes}")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


@contextmanager
def process_group(device: str) -> Iterator[tuple[Ranks, str]]:
    """(ranks, this rank's device): under torchrun, joins the process group its environment describes (NCCL
    on GPUs, one per local rank; gloo on CPUs) and leaves it at the end; otherwise one process on `device`."""
    if not under_torchrun():
        yield Ranks(), device
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), True), device
    finally:
        if dist.is_initialized():  # a vLLM engine, stopped, takes the group down with it
            dist.destroy_process_group()


def shard(net: torch.nn.Module, ranks: Ranks, bf16: bool, activation_checkpointing: bool) -> None:
    """FSDP2 over the policy: each transformer block its own unit (its full weights exist only during its
    forward and backward), then the rest (embeddings, head) at the root. `bf16` computes in bfloat16 over
    float32 master weights and reduces gradients in float32; activation checkpointing recomputes each block's
    activations in the backward pass instead of keeping them."""
    if activation_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not ranks.active:
        if bf16:
            raise UserError("--bf16 is FSDP's mixed precision: run under torchrun, or add --nproc 1")
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    blocks = getattr(net, "_no_split_modules", None) or []
    for module in net.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(net, mp_policy=policy)


def sharded(net: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


@contextmanager
def gradient_sync(net: torch.nn.Module, reduce: bool) -> Iterator[None]:
    """Around one micro-batch's backward pass: whether a sharded policy reduces gradients over the ranks after it
    (at least after the last micro-batch of an optimizer step). Without, each rank accumulates its unsharded,
    unreduced gradients (FSDP's no_sync): one collective a step, for the whole model's gradients in memory."""
    if not sharded(net):
        yield
        return
    net.set_requires_gradient_sync(reduce)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def full_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's whole `state_dict` on every rank, on its device (a collective for a sharded policy): what a
    rank's sampler (an unsharded copy, or vLLM) loads after each update."""
    if not sharded(net):
        return net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: for sharded gradients `clip_grad_norm_` returns it as a replicated DTensor,
    already reduced over the ranks."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
