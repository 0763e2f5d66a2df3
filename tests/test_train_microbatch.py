"""Micro-batched HDPO updates (`--micro-batch-tokens`) against the one-pass update they replace: on the toy policy
and on a tiny Qwen2-VL, the same losses, clip fractions, gradient norm and updated weights, whatever the
micro-batch; and SFT's gradient accumulation backpropagating one micro-batch at a time."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from curate_testkit.toy import build_toy_policy
from test_logprobs import full_vocabulary_logprobs
from test_train_vision import build_tiny_qwen2_vl, picture_prompt

from curate.generation.hf import LoadedModel, load_model
from curate.sample import Message, Sample, TextPart
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.chat import ChatEncoder
from curate.train.hdpo import HDPOConfig, micro_batches, update
from curate.train.loss import hdpo_loss
from curate.train.rollout import Rollout, RolloutConfig, RolloutEngine, padded

TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def one_pass_update(loaded: LoadedModel, optimizer: torch.optim.Optimizer, rollouts: list[Rollout],
                    adv_acc: torch.Tensor, adv_tool: torch.Tensor, config: HDPOConfig) -> dict[str, float]:
    """The update as it was before micro-batches: each minibatch's rows in one backward pass, their log-probs from
    full-vocabulary logits (a vision-language policy's rows read one per forward, with their pixel inputs)."""
    batch = padded(rollouts, loaded.tokenizer.pad_token_id)
    encoder = ChatEncoder(loaded.processor, loaded.vision)

    def logprobs(rows: torch.Tensor) -> torch.Tensor:
        part = {k: v[rows] for k, v in batch.items() if k != "loss_mask"}
        if not loaded.vision:
            return full_vocabulary_logprobs(loaded.net, part, config.temperature)
        return torch.cat([full_vocabulary_logprobs(loaded.net, {
            **{k: v[i:i + 1] for k, v in part.items()}, **rollouts[row].vision,
            **encoder.token_types(part["input_ids"][i:i + 1])}, config.temperature)
            for i, row in enumerate(rows.tolist())])

    old = None
    if config.updates_per_step > 1:
        with torch.no_grad():
            old = logprobs(torch.arange(len(rollouts)))
    sums: dict[str, float] = {}
    norms = 0.0
    order = torch.randperm(len(rollouts)).chunk(config.updates_per_step)
    for rows in order:
        current = logprobs(rows)
        losses = hdpo_loss(current, current.detach() if old is None else old[rows], batch["loss_mask"][rows, 1:],
                           adv_acc.flatten()[rows], adv_tool.flatten()[rows], config.w_acc, config.w_tool,
                           config.epsilon, config.dual_clip)
        optimizer.zero_grad()
        losses.total.backward()
        norms += float(torch.nn.utils.clip_grad_norm_(loaded.net.parameters(), config.max_grad_norm)) / len(order)
        optimizer.step()
        for name in ("total", "acc", "tool", "clip_frac_acc", "clip_frac_tool"):
            sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(getattr(losses, name)).detach()) / len(order)
    return sums | {"grad_norm": norms}


def compare(loaded: LoadedModel, rollouts: list[Rollout], adv_acc: torch.Tensor, adv_tool: torch.Tensor,
            config: HDPOConfig) -> dict[str, float]:
    """Runs both updates from the same weights and the same minibatch order; asserts the same result. Plain SGD:
    AdamW's first step moves each weight by about lr·sign(gradient), which float rounding flips where a gradient
    is about 0, so it would compare the rounding rather than the gradients."""
    reference = replace(loaded, net=copy.deepcopy(loaded.net))
    mine = replace(loaded, net=copy.deepcopy(loaded.net))
    torch.manual_seed(5)
    expected = one_pass_update(reference, torch.optim.SGD(reference.net.parameters(), lr=config.lr), rollouts,
                               adv_acc, adv_tool, config)
    torch.manual_seed(5)
    got = update(mine, torch.optim.SGD(mine.net.parameters(), lr=config.lr), rollouts,
                 {"acc": adv_acc, "tool": adv_tool}, config)
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, **TOLERANCE)
    for (name, ours), theirs in zip(mine.net.state_dict().items(), reference.net.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, **TOLERANCE, msg=lambda m: f"{name}: {m}")
    return got


def test_micro_batches_are_runs_within_the_token_budget() -> None:
    assert micro_batches([10, 30, 20, 50, 5], 60) == [[0, 1], [2], [3], [4]]
    assert micro_batches([10, 30, 20, 50, 5], 100) == [[0, 1, 2], [3, 4]]
    assert micro_batches([10, 30, 20], 0) == [[0, 1, 2]]
    assert micro_batches([80, 5], 60) == [[0], [1]]  # a row over the budget goes alone


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_toy_policy(tmp_path_factory.mktemp("toy") / "toy")
    return load_model(str(folder), "cpu", "float32")


def random_rollouts(count: int, vocab: int) -> list[Rollout]:
    """Rows of 12 to 40 random tokens: a masked prompt, policy tokens, a masked observation, policy tokens."""
    generator = torch.Generator().manual_seed(0)
    prompt = Sample("p", "test", [Message("user", [TextPart("q")])], [], "1")
    out = []
    for _ in range(count):
        length = int(torch.randint(12, 41, (1,), generator=generator))
        quarter = length // 4
        mask = [0] * quarter + [1] * quarter + [0] * quarter + [1] * (length - 3 * quarter)
        out.append(Rollout(prompt, torch.randint(3, vocab, (length,), generator=generator).tolist(), mask, {}, {}, []))
    return out


def advantages(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both channels non-zero; some rows without a tool signal."""
    generator = torch.Generator().manual_seed(1)
    adv_tool = torch.randn(1, count, generator=generator)
    adv_tool[0, ::3] = 0
    return torch.randn(1, count, generator=generator), adv_tool


@pytest.mark.parametrize(("micro_batch_tokens", "updates_per_step"), [(1, 1), (90, 1), (90, 2), (0, 2)])
def test_micro_batched_update_equals_the_one_pass_update(toy: LoadedModel, micro_batch_tokens: int,
                                                         updates_per_step: int) -> None:
    """Budgets of one row, of a few rows, and none; two minibatches make the second off-policy (clipped, by a
    learning rate large enough to move the ratios past the trust region)."""
    rollouts = random_rollouts(8, toy.net.config.vocab_size)
    adv_acc, adv_tool = advantages(8)
    config = HDPOConfig(model="toy", shards=[], out=Path("."), lr=2.0, max_grad_norm=0.5,
                        updates_per_step=updates_per_step, micro_batch_tokens=micro_batch_tokens, temperature=0.9)
    got = compare(toy, rollouts, adv_acc, adv_tool, config)
    assert got["grad_norm"] > 0.5 and got["tool"] != 0  # clipped by the norm; both channels
    if updates_per_step > 1:
        assert got["clip_frac_acc"] > 0 and got["clip_frac_tool"] > 0


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"))), "cpu", "float32")


def test_micro_batched_update_equals_the_one_pass_update_on_qwen2_vl(tiny_vl: LoadedModel) -> None:
    """A vision-language policy's rows go one per pass, each with its pixel inputs."""
    ids = lambda text: tiny_vl.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(tiny_vl, sandbox, RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256))
        rollouts = []
        for answer in ("red", "blue", "a red square", "no"):
            rollout = engine.start(picture_prompt())
            engine.advance([rollout], [ids(f"<answer>{answer}</answer><|im_end|>")])
            rollouts.append(rollout)
    adv_acc, adv_tool = torch.tensor([[1.0, -1.0, 0.5, -0.5]]), torch.tensor([[0.7, 0.0, -0.7, 0.0]])
    config = HDPOConfig(model="vl", shards=[], out=Path("."), lr=2.0, max_grad_norm=0.5, updates_per_step=2,
                        micro_batch_tokens=0)
    got = compare(tiny_vl, rollouts, adv_acc, adv_tool, config)
    assert got["grad_norm"] > 0 and got["tool"] != 0
