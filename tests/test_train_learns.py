"""It learns: on the toy tool task of `toy_policy`, HDPO drops the tool calls that prompts do not need while
accuracy holds, on CPU in about a minute (two cores).

Three stages, each through the trainer's own entry points:
1. a base model (`train_sft`): copy prompts answered directly, plus tool trajectories of both kinds. It stands
   for the pretrained LLM a cold start begins from, which can already answer easy questions without a tool.
   A model trained from scratch on tool trajectories only never samples a direct answer (its probability
   falls to ~1e-4), and RL can reinforce only what it samples. The base also calls the tool on copy prompts,
   so that what follows a number depends on whether it opened a call or an answer, not on the prompt's kind:
   else the cold start below rewrites a direct `<answer>42` to end like a call.
2. the cold start (`train_sft`): trajectories that always call the tool, briefly (24 steps, not to saturation):
   the policy now calls the tool on ~95% of copy prompts.
3. HDPO (`train_hdpo`, Metis's w_tool = 0.15): the tool-efficiency channel rewards the rare correct direct
   answers, the accuracy channel keeps the tool where it is needed.

Tool-call rates and accuracies are measured on rollouts sampled at temperature 1 (the policy as trained),
8 per prompt. Over seeds 0-4 (initialisation and trainer seed): copy prompts' tool-call rate 0.92-0.96 before
HDPO, 0.08-0.14 after; hash prompts' stays >= 0.98; accuracy changes by +0.02 to +0.05 on copy prompts and
-0.01 to +0.01 on hash prompts. With the accuracy channel alone (`algo="grpo"`) the copy tool-call rate only
drifts (0.96 -> 0.82, seed 0); with the tool channel alone (`w_acc=0`) the hash prompts lose the tool and
their accuracy (0.91 -> 0.00).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
from toy_policy import KINDS, NUMBERS, build_toy_policy, direct_answer, toy_prompt, toy_trajectory

from curate.formats import get_format
from curate.generation.hf import load_model
from curate.sample import Sample
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.hdpo import HDPOConfig, train_hdpo
from curate.train.rollout import RolloutConfig, RolloutEngine
from curate.train.sft import SFTConfig, train_sft
from curate.verify import AnswerVerifier

SEED = 0
MAX_TURNS, MAX_NEW_TOKENS, MAX_TOKENS = 2, 12, 120  # a call is 5 tokens, an answer 4; two calls at most
HDPO_STEPS, HDPO_LR = 30, 2e-4
SAMPLES_PER_PROMPT = 8  # when measuring: 768 rollouts per kind, a standard error of ~0.01 on an accuracy of 0.9


@dataclass(frozen=True)
class Rates:
    tool_calls: float  # share of rollouts that called the tool at least once
    accuracy: float


def write_shard(samples: list[Sample], path: Path, fmt: str) -> list[Path]:
    get_format(fmt).write(samples, path)
    return [path]


def measure(checkpoint: Path, prompts: list[Sample], seed: int) -> dict[str, Rates]:
    """Tool-call rate and accuracy per kind, over rollouts sampled as HDPO samples them."""
    torch.manual_seed(seed)
    loaded = load_model(str(checkpoint), "cpu", "float32")
    loaded.net.eval()
    verify = AnswerVerifier()
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(MAX_TURNS, MAX_NEW_TOKENS, MAX_TOKENS))
        rollouts = engine.run([engine.start(p) for p in prompts for _ in range(SAMPLES_PER_PROMPT)])
    rates = {}
    for kind in KINDS:
        mine = [r for r in rollouts if r.prompt.meta["kind"] == kind]
        rates[kind] = Rates(mean(r.tool_calls > 0 for r in mine),
                            mean(verify(r.final_text, r.prompt.answer).correct for r in mine))
    return rates


def learn(folder: Path, seed: int) -> tuple[dict[str, Rates], dict[str, Rates]]:
    """Base model, always-tool cold start, HDPO; the rates before and after HDPO."""
    tool_use = [toy_trajectory(f"{kind}-tool-{n}", kind, n) for kind in KINDS for n in NUMBERS]
    direct = [direct_answer(f"copy-direct-{n}", "copy", n) for n in NUMBERS]
    prompts = [toy_prompt(f"{kind}-{n}", kind, n) for kind in KINDS for n in NUMBERS]
    model = build_toy_policy(folder / "toy", seed=seed)
    base = train_sft(SFTConfig(str(model), write_shard(direct + tool_use, folder / "base.parquet", "messages"),
                               folder / "base", epochs=25, lr=1e-3, batch_size=16, seed=seed, device="cpu"))
    cold = train_sft(SFTConfig(str(base), write_shard(tool_use, folder / "cold.parquet", "messages"), folder / "cold",
                               epochs=1, lr=8e-5, batch_size=8, seed=seed, device="cpu"))
    before = measure(cold, prompts, seed)
    tuned = train_hdpo(HDPOConfig(str(cold), write_shard(prompts, folder / "prompts.parquet", "verl"), folder / "hdpo",
                                  steps=HDPO_STEPS, prompts_per_step=16, rollouts=8, lr=HDPO_LR, max_turns=MAX_TURNS,
                                  max_new_tokens=MAX_NEW_TOKENS, max_tokens=MAX_TOKENS, seed=seed, device="cpu"))
    return before, measure(tuned, prompts, seed)


def test_hdpo_drops_the_tool_calls_prompts_do_not_need_and_keeps_accuracy(tmp_path: Path) -> None:
    before, after = learn(tmp_path, SEED)
    seen = f"before HDPO {before}, after {after}"
    assert before["copy"].tool_calls >= 0.8, seen  # the cold start made the policy call the tool needlessly
    assert after["copy"].tool_calls <= before["copy"].tool_calls - 0.5, seen
    assert after["hash"].tool_calls >= 0.9, seen  # and it still calls it where it is needed
    for kind in KINDS:
        assert after[kind].accuracy >= before[kind].accuracy - 0.06, seen
