"""What an RL engineer checks first when a policy gradient does not raise accuracy: that the loss reads the
probabilities the rollouts were drawn from (alignment, temperature), and that an update moves probability towards
the rollouts with positive advantages (the sign, the masks)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from curate_testkit.toy import build_toy_policy
from test_train_microbatch import random_rollouts

from curate.generation.hf import LoadedModel, load_model
from curate.train.advantages import grpo_advantages
from curate.train.hdpo import HDPOConfig, update
from curate.train.logprobs import token_logprobs
from curate.train.rollout import padded


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(build_toy_policy(tmp_path_factory.mktemp("toy") / "toy")), "cpu", "float32")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_loss_reads_the_distribution_the_sampler_drew_from(toy: LoadedModel, temperature: float) -> None:
    """`token_logprobs` at the sampling temperature equals the log-softmax of the scores `generate` sampled each token
    from, with the rollout sampler's settings (`TransformersTurns`: no top-k, top-p 1)."""
    torch.manual_seed(0)
    prompt = torch.tensor([[1, 5, 9, 14, 2, 1]])
    with torch.inference_mode():
        out = toy.net.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature,
                               top_p=1.0, top_k=0, max_new_tokens=12, output_scores=True,
                               return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, prompt.shape[1]:]
    assert len(new) > 3  # (no min_new_tokens: it would sample from a distribution without the end token)
    sampled_from = torch.stack([score[0].float().log_softmax(-1)[token] for score, token in zip(out.scores, new)])
    ids = out.sequences
    mask = torch.zeros_like(ids)
    mask[:, prompt.shape[1]:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}
    with torch.no_grad():
        ours = token_logprobs(toy.net, batch, temperature, mask[:, 1:])[0, prompt.shape[1] - 1:]
    torch.testing.assert_close(ours, sampled_from, atol=1e-4, rtol=1e-4)


def test_an_update_moves_probability_towards_positive_advantages(toy: LoadedModel) -> None:
    """One small on-policy GRPO update raises sum_i A_i · log p(rollout i) (the surrogate's first-order change is
    lr·|gradient|², positive whatever the CPU's rounding), over the policy tokens the loss reads."""
    torch.manual_seed(3)
    rollouts = random_rollouts(8, toy.net.config.vocab_size)
    correct = torch.tensor([[True, False, True, False, False, True, True, False]])
    trained = {"acc": grpo_advantages(correct.float())}
    config = HDPOConfig(model="toy", shards=[], out=Path("."), algo="grpo", rollouts=8, max_grad_norm=0)
    batch = padded(rollouts, toy.tokenizer.pad_token_id)
    policy = batch["loss_mask"][:, 1:]

    def surrogate(net: torch.nn.Module) -> float:
        with torch.no_grad():
            logprobs = token_logprobs(net, batch, 1.0, policy)
        return float((trained["acc"].flatten() * logprobs.sum(1)).sum())

    mine = replace(toy, net=copy.deepcopy(toy.net))
    before = surrogate(mine.net)
    update(mine, torch.optim.SGD(mine.net.parameters(), lr=1e-3), rollouts, trained, config)
    assert surrogate(mine.net) > before
    # The opposite advantages move it the other way: the sign is the advantage's, not the update's.
    mine = replace(toy, net=copy.deepcopy(toy.net))
    update(mine, torch.optim.SGD(mine.net.parameters(), lr=1e-3), rollouts, {"acc": -trained["acc"]}, config)
    assert surrogate(mine.net) < before
