"""Per-token log-probabilities without full-vocabulary logits.

A causal LM's head turns hidden states [rows, tokens, hidden] into logits [rows, tokens, vocab]: for SmolLM2
(49,152 entries) 16 rollouts of 1,024 tokens make 3.2 GB of float32 logits, and `log_softmax` plus `gather` hold
two more copies for the backward pass. The loss needs one number per token: the chosen token's logit minus the
log-sum-exp of its row. `ChunkedLogprobs` computes those a chunk of tokens at a time and keeps only the hidden
states for the backward pass, which recomputes each chunk's logits (as TRL's `selective_log_softmax` and
Liger's fused linear cross-entropy avoid materialising them), so no more than one chunk of float32 logits exists.
Tokens outside the loss mask (the prompt, the tool's observations, padding) are never put through the head.

The head runs inside the model's own forward (its `forward` is swapped for the call): a policy sharded by FSDP
has the head's full weight only there, and its backward hooks see the log-probs as the model's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# Tokens per chunk: 4,096 × 49,152 float32 logits are 0.8 GB, 4,096 × 152k (Qwen) 2.5 GB, and matrix products of
# that size run at the speed of whole ones.
CHUNK_TOKENS = 4096


class ChunkedLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] / temperature for each of n tokens, one chunk at a time.

    The logits are computed in the hidden states' dtype and taken to float32, as `logits.float()` after the head
    does; the backward pass recomputes them per chunk: d logprob / d logits = (onehot(target) - softmax) / T."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                chunk: int) -> Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[start:start + chunk], weight, bias, temperature)
            lse[start:start + chunk] = logits.logsumexp(-1)
            out[start:start + chunk] = logits.gather(1, targets[start:start + chunk, None]).squeeze(1)
        out -= lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = _logits(hidden[part], weight, bias, ctx.temperature)
            # d out / d logits = onehot - softmax, scaled by the incoming gradient and the temperature's 1 / T
            grad_logits = logits.sub_(lse[part, None]).exp_().mul_(-grad[part, None])
            grad_logits.scatter_add_(1, targets[part, None], grad[part, None])
            grad_logits.div_(ctx.temperature)
            if need_hidden:
                grad_hidden[part] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T.to(hidden.dtype) @ hidden[part]
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    return torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
                                      ).float() / temperature


def selected_logprobs(hidden: Tensor, head: torch.nn.Linear, input_ids: Tensor, select: Tensor | None,
                      temperature: float, chunk: int = CHUNK_TOKENS) -> Tensor:
    """[rows, tokens - 1]: log p(input_ids[:, t + 1] | hidden[:, t]) where `select` [rows, tokens - 1] is set
    (everywhere without it), 0 elsewhere."""
    hidden = hidden[:, :-1]
    targets = input_ids[:, 1:]
    where = torch.ones_like(targets, dtype=torch.bool) if select is None else select.bool()
    chosen = ChunkedLogprobs.apply(hidden[where], head.weight, head.bias, targets[where], temperature, chunk)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(where, chosen)


@contextmanager
def head_gives_logprobs(net: torch.nn.Module, input_ids: Tensor, select: Tensor | None, temperature: float,
                        chunk: int = CHUNK_TOKENS) -> Iterator[None]:
    """While inside, the model's `logits` output is `selected_logprobs` of its hidden states."""
    head = net.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(net).__name__}'s output head is not a linear layer: chunked log-probs need one")
    head.forward = lambda hidden: selected_logprobs(hidden, head, input_ids, select, temperature, chunk)
    try:
        yield
    finally:
        del head.forward  # the class's own forward again


def token_logprobs(net: torch.nn.Module, batch: dict[str, Tensor], temperature: float = 1.0,
                   select: Tensor | None = None, chunk: int = CHUNK_TOKENS) -> Tensor:
    """log p(token t | tokens < t) for t >= 1, shape [rows, tokens - 1], under the sampling `temperature`
    (HDPO's ratios compare against the distribution the rollouts were drawn from); only where `select` (e.g.
    the loss mask's `[:, 1:]`) is set when given, 0 elsewhere."""
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    with head_gives_logprobs(net, batch["input_ids"], select, temperature, chunk):
        return net(**inputs, use_cache=False).logits
