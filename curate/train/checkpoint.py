"""Checkpoints: `save_pretrained` folders that load anywhere transformers does, plus the optimizer state,
the step and the random generators' states, so that training resumes where it stopped and a resumed run
samples exactly what the uninterrupted one would have.

A checkpoint is consolidated: the weights and the optimizer state (keyed by parameter name) are whole, whatever
the number of processes that wrote it, so it resumes at any number (`curate.train.distributed`). A sharded run
gathers both on rank 0, which alone writes. The generators' states are rank 0's: a sharded HDPO run seeds each
step's sampling from (seed, step, rank) instead, so it does not need them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.state_dict as dcp

from curate.generation.hf import LoadedModel, load_model
from curate.train.distributed import Ranks, shard, sharded


def save_checkpoint(out: Path, step: int, loaded: LoadedModel, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any], ranks: Ranks = Ranks()) -> Path:
    """`out/checkpoint-<step>`, written to a scratch folder first so a kill never leaves half of one (a
    collective when the policy is sharded: every rank calls it, rank 0 writes)."""
    target = out / f"checkpoint-{step:06d}"
    whole = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0's CPU only
    weights = untied(loaded.net, dcp.get_model_state_dict(loaded.net, options=whole)) if sharded(loaded.net) else None
    optimizer_state = dcp.get_optimizer_state_dict(loaded.net, optimizer, options=whole)
    if not ranks.main:
        return target
    scratch = out / f".writing-checkpoint-{step:06d}"
    shutil.rmtree(scratch, ignore_errors=True)
    loaded.net.save_pretrained(scratch, state_dict=weights)
    loaded.processor.save_pretrained(scratch)
    torch.save({"optimizer": optimizer_state, "step": step, "rng": random_states()}, scratch / "optimizer.pt")
    (scratch / "train_config.json").write_text(json.dumps(config, indent=1, default=str))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def untied(net: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered state dict without the second name of a tied parameter (a head sharing the embedding's
    weight): `save_pretrained` leaves it out of a model's own state dict, but gathered tensors share no storage."""
    first = {name for name, _ in net.named_parameters()}
    every = {name for name, _ in net.named_parameters(remove_duplicate=False)}
    return {name: tensor for name, tensor in weights.items() if name in first or name not in every}


def start_or_resume(out: Path, model: str, device: str, lr: float, resume: bool, ranks: Ranks = Ranks(),
                    bf16: bool = False, activation_checkpointing: bool = False,
                    ) -> tuple[LoadedModel, torch.optim.Optimizer, int, str]:
    """(model, AdamW, steps done, where the weights came from): from the latest checkpoint in `out` with its
    optimizer state when `resume` finds one, else `model` fresh at step 0; sharded over `ranks` when they are
    several (each rank loads the whole model, then keeps its shard)."""
    start = latest_checkpoint(out) if resume else None
    loaded = load_model(str(start or model), device, "float32")
    shard(loaded.net, ranks, bf16, activation_checkpointing)
    optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=lr)
    if start is None:
        return loaded, optimizer, 0, model
    # Only rank 0 reads the file; set_optimizer_state_dict sends each rank its shard of the whole state.
    state = torch.load(start / "optimizer.pt") if ranks.main else {"optimizer": {}}
    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=ranks.active)
    dcp.set_optimizer_state_dict(loaded.net, optimizer, by_name(state["optimizer"], loaded.net), options=options)
    if "rng" in state:  # checkpoints written before the generators were saved resume with a fresh seed
        restore_random_states(state["rng"])
    return loaded, optimizer, int(start.name.removeprefix("checkpoint-")), str(start)


def by_name(state: dict[str, Any], net: torch.nn.Module) -> dict[str, Any]:
    """An optimizer state keyed by parameter name; one keyed by index (`Optimizer.state_dict`, as checkpoints
    were written before the trainer ran sharded) is renamed, its indices following `net.parameters()`."""
    groups = state.get("param_groups", [])
    if not groups or not all(isinstance(index, int) for group in groups for index in group["params"]):
        return state
    names = [name for name, _ in net.named_parameters()]
    return {"state": {names[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[index] for index in group["params"]]} for group in groups]}


def random_states() -> dict[str, Any]:
    """torch's CPU generator (what CPU sampling draws from) and, where CUDA is up, each GPU's."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*")) if out.exists() else []
    return found[-1] if found else None
