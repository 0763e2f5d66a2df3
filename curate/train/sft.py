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


@dataclass
class SFTConfig:
    model: str
    shards: list[Path]
    out: Path
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 4  # sequences per micro-batch (vision-language models: 1)
    grad_accum: int = 1
    max_tokens: int = 4096  # longer trajectories are cut (their tail is not trained)
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    seed: int = 0
    device: str = "auto"
    resume: bool = True  # continue from the latest checkpoint in `out`, optimizer state included


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


def right_padded(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, loss mask) pairs as a right-padded batch: input_ids, attention_mask, loss_mask."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    loss = torch.zeros(len(sequences), width)
    for row, (row_ids, row_mask) in enumerate(sequences):
        ids[row, : len(row_ids)] = torch.as_tensor(row_ids)
        attention[row, : len(row_ids)] = 1
        loss[row, : len(row_mask)] = torch.as_tensor(row_mask, dtype=torch.float)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


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


def token_logprobs(net: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1, shape [rows, tokens - 1], under the sampling `temperature`
    (HDPO's ratios compare against the distribution the rollouts were drawn from)."""
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    logits = net(**inputs).logits[:, :-1].float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, batch["input_ids"][:, 1:, None]).squeeze(-1)


def sft_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over the assistant tokens (prompts and tool observations masked)."""
    mask = batch["loss_mask"][:, 1:]
    return -(token_logprobs(net, batch) * mask).sum() / mask.sum().clamp(min=1)


def train_sft(config: SFTConfig) -> Path:
    torch.manual_seed(config.seed)
    loaded, optimizer, step = start_or_resume(config.out, config.model, config.device, config.lr, config.resume)
    net = loaded.net.train()
    encoder = ChatEncoder(loaded.processor, loaded.vision)
    samples = load_samples(config.shards)
    examples = encode_examples(samples, encoder, config.max_tokens)
    if len(examples) < len(samples):  # said, not silent: no assistant turn, or a cut through image tokens
        tqdm.write(f"sft: {len(samples) - len(examples)} of {len(samples)} samples skipped (no assistant turn,"
                   f" or --max-tokens {config.max_tokens} would cut through their image tokens)")
    size = 1 if loaded.vision else config.batch_size
    total = config.epochs * -(-len(examples) // (size * config.grad_accum))
    log_file = config.out / "sft_log.jsonl"
    config.out.mkdir(parents=True, exist_ok=True)
    done, index = step, 0
    with tqdm(total=total, initial=step, desc="sft", unit="step") as bar:
        for epoch in range(config.epochs):
            random.Random(config.seed + epoch).shuffle(examples)
            micro = batches(examples, size, loaded.tokenizer.pad_token_id, encoder)
            for first in range(0, len(micro), config.grad_accum):
                index += 1
                if index <= done:
                    continue  # an optimizer step taken before the resume
                started = time.perf_counter()
                optimizer.zero_grad()
                group = micro[first:first + config.grad_accum]
                loss = sum(sft_loss(net, {k: v.to(loaded.device) for k, v in b.items()}) for b in group) / len(group)
                loss.backward()
                optimizer.step()
                step += 1
                record = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "seconds": time.perf_counter() - started}
                with log_file.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                bar.update()
                if config.save_every and step % config.save_every == 0:
                    save_checkpoint(config.out, step, loaded, optimizer, asdict(config))
    return save_checkpoint(config.out, step, loaded, optimizer, asdict(config))
