"""Token sequences as one right-padded batch: what SFT's micro-batches and the RL rollouts' rows are made of."""

from __future__ import annotations

import torch


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
