"""Checkpoints: the policy's weights and the optimizer state as a sharded `torch.distributed.checkpoint` (each rank
writes its own shards, nothing is gathered), plus the model's config and processor, the step and the random
generators' states, so that training resumes where it stopped and a resumed run samples exactly what the
uninterrupted one would have.

A checkpoint is keyed by parameter name and resharded on load, so it resumes at any number of processes
(`curate.train.distributed`), and every rank reads only its shards. `curate train export` writes one as a plain
`save_pretrained` folder; `load_model` (and so `--model`) reads one directly. The generators' states are rank 0's:
a sharded HDPO run seeds each step's sampling from (seed, step, rank) instead, so it does not need them."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dcp_state

from curate.errors import UserError
from curate.generation.hf import LoadedModel, load_model, materialise
from curate.models import resolve_model
from curate.train.distributed import Ranks, shard

STATE = "state"  # the distributed checkpoint: {"model": weights, "optimizer": AdamW's state}, by parameter name
TRAINER = "trainer_state.pt"  # the step and the random generators' states


def save_checkpoint(out: Path, step: int, loaded: LoadedModel, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any], ranks: Ranks = Ranks()) -> Path:
    """`out/checkpoint-<step>`, written to a scratch folder first so a kill never leaves half of one (a
    collective when the policy is sharded: every rank writes its shards, rank 0 the rest)."""
    target = out / f"checkpoint-{step:06d}"
    scratch = out / f".writing-checkpoint-{step:06d}"
    if ranks.main:
        if target.exists() and not is_checkpoint(target):  # replacing it must delete nothing curate did not write
            raise UserError(f"{target} exists and is not a curate checkpoint; move it away or choose another -o")
        shutil.rmtree(scratch, ignore_errors=True)
    ranks.wait()  # the scratch folder is fresh before any rank writes into it
    state = {"model": dcp_state.get_model_state_dict(loaded.net),
             "optimizer": dcp_state.get_optimizer_state_dict(loaded.net, optimizer)}
    with alone_is_meant(not ranks.active):
        dcp.save(state, checkpoint_id=scratch / STATE, no_dist=not ranks.active)
    if ranks.main:
        loaded.net.config.save_pretrained(scratch)
        if getattr(loaded.net, "generation_config", None) is not None:
            loaded.net.generation_config.save_pretrained(scratch)
        loaded.processor.save_pretrained(scratch)
        torch.save({"step": step, "rng": random_states()}, scratch / TRAINER)
        (scratch / "train_config.json").write_text(json.dumps(config, indent=1, default=str))
        if target.exists():  # a checkpoint of this step from a run killed after writing it: replaced
            shutil.rmtree(target)
        os.replace(scratch, target)
    ranks.wait()  # no rank goes on (or ends the run) before the checkpoint is in place
    return target


def is_checkpoint(folder: Path) -> bool:
    """Written by `save_checkpoint` (what it alone puts there), so that replacing it deletes nothing else."""
    return (folder / TRAINER).is_file() and (folder / "train_config.json").is_file()


def is_sharded_checkpoint(folder: Path) -> bool:
    return is_checkpoint(folder) and (folder / STATE / ".metadata").is_file()


def read_weights(checkpoint: Path, net: torch.nn.Module, whole: bool = False) -> None:
    """Load a checkpoint's weights into `net`, materialised (each rank its shards, read and resharded by DCP); `whole`:
    in this process alone, even under torchrun (a model read whole, not a shard)."""
    state = {"model": dcp_state.get_model_state_dict(net)}
    alone = whole or not torch.distributed.is_initialized()
    with alone_is_meant(alone):
        dcp.load(state, checkpoint_id=checkpoint / STATE, no_dist=alone)
    dcp_state.set_model_state_dict(net, state["model"])


def load_policy(source: str, device: str, ranks: Ranks, bf16: bool = False,
                activation_checkpointing: bool = False) -> LoadedModel:
    """The policy in float32, sharded over `ranks` when they are several. Sharded, each rank builds it on the meta
    device and materialises only its shards: from a checkpoint, each reads its shards; from any other model, rank 0
    alone reads it whole and sends each rank its shards."""
    if not ranks.active:
        loaded = load_model(source, device, "float32")
        shard(loaded.net, ranks, bf16, activation_checkpointing)
        return loaded
    loaded = load_model(source, device, "float32", weights=False)
    shard(loaded.net, ranks, bf16, activation_checkpointing)
    materialise(loaded.net, device)
    if is_sharded_checkpoint(Path(source)):
        read_weights(Path(source), loaded.net)
        return loaded
    folder = Path(resolve_model(source))
    if reads_as_is(folder, loaded.net):  # each rank reads only its slices of the safetensors files
        # A tied head is not in the files and is the embedding's parameter: loaded through that one's name alone.
        second = tied_names(loaded.net)
        state = {name: tensor for name, tensor in dcp_state.get_model_state_dict(loaded.net).items()
                 if name not in second}
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))  # keyed as the files are
        dcp_state.set_model_state_dict(loaded.net, state, options=dcp_state.StateDictOptions(strict=False))
        return loaded
    # Weights that transformers converts on load (renamed or fused): rank 0 loads them whole, sends the shards.
    whole = load_model(source, "cpu", "float32").net.state_dict() if ranks.main else {}
    options = dcp_state.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp_state.set_model_state_dict(loaded.net, whole, options=options)
    return loaded


def reads_as_is(folder: Path, net: torch.nn.Module) -> bool:
    """Whether the model folder's safetensors files hold every parameter and buffer `net` saves, by the same name
    (a tied head aside): what reading slices of them straight into the shards needs."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return False
    stored: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update(handle.keys())
    return set(net.state_dict()) - tied_names(net) <= stored


def tied_names(net: torch.nn.Module) -> set[str]:
    """The second names of parameters met under two (a head sharing the embedding's weight)."""
    first = {name for name, _ in net.named_parameters()}
    return {name for name, _ in net.named_parameters(remove_duplicate=False)} - first


def start_or_resume(out: Path, model: str, device: str, lr: float, resume: bool, ranks: Ranks = Ranks(),
                    bf16: bool = False, activation_checkpointing: bool = False,
                    ) -> tuple[LoadedModel, torch.optim.Optimizer, int, str]:
    """(model, AdamW, steps done, where the weights came from): from the latest checkpoint in `out` with its
    optimizer state when `resume` finds one, else `model` fresh at step 0; sharded over `ranks` when they are
    several."""
    start = latest_checkpoint(out) if resume else None
    if start is not None and not is_sharded_checkpoint(start):
        raise UserError(f"{start} is not a checkpoint curate train wrote (no {TRAINER} and {STATE}/ in it), so "
                        "nothing resumes from it: move it out of the way or train into a new -o")
    loaded = load_policy(str(start or model), device, ranks, bf16, activation_checkpointing)
    optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=lr)
    if start is None:
        return loaded, optimizer, 0, model
    # The state dict to load into: AdamW's state allocated (by a step at learning rate 0), sharded like the policy.
    state = {"optimizer": dcp_state.get_optimizer_state_dict(loaded.net, optimizer)}
    with alone_is_meant(not ranks.active):
        dcp.load(state, checkpoint_id=start / STATE, no_dist=not ranks.active)
    dcp_state.set_optimizer_state_dict(loaded.net, optimizer, state["optimizer"])
    trainer = torch.load(start / TRAINER)
    if ranks.main:
        restore_random_states(trainer["rng"])
    return loaded, optimizer, int(trainer["step"]), str(start)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, whole, on the CPU, by the names `save_pretrained` writes."""
    net = load_model(str(checkpoint), "cpu", "float32").net
    return {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}


def export(run: Path, out: Path) -> Path:
    """The latest checkpoint of the training directory `run` (or the checkpoint `run`) as a plain `save_pretrained`
    folder `out`, which transformers and vLLM load; read whole in this one process."""
    checkpoint = run if is_checkpoint(run) else latest_checkpoint(run)
    if checkpoint is None:
        raise UserError(f"{run}: no checkpoint-* folder in it, nor is it a checkpoint of curate train")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another folder")
    loaded = load_model(str(checkpoint), "cpu", "float32")
    loaded.net.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out


@contextmanager
def alone_is_meant(alone: bool) -> Iterator[None]:
    """DCP warns on every save or load in one process without a process group; here that is what is meant."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", "torch.distributed is .*assuming the intent is to", UserWarning)
        yield


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
