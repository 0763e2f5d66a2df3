"""Train and measure the toy policy of `curate_testkit.toy` through the trainer's own entry points: a base model,
an always-tool cold start, then RL (HDPO or a baseline), with tool use and accuracy measured per kind.

Used by the "it learns" test and `benchmarks/bench_ablation.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from curate_testkit.toy import DILEMMA_KINDS, KINDS, NUMBERS, base_data, build_toy_policy, cold_start_data, toy_prompts

from curate.formats import get_format
from curate.generation.hf import load_model
from curate.sample import Sample
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.hdpo import HDPOConfig, train_hdpo
from curate.train.rollout import Rollout, RolloutConfig, RolloutEngine
from curate.train.sft import SFTConfig, train_sft
from curate.verify import AnswerVerifier

MAX_TURNS, MAX_NEW_TOKENS, MAX_TOKENS = 3, 14, 160  # a call is 5-6 tokens, an answer 4; one spare call for chain


@dataclass(frozen=True)
class Suite:
    kinds: tuple[str, ...]
    max_turns: int  # calls a rollout may make


SUITES = {"toy": Suite(KINDS, MAX_TURNS), "dilemma": Suite(DILEMMA_KINDS, 4)}  # triple's three calls and one spare


@dataclass(frozen=True)
class Rates:
    tool_calls: float  # share of rollouts that called the tool at least once
    mean_calls: float
    accuracy: float


def bucket(prompt: Sample) -> str:
    """What a rollout is reported under: its kind, with `lookup` split into the numbers the base model knows
    (the tool is not needed) and the others."""
    kind = prompt.meta["kind"]
    if kind != "lookup":
        return kind
    return "lookup-known" if prompt.meta["calls_needed"] == 0 else "lookup-new"


def write_shard(samples: list[Sample], path: Path, fmt: str) -> list[Path]:
    get_format(fmt).write(samples, path)
    return [path]


def sample_rollouts(checkpoint: Path, prompts: list[Sample], samples_per_prompt: int, seed: int,
                    max_turns: int = MAX_TURNS) -> list[Rollout]:
    """Rollouts sampled as HDPO samples them (temperature 1, the python tool in the sandbox)."""
    torch.manual_seed(seed)
    loaded = load_model(str(checkpoint), "cpu", "float32")
    loaded.net.eval()
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns, MAX_NEW_TOKENS, MAX_TOKENS))
        return engine.run([engine.start(p) for p in prompts for _ in range(samples_per_prompt)])


def rates(rollouts: list[Rollout]) -> dict[str, Rates]:
    """Tool-call rate, mean calls and accuracy per bucket."""
    verify = AnswerVerifier()
    correct = [verify(r.final_text, r.prompt.answer).correct for r in rollouts]
    found: dict[str, Rates] = {}
    for name in dict.fromkeys(bucket(r.prompt) for r in rollouts):
        mine = [(r, ok) for r, ok in zip(rollouts, correct, strict=True) if bucket(r.prompt) == name]
        found[name] = Rates(mean(r.tool_calls > 0 for r, _ in mine), mean(r.tool_calls for r, _ in mine),
                            mean(ok for _, ok in mine))
    return found


def tool_productivity(rollouts: Iterable[Rollout]) -> float | None:
    """OTC's tool productivity: correct answers per tool call over all rollouts (None without any call)."""
    verify = AnswerVerifier()
    done = list(rollouts)
    calls = sum(r.tool_calls for r in done)
    return sum(verify(r.final_text, r.prompt.answer).correct for r in done) / calls if calls else None


def pretrain(folder: Path, seed: int, kinds: tuple[str, ...] = KINDS, numbers: range = NUMBERS) -> Path:
    """The RL starting point: a base model (direct answers where it knows them, tool use everywhere), then a
    brief always-tool cold start (not to saturation), after which the policy calls the tool almost always.

    The base stands for the pretrained LLM a cold start begins from. A model trained from scratch on tool
    trajectories only never samples a direct answer (its probability falls to ~1e-4), and RL can reinforce
    only what it samples."""
    model = build_toy_policy(folder / "toy", seed=seed)
    base_shard = write_shard(base_data(kinds, numbers), folder / "base.parquet", "messages")
    base = train_sft(SFTConfig(model=str(model), shards=base_shard, out=folder / "base", epochs=25, lr=1e-3,
                               batch_size=32, seed=seed, device="cpu"))
    cold = write_shard(cold_start_data(kinds, numbers), folder / "cold.parquet", "messages")
    return train_sft(SFTConfig(model=str(base), shards=cold, out=folder / "cold", epochs=1, lr=5e-5, batch_size=16,
                               seed=seed, device="cpu"))


def tune(start: Path, out: Path, seed: int, prompts: list[Sample] | None = None, **hdpo: Any) -> Path:
    """RL from `start` on the toy prompts; `hdpo` overrides HDPOConfig's fields (algo, steps, lr, w_tool, ...)."""
    settings: dict[str, Any] = {"steps": 30, "prompts_per_step": 16, "rollouts": 8, "lr": 2e-4,
                                "max_turns": MAX_TURNS, "max_new_tokens": MAX_NEW_TOKENS, "max_tokens": MAX_TOKENS,
                                "seed": seed, "device": "cpu", **hdpo}
    shard = write_shard(prompts or toy_prompts(), out.parent / f"{out.name}-prompts.parquet", "verl")
    return train_hdpo(HDPOConfig(model=str(start), shards=shard, out=out, **settings))
