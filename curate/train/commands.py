"""`curate train sft` and `curate train hdpo`: their options are the config dataclasses' fields (`config_options`),
so each setting has one default and one help. Loaded when `curate train` names one of them: the configs import
torch, which `curate` does not load to start."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from curate.cache import DEFAULT_CACHE_PATH
from curate.errors import UserError
from curate.train.algorithms import ALGORITHMS
from curate.train.distributed import check_even_split
from curate.train.hdpo import HDPOConfig, train_hdpo
from curate.train.settings import config_from, config_options
from curate.train.sft import SFTConfig, train_sft

ALGO_OPTION = {"type": click.Choice(list(ALGORITHMS)),
               "help": "; ".join(f"{name}: {entry.summary}" for name, entry in ALGORITHMS.items()) + "."}

# Not a setting of the run: how many processes it starts in.
NPROC_OPTION = click.option("--nproc", type=click.IntRange(min=1),
                            help="Train in N processes on this machine (torchrun --standalone --nproc-per-node N): "
                                 "data parallel, the policy sharded with FSDP2.")


@click.command("sft")
@config_options(SFTConfig)
@NPROC_OPTION
def train_sft_command(nproc: int | None, **values: Any) -> None:
    """SFT cold start on SHARDS (run directories of an SFT recipe, or shard files)."""
    config = config_from(SFTConfig, values)
    if not _launched(nproc):
        _say_checkpoint(train_sft(config))


@click.command("hdpo")
@config_options(HDPOConfig, {"algo": ALGO_OPTION})
@NPROC_OPTION
@click.option("--judge-backend", type=click.Choice(["gemini", "openai", "transformers"]),
              help="An LLM judge (CORRECT / INCORRECT) for answers the verification rules cannot decide.")
@click.option("--judge-model", help="The judge's model (with --judge-backend).")
@click.option("--judge-base-url", help="The judge server's base URL (openai, or a Gemini proxy).")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=DEFAULT_CACHE_PATH, show_default=True,
              help="SQLite cache of judge verdicts, shared with `curate run`.")
def train_hdpo_command(nproc: int | None, judge_backend: str | None, judge_model: str | None,
                       judge_base_url: str | None, cache_path: Path, **values: Any) -> None:
    """HDPO on SHARDS (run directories of an RL recipe, or verl shard files)."""
    config = config_from(HDPOConfig, values)
    if judge_backend and not judge_model:
        raise UserError("--judge-backend needs --judge-model")
    if nproc:  # said before any process starts, as each rank would say it (Ranks.share)
        check_even_split(config.prompts_per_step, nproc, "--prompts")
    if _launched(nproc):
        return
    judge = None
    if judge_backend:
        # The command composes the parts: the trainer knows only the judge's call signature, not `judges/`.
        verifier = importlib.import_module("curate.judges.verifier").JudgeVerifier
        judge = verifier(cache_path, backend=judge_backend, model=judge_model,
                         backend_options={"base_url": judge_base_url} if judge_base_url else {})
    try:
        _say_checkpoint(train_hdpo(config, judge))
    finally:
        if judge is not None:
            judge.close()


def _say_checkpoint(checkpoint: Path) -> None:
    if os.environ.get("RANK", "0") == "0":  # once, under torchrun
        click.echo(f"checkpoint: {checkpoint}")


def _launched(nproc: int | None) -> bool:
    """With --nproc and not yet under torchrun: this command ran in that many processes (True)."""
    from curate.train.distributed import under_torchrun

    if nproc is None or under_torchrun():
        return False
    from curate.train.launch import launch

    launch(nproc, sys.argv[1:])
    return True
