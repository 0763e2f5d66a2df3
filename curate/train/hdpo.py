"""HDPO: GRPO-style policy optimisation with two decoupled advantage channels (Metis, arXiv 2604.08545).

One step, read top to bottom in `hdpo_step`:
1. roll out G trajectories for each of P prompts, with the python tool (`curate.train.rollout`);
2. score them: `r_acc = 0.9·answer + 0.1·format`, `r_tool = 1/(T+1)` for correct answers, else 0;
3. advantages: accuracy by GRPO over the G rollouts, tool efficiency by GRPO among the correct ones only
   (zero where fewer than two are correct) — or one advantage for the baselines: `grpo` (accuracy only),
   `coupled` (r_acc - alpha·T) and `otc` (OTC-GRPO's tool-integrated reward, arXiv 2504.14870);
4. one or more clipped-surrogate updates on `w_acc·L(A_acc) + w_tool·L(A_tool)`, observations masked,
   then the rollout sampler takes the new weights (a no-op for transformers, a weight load for vLLM);
5. metrics to `hdpo_log.jsonl` and the progress bar; checkpoints that resume with the optimizer.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from curate.generation.hf import LoadedModel
from curate.sample import Sample
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.advantages import (
    accuracy_rewards,
    coupled_advantages,
    grpo_advantages,
    otc_advantages,
    qualifying_ratio,
    tool_advantages,
    tool_productivity,
    tool_rewards,
)
from curate.train.chat import ChatEncoder
from curate.train.checkpoint import save_checkpoint, start_or_resume
from curate.train.data import load_samples
from curate.train.distributed import Ranks, full_norm, process_group
from curate.train.loss import hdpo_loss
from curate.train.rollout import GatheredTurns, Rollout, RolloutConfig, RolloutEngine, TurnSampler, padded
from curate.train.sft import token_logprobs
from curate.verify import AnswerVerifier, Judge


@dataclass
class HDPOConfig:
    model: str
    shards: list[Path]
    out: Path
    steps: int = 100
    prompts_per_step: int = 8
    rollouts: int = 16  # G (Metis: 16)
    algo: Literal["hdpo", "grpo", "coupled", "otc"] = "hdpo"
    w_acc: float = 1.0
    w_tool: float = 0.15  # Metis: 0.15 (0.10 and 0.20 were worse)
    alpha: float = 0.1  # the coupled baseline's tool penalty: r = r_acc - alpha·T
    lr: float = 1e-6
    otc_c: float = 1.0  # OTC's smoothing constant c in cos(m·pi / (2m + c))
    max_grad_norm: float = 1.0  # gradient-norm clip per update, as verl's actor (grad_clip 1.0); 0 = none
    epsilon: float = 0.2
    dual_clip: float = 3.0
    updates_per_step: int = 1  # minibatches per step; more than one makes later ones off-policy (clipping matters)
    max_turns: int = 10
    max_new_tokens: int = 512
    max_tokens: int = 4096
    temperature: float = 1.0
    save_every: int = 0
    seed: int = 0
    device: str = "auto"
    sandbox_timeout: float = 20.0  # Metis: 20 s per call
    sandbox_workers: int = 2  # tool calls of one round of turns run at once
    observation_images: int = 2  # images a call's output may show a vision-language policy
    generation: Literal["transformers", "vllm"] = "transformers"
    vllm_memory: float = 0.3  # share of the GPU's memory vLLM may take beside the policy
    resume: bool = True
    bf16: bool = False  # under torchrun: FSDP mixed precision (bfloat16 compute, float32 weights and reductions)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass


def format_ok(turns: list[str]) -> bool:
    """Metis's format reward: balanced `<reason>` and `<tool_call>` tags, and an `<answer>` after the last
    `</reason>` in the final turn."""
    text = "".join(turns)
    if text.count("<reason>") != text.count("</reason>") or text.count("<tool_call>") != text.count("</tool_call>"):
        return False
    final = turns[-1] if turns else ""
    answer = final.rfind("<answer>")
    return answer >= 0 and "</answer>" in final[answer:] and answer > final.rfind("</reason>")


def score(rollouts: list[Rollout], verify: AnswerVerifier, prompts: int) -> dict[str, torch.Tensor]:
    """Correctness, format and tool calls of every rollout, shaped [prompts, G]."""
    correct = torch.tensor([verify(r.final_text, r.prompt.answer, r.prompt.question).correct for r in rollouts])
    formatted = torch.tensor([format_ok(r.turns) for r in rollouts])
    calls = torch.tensor([r.tool_calls for r in rollouts])
    return {name: value.view(prompts, -1) for name, value in
            {"correct": correct, "format": formatted, "tool_calls": calls}.items()}


def advantages(scores: dict[str, torch.Tensor], config: HDPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_acc, A_tool), each [prompts, G]."""
    r_acc = accuracy_rewards(scores["correct"], scores["format"])
    r_tool = tool_rewards(scores["correct"], scores["tool_calls"])
    none = torch.zeros_like(r_acc)
    if config.algo == "coupled":
        return coupled_advantages(r_acc, scores["tool_calls"], config.alpha), none
    if config.algo == "otc":
        return otc_advantages(r_acc, scores["correct"], scores["tool_calls"], config.otc_c), none
    return grpo_advantages(r_acc), tool_advantages(r_tool)


def rollout_metrics(scores: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """What the step's rollouts did: accuracy, format, tool use, and the qualifying ratio."""
    calls = scores["tool_calls"].float()
    return {"accuracy": float(scores["correct"].float().mean()), "format": float(scores["format"].float().mean()),
            "tool_call_rate": float((calls > 0).float().mean()), "mean_tool_calls": float(calls.mean()),
            "tool_productivity": tool_productivity(scores["correct"], calls),
            "qualifying_ratio": qualifying_ratio(tool_rewards(scores["correct"], scores["tool_calls"]))}


def rollout_logprobs(loaded: LoadedModel, rollouts: list[Rollout], batch: dict[str, torch.Tensor],
                     temperature: float) -> torch.Tensor:
    """`token_logprobs` of the rollouts' padded rows at their sampling temperature. A vision-language policy
    reads each row with the pixel inputs it was sampled with, one row per forward (pixel inputs do not batch,
    as in the rollouts)."""
    if not loaded.vision:
        return token_logprobs(loaded.net, batch, temperature)
    encoder = ChatEncoder(loaded.processor, loaded.vision)
    rows = []
    for index, rollout in enumerate(rollouts):
        row = {k: v[index:index + 1] for k, v in batch.items()}
        vision = {k: v.to(loaded.device) for k, v in rollout.vision.items()}
        rows.append(token_logprobs(loaded.net, {**row, **vision, **encoder.token_types(row["input_ids"])}, temperature))
    return torch.cat(rows)


def update(loaded: LoadedModel, optimizer: torch.optim.Optimizer, rollouts: list[Rollout], adv_acc: torch.Tensor,
           adv_tool: torch.Tensor, config: HDPOConfig, ranks: Ranks = Ranks()) -> dict[str, float]:
    """Clipped-surrogate updates on the rollouts, split into `updates_per_step` minibatches. On one of several
    ranks, `rollouts` are this rank's; the token means are over every rank's tokens, so the ranks' losses
    (and, once FSDP averages them, their gradients) sum to the one-process ones on all the rollouts."""
    w_tool = 0.0 if config.algo != "hdpo" else config.w_tool
    device = loaded.device
    batch = {k: v.to(device) for k, v in padded(rollouts, loaded.tokenizer.pad_token_id).items()}
    # One on-policy update needs no second forward pass: the sampling policy is the current one (ratio 1).
    old = None
    if config.updates_per_step > 1:
        with torch.no_grad():
            old = rollout_logprobs(loaded, rollouts, batch, config.temperature)
    sums: dict[str, float] = {}
    norms = 0.0
    order = torch.randperm(len(rollouts)).chunk(config.updates_per_step)
    for rows in order:
        part = {k: v[rows] for k, v in batch.items()}
        logprobs = rollout_logprobs(loaded, [rollouts[row] for row in rows.tolist()], part, config.temperature)
        previous = logprobs.detach() if old is None else old[rows]
        losses = hdpo_loss(logprobs, previous, part["loss_mask"][:, 1:], adv_acc.flatten()[rows].to(device),
                           adv_tool.flatten()[rows].to(device), config.w_acc, w_tool, config.epsilon, config.dual_clip,
                           ranks.total)
        optimizer.zero_grad()
        (losses.total * ranks.world).backward()  # FSDP averages gradients over the ranks
        if config.max_grad_norm > 0:  # over every rank's gradient shards: the whole model's norm
            norm = torch.nn.utils.clip_grad_norm_(loaded.net.parameters(), config.max_grad_norm)
            norms = norms + full_norm(norm) / len(order)
        optimizer.step()
        for name in ("total", "acc", "tool", "clip_frac_acc", "clip_frac_tool"):
            sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(getattr(losses, name)).detach()) / len(order)
    return ranks.sum_floats(sums) | ({"grad_norm": norms} if config.max_grad_norm > 0 else {})


def hdpo_step(loaded: LoadedModel, engine: RolloutEngine, optimizer: torch.optim.Optimizer, prompts: list[Sample],
              verify: AnswerVerifier, config: HDPOConfig, ranks: Ranks = Ranks()) -> dict[str, float | None]:
    """One step on `prompts` (on one of several ranks: this rank's share of the step's prompts); the metrics
    are the whole step's."""
    started = time.perf_counter()
    loaded.net.eval()
    rollouts = engine.run([engine.start(p) for p in prompts for _ in range(config.rollouts)])
    scores = score(rollouts, verify, len(prompts))
    adv_acc, adv_tool = advantages(scores, config)
    loaded.net.train()
    losses = update(loaded, optimizer, rollouts, adv_acc, adv_tool, config, ranks)
    engine.turns.load_policy(loaded.net)
    return {**rollout_metrics({name: ranks.gather(value) for name, value in scores.items()}),
            **{k if k.startswith(("clip", "grad")) else f"loss_{k}": v for k, v in losses.items()},
            "seconds": time.perf_counter() - started}


def train_hdpo(config: HDPOConfig, judge: Judge | None = None) -> Path:
    """Train; `judge` (e.g. `judges.verifier.JudgeVerifier`, CORRECT / INCORRECT as Metis's reward asks an LLM)
    decides the answers the verification rules cannot. Under torchrun each rank rolls out its share of every
    step's prompts (which must split evenly) and updates its shard of the policy."""
    with process_group(config.device) as (ranks, device):
        return _train_hdpo(config, judge, ranks, device)


def _train_hdpo(config: HDPOConfig, judge: Judge | None, ranks: Ranks, device: str) -> Path:
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    loaded, optimizer, step, weights = start_or_resume(config.out, config.model, device, config.lr, config.resume,
                                                       ranks, config.bf16, config.activation_checkpointing)
    prompts = [s for s in load_samples(config.shards) if s.answer not in (None, "", [])]
    rollout_config = RolloutConfig(config.max_turns, config.max_new_tokens, config.max_tokens, config.temperature,
                                   observation_images=config.observation_images)
    turns = sampler(loaded, weights, rollout_config, config, ranks)
    sandbox = Sandbox(SandboxOptions(timeout=config.sandbox_timeout, cpu_seconds=int(config.sandbox_timeout),
                                     parallelism=config.sandbox_workers))
    engine = RolloutEngine(loaded, sandbox, rollout_config, turns)
    verify = AnswerVerifier(judge=judge)
    config.out.mkdir(parents=True, exist_ok=True)
    try:
        with tqdm(total=config.steps, initial=step, desc=f"{config.algo}", unit="step", disable=not ranks.main) as bar:
            while step < config.steps:
                chosen = random.Random(config.seed * 100_003 + step).sample(prompts, min(config.prompts_per_step, len(prompts)))
                if ranks.active:
                    # Each rank's sampling from its own seed per step, not from a generator state: a run resumes
                    # exactly at the same number of processes, and draws the same prompts at any number.
                    torch.manual_seed((config.seed * 100_003 + step) * 65_536 + ranks.rank)
                metrics = {"step": step + 1, **hdpo_step(loaded, engine, optimizer, ranks.share(chosen, "--prompts"),
                                                         verify, config, ranks)}
                step += 1
                if ranks.main:
                    with (config.out / "hdpo_log.jsonl").open("a") as handle:
                        handle.write(json.dumps(metrics) + "\n")
                bar.set_postfix(acc=f"{metrics['accuracy']:.2f}", tools=f"{metrics['tool_call_rate']:.2f}")
                bar.update()
                if config.save_every and step % config.save_every == 0:
                    save_checkpoint(config.out, step, loaded, optimizer, asdict(config), ranks)
        return save_checkpoint(config.out, step, loaded, optimizer, asdict(config), ranks)
    finally:
        sandbox.close()
        engine.turns.close()


def sampler(loaded: LoadedModel, weights: str, rollout_config: RolloutConfig, config: HDPOConfig,
            ranks: Ranks) -> TurnSampler | None:
    """Where turns are sampled: vLLM (one engine per rank), an unsharded copy of a sharded policy, or (None)
    the policy itself."""
    if config.generation == "vllm":
        from curate.train.vllm_turns import VLLMTurns

        turns = VLLMTurns(loaded, config.model, rollout_config, config.vllm_memory, config.seed + ranks.rank,
                          ranks)
        turns.load_policy(loaded.net)  # a resumed run continues from its checkpoint's weights, not the base model's
        return turns
    if ranks.active:
        return GatheredTurns(loaded, weights, rollout_config, config.bf16)
    return None
