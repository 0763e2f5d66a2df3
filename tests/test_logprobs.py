"""Chunked log-probs (`curate.train.logprobs`) against the full-vocabulary computation they replace: the same
values and gradients, and no float32 [tokens, vocab] tensor beyond one chunk."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from curate.generation.hf import load_model
from curate.train.logprobs import ChunkedLogprobs, token_logprobs
from curate_testkit.toy import build_toy_policy


def full_vocabulary_logprobs(net: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """What the trainer computed before: every position's full-vocabulary log-softmax, then the chosen token's."""
    logits = net(**batch).logits[:, :-1].float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, batch["input_ids"][:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder = build_toy_policy(tmp_path_factory.mktemp("toy") / "toy")
    return load_model(str(folder), "cpu", "float32").net


def rows() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 24), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, 17:] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": attention}


def gradients(net: torch.nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, list(net.parameters())))


@pytest.mark.parametrize("chunk", [5, 4096])
def test_chunked_logprobs_and_their_gradients_equal_the_full_vocabulary_ones(toy: torch.nn.Module, chunk: int) -> None:
    batch = rows()
    expected = full_vocabulary_logprobs(toy, batch, 0.7)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    chunked = token_logprobs(toy, batch, 0.7, chunk=chunk)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(gradients(toy, (chunked * weights).sum()), gradients(toy, (expected * weights).sum()),
                            strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_selected_tokens_only_give_the_same_values_there_and_zero_elsewhere(toy: torch.nn.Module) -> None:
    batch = rows()
    select = torch.rand(3, 23, generator=torch.Generator().manual_seed(2)) > 0.5
    expected = full_vocabulary_logprobs(toy, batch, 1.0)
    chosen = token_logprobs(toy, batch, select=select, chunk=7)
    torch.testing.assert_close(chosen[select], expected[select], rtol=1e-5, atol=1e-5)
    assert (chosen[~select] == 0).all()
    ours = gradients(toy, (chosen * select).sum())
    for mine, theirs in zip(ours, gradients(toy, (expected * select).sum()), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_the_head_runs_as_the_model_defines_it_again_afterwards(toy: torch.nn.Module) -> None:
    batch = rows()
    token_logprobs(toy, batch)
    assert toy(**batch).logits.shape == (3, 24, toy.config.vocab_size)


class LargestLogits(TorchDispatchMode):
    """The most elements of any float tensor with the vocabulary as its last dimension that an operation made."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocab \
                    and tensor.is_floating_point():
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_logits_beyond_one_chunk_exist_in_the_forward_or_backward_pass(toy: torch.nn.Module) -> None:
    batch, vocab, chunk = rows(), toy.config.vocab_size, 8
    with LargestLogits(vocab) as full:
        full_vocabulary_logprobs(toy, batch, 1.0).sum().backward()
    with LargestLogits(vocab) as chunked:
        token_logprobs(toy, batch, chunk=chunk).sum().backward()
    toy.zero_grad()
    assert full.largest >= 3 * 23 * vocab  # the check sees the full-vocabulary logits where they are made
    # one chunk's logits at a time; the head's own [vocab, hidden] weight gradient is the other vocabulary-wide one
    assert chunked.largest <= max(chunk * vocab, vocab * toy.config.hidden_size)
    assert chunk * vocab < 3 * 23 * vocab


def test_the_chunked_function_passes_gradcheck_with_a_bias() -> None:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=generator)
    # float64 inputs: the chunks' logits are float32 (as the trainer's are), so compare loosely
    assert torch.autograd.gradcheck(lambda h, w, b: ChunkedLogprobs.apply(h, w, b, targets, 0.8, 3),
                                    (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-2)
