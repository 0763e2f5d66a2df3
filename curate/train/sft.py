"""SFT cold start: next-token loss on the assistant tokens of curated trajectories, nothing else.

Read top to bottom: `encode_examples` turns samples into (ids, loss mask); `batches` pads them;
`sft_loss` is the masked cross-entropy; `train_sft` loops with gradient accumulation and checkpoints.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from curate.sample import Sample
from curate.train.chat import ChatEncoder, Encoded, policy_turns
from curate.train.checkpoint import save_checkpoint, start_or_resume
from curate.train.data import load_samples
from curate.train.distributed import Ranks, gradient_sync, process_group
from curate.train.logprobs import token_logprobs
from curate.train.padding import right_padded
from curate.train.settings import TrainRun, setting


@dataclass(kw_only=True)
class SFTConfig(TrainRun):
    lr: float = setting(1e-5, "Learning rate.")
    epochs: int = setting(1, "Passes over the data.")
    batch_size: int = setting(4, "Sequences per micro-batch (vision-language models: 1).")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    max_tokens: int = setting(4096, "Longer trajectories are cut (their tail is not trained).")


def encode_examples(samples: list[Sample], encoder: ChatEncoder, max_tokens: int) -> list[Encoded]:
    examples = []
    for sample in samples:
        encoded = encoder.encode(policy_turns(sample), sample.images)
        if encoded.loss_mask.sum() == 0:
            continue  # nothing to learn: no assistant turn
        if any(token in encoder.placeholders for token in encoded.input_ids[max_tokens:].tolist()):
            continue  # the cut would drop image tokens while their pixel inputs stay: the model cannot read that
        encoded.input_ids, encoded.loss_mask = encoded.input_ids[:max_tokens], encoded.loss_mask[:max_tokens]
        examples.append(encoded)
    return examples


def batches(examples: list[Encoded], size: int, pad_id: int,
            encoder: ChatEncoder | None = None) -> list[dict[str, torch.Tensor]]:
    """Right-padded micro-batches (with the pixel inputs of the first example: vision batches hold one, and
    the per-token inputs `encoder.token_types` derives from the padded ids)."""
    micro = []
    for start in range(0, len(examples), size):
        batch = right_padded([(e.input_ids, e.loss_mask) for e in examples[start:start + size]], pad_id)
        types = encoder.token_types(batch["input_ids"]) if encoder is not None else {}
        micro.append({**batch, **examples[start].vision, **types})
    return micro


def sft_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over the assistant tokens (prompts and tool observations masked: the head
    never reads them)."""
    mask = batch["loss_mask"][:, 1:]
    return -(token_logprobs(net, batch, select=mask) * mask).sum() / mask.sum().clamp(min=1)


def train_sft(config: SFTConfig) -> Path:
    """Train; under torchrun each rank takes `grad_accum` micro-batches of every optimizer step, so a step
    covers `grad_accum` × processes micro-batches and equals the one-process step with that many."""
    with process_group(config.device) as (ranks, device):
        return _train_sft(config, ranks, device)


def _train_sft(config: SFTConfig, ranks: Ranks, device: str) -> Path:
    torch.manual_seed(config.seed)
    loaded, optimizer, step, _ = start_or_resume(config.out, config.model, device, config.lr, config.resume, ranks,
                                                 config.bf16, config.activation_checkpointing)
    net = loaded.net.train()
    encoder = ChatEncoder(loaded.processor, loaded.vision)
    samples = load_samples(config.shards)
    examples = encode_examples(samples, encoder, config.max_tokens)
    if len(examples) < len(samples) and ranks.main:  # said, not silent: no assistant turn, or a cut through image tokens
        tqdm.write(f"sft: {len(samples) - len(examples)} of {len(samples)} samples skipped (no assistant turn,"
                   f" or --max-tokens {config.max_tokens} would cut through their image tokens)")
    size = 1 if loaded.vision else config.batch_size
    per_step = config.grad_accum * ranks.world
    total = config.epochs * -(-len(examples) // (size * per_step))
    log_file = config.out / "sft_log.jsonl"
    config.out.mkdir(parents=True, exist_ok=True)
    done, index = step, 0
    with tqdm(total=total, initial=step, desc="sft", unit="step", disable=not ranks.main) as bar:
        for epoch in range(config.epochs):
            random.Random(config.seed + epoch).shuffle(examples)
            micro = batches(examples, size, loaded.tokenizer.pad_token_id, encoder)
            for first in range(0, len(micro), per_step):
                index += 1
                if index <= done:
                    continue  # an optimizer step taken before the resume
                started = time.perf_counter()
                optimizer.zero_grad()
                group = micro[first:first + per_step]
                loss = step_backward(net, group, config.grad_accum, ranks, loaded.device,
                                     config.reduce_every_micro_batch)
                optimizer.step()
                step += 1
                record = {"step": step, "epoch": epoch, "loss": float(ranks.total(loss.detach())),
                          "seconds": time.perf_counter() - started}
                if ranks.main:
                    with log_file.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                bar.update()
                if config.save_every and step % config.save_every == 0:
                    save_checkpoint(config.out, step, loaded, optimizer, asdict(config), ranks)
    return save_checkpoint(config.out, step, loaded, optimizer, asdict(config), ranks)


def step_backward(net: torch.nn.Module, group: list[dict[str, torch.Tensor]], grad_accum: int, ranks: Ranks,
                  device: str, reduce_every_micro_batch: bool = False) -> torch.Tensor:
    """Backpropagate this rank's share of one optimizer step's loss, the mean over the step's micro-batches of
    their own loss: its `grad_accum` micro-batches of `group`, each over len(group), one forward and backward at
    a time (only one micro-batch's activations are held); returns that share, detached. A rank short of
    micro-batches (the epoch's last step) runs the missing passes on one it has, at weight 0: every rank of a
    sharded policy must run as many forward and backward passes as the others. Gradients are reduced over the
    ranks after the last pass only, unless `reduce_every_micro_batch`."""
    mine = group[ranks.rank * grad_accum:(ranks.rank + 1) * grad_accum]
    passes = min(grad_accum, len(group))
    weights = [1.0] * len(mine) + [0.0] * (passes - len(mine))
    share = torch.zeros((), device=device)
    for index, weight in enumerate(weights):
        batch = {k: v.to(device) for k, v in (mine or group[:1])[index if weight else 0].items()}
        with gradient_sync(net, index == passes - 1 or reduce_every_micro_batch):
            loss = weight * sft_loss(net, batch) / len(group)
            (loss * ranks.world).backward()  # FSDP averages gradients over the ranks: each holds a share of the sum
        share += loss.detach()
    return share
