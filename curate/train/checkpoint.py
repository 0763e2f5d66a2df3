"""Checkpoints: `save_pretrained` folders that load anywhere transformers does, plus the optimizer state,
the step and the random generators' states, so that training resumes where it stopped and a resumed run
samples exactly what the uninterrupted one would have."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from curate.generation.hf import LoadedModel, load_model


def save_checkpoint(out: Path, step: int, loaded: LoadedModel, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any]) -> Path:
    """`out/checkpoint-<step>`, written to a scratch folder first so a kill never leaves half of one."""
    target = out / f"checkpoint-{step:06d}"
    scratch = out / f".writing-checkpoint-{step:06d}"
    shutil.rmtree(scratch, ignore_errors=True)
    loaded.net.save_pretrained(scratch)
    loaded.processor.save_pretrained(scratch)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": random_states()}, scratch / "optimizer.pt")
    (scratch / "train_config.json").write_text(json.dumps(config, indent=1, default=str))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def start_or_resume(out: Path, model: str, device: str, lr: float,
                    resume: bool) -> tuple[LoadedModel, torch.optim.Optimizer, int]:
    """(model, AdamW, steps done): from the latest checkpoint in `out` with its optimizer state when
    `resume` finds one, else `model` fresh at step 0."""
    start = latest_checkpoint(out) if resume else None
    loaded = load_model(str(start or model), device, "float32")
    optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=lr)
    if start is None:
        return loaded, optimizer, 0
    state = torch.load(start / "optimizer.pt")
    optimizer.load_state_dict(state["optimizer"])
    if "rng" in state:  # checkpoints written before the generators were saved resume with a fresh seed
        restore_random_states(state["rng"])
    return loaded, optimizer, state["step"]


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
