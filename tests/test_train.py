"""The trainer on real models: loss masks on real tokenised trajectories, rollouts with the sandboxed python
tool, and `curate train sft|hdpo|plot` end to end on the bundled sample's curated shards."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from curate_testkit.harness import run_curate
from curate_testkit.toy import build_toy_policy, hashed, toy_prompt, toy_trajectory

from curate.formats import get_format
from curate.generation.hf import load_model
from curate.sample import Message, Sample, TextPart
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.advantages import accuracy_rewards, grpo_advantages, otc_advantages
from curate.train.chat import ChatEncoder, policy_turns
from curate.train.hdpo import HDPOConfig, advantages, format_ok
from curate.train.rollout import RolloutConfig, RolloutEngine


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", "cpu", "float32")


def test_sft_mask_covers_assistant_tokens_only_on_a_real_trajectory(smol) -> None:
    sample = toy_trajectory("t", "hash", 42)
    encoded = ChatEncoder(smol.processor, smol.vision).encode(policy_turns(sample), sample.images)
    ids, mask = encoded.input_ids, encoded.loss_mask.bool()
    trained, masked = smol.tokenizer.decode(ids[mask]), smol.tokenizer.decode(ids[~mask])
    assert '<tool_call>{"name": "python", "arguments": {"code": "print(42*37%97)"}}</tool_call>' in trained
    assert f"<answer>{hashed(42)}</answer>" in trained and trained.count("<|im_end|>") == 2  # each turn learns to end
    assert "hash 42" in masked and f"<tool_response>\n{hashed(42)}\n</tool_response>" in masked  # question, observation
    assert "<tool_response>" not in trained and "hash 42" not in trained
    assert smol.tokenizer.decode(ids) == ChatEncoder(smol.processor, False).text(policy_turns(sample), [], False)


def test_rollout_masks_observations_and_runs_the_code_in_the_sandbox(tmp_path: Path) -> None:
    loaded = load_model(str(build_toy_policy(tmp_path / "toy")), "cpu", "float32")
    prompt = toy_prompt("p", "hash", 42)
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=2, max_new_tokens=8, max_tokens=200))
        rollout = engine.start(prompt)
        code_turn = '<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>'
        engine.advance([rollout], [loaded.tokenizer(code_turn, add_special_tokens=False).input_ids])
        assert rollout.tool_calls == 1 and not rollout.done and rollout.cells == ["print(6*7)"]
        policy = torch.tensor(rollout.policy_mask).bool()
        ids = torch.tensor(rollout.ids)
        assert loaded.tokenizer.decode(ids[policy]) == code_turn
        observed = loaded.tokenizer.decode(ids[~policy])
        assert "<tool_response>\n42\n</tool_response>" in observed and observed.endswith("<|im_start|>assistant\n")
        engine.advance([rollout], [loaded.tokenizer('{"broken": <tool_call>x</tool_call>', add_special_tokens=False).input_ids])
        assert rollout.tool_calls == 2 and "Error: <tool_call> is not valid JSON" in loaded.tokenizer.decode(rollout.ids)
        finished = engine.run([engine.start(prompt) for _ in range(3)])  # sampled turns until every rollout ends
    assert all(r.done and r.policy_mask[-1] == 1 for r in finished)


def test_a_text_only_policy_is_told_of_the_images_its_tool_showed(tmp_path: Path) -> None:
    loaded = load_model(str(build_toy_policy(tmp_path / "toy")), "cpu", "float32")
    call = ('<tool_call>{"name": "python", "arguments": {"code": "from PIL import Image\\n'
            'Image.new(\'RGB\', (8, 8)).show()\\nprint(6*7)"}}</tool_call>')
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=2, max_new_tokens=8, max_tokens=200))
        rollout = engine.start(toy_prompt("p", "hash", 42))
        engine.advance([rollout], [loaded.tokenizer(call, add_special_tokens=False).input_ids])
    assert "<tool_response>\n42\n(1 image(s) not shown)\n</tool_response>" in loaded.tokenizer.decode(rollout.ids)
    assert rollout.images == [] and rollout.vision == {}


def test_an_observation_that_would_reach_max_tokens_ends_the_rollout_without_it(tmp_path: Path) -> None:
    """No turn would read it: a flood of output must not make the rollout (and the loss's forward) long."""
    loaded = load_model(str(build_toy_policy(tmp_path / "toy")), "cpu", "float32")
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(\'ab \' * 2000)"}}</tool_call>'
    call_ids = loaded.tokenizer(call, add_special_tokens=False).input_ids
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=2, max_new_tokens=8, max_tokens=200))
        rollout = engine.start(toy_prompt("p", "hash", 42))
        before = len(rollout.ids)
        engine.advance([rollout], [call_ids])
    assert rollout.done and rollout.tool_calls == 1 and rollout.ids[before:] == call_ids and rollout.policy_mask[-1] == 1


@pytest.mark.parametrize(("turns", "ok"), [
    (["<reason>x</reason><answer>4</answer>"], True),
    (["<reason>x</reason><tool_call>{}</tool_call>", "<reason>y</reason><answer>4</answer>"], True),
    (["<answer>4</answer><reason>late</reason>"], False),
    (["<reason>x<answer>4</answer>"], False),
    (["<tool_call>{}", "<answer>4</answer>"], False),
    (["no answer"], False),
])
def test_format_reward(turns: list[str], ok: bool) -> None:
    assert format_ok(turns) is ok


def curate_cli(*args: str) -> subprocess.CompletedProcess:
    return run_curate(*args)


def test_hdpo_asks_an_llm_judge_for_answers_the_rules_cannot_decide(tmp_path: Path) -> None:
    """`--judge-backend openai`: free-text answers go to a judge server saying CORRECT; the reward follows it."""
    from curate_testkit.servers import ChatServer

    model = build_toy_policy(tmp_path / "toy")
    prompts = tmp_path / "rl.parquet"
    get_format("verl").write([Sample(f"p{i}", "toy", [Message("user", [TextPart("Which tower?")])], [], "Eiffel Tower")
                              for i in range(2)], prompts)
    with ChatServer(answer=lambda body, index: json.dumps({"verdict": "CORRECT"})) as judge:
        curate_cli("train", "hdpo", str(prompts), "--model", str(model), "-o", str(tmp_path / "out"), "--steps", "1",
                   "--prompts", "2", "-G", "2", "--max-new-tokens", "8", "--max-turns", "1", "--judge-backend",
                   "openai", "--judge-model", "judge", "--judge-base-url", judge.base_url, "--cache",
                   str(tmp_path / "c.sqlite"))
        asked = len(judge.requests)
    (log,) = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert asked >= 1 and "Eiffel Tower" in json.dumps(judge.requests[0])
    assert log["accuracy"] > 0  # random text never equals "Eiffel Tower": only the judge can have made it correct


def test_cli_trains_the_otc_baseline_with_its_settings(tmp_path: Path) -> None:
    """`--algo otc --otc-c C --max-grad-norm N` reach the trainer (saved in the checkpoint's config) and the step's log."""
    model = build_toy_policy(tmp_path / "toy")
    prompts = tmp_path / "rl.parquet"
    get_format("verl").write([toy_prompt(f"p{n}", "hash", n) for n in range(1, 5)], prompts)
    curate_cli("train", "hdpo", str(prompts), "--model", str(model), "-o", str(tmp_path / "out"), "--steps", "1",
               "--prompts", "2", "-G", "2", "--max-new-tokens", "8", "--max-turns", "1", "--algo", "otc",
               "--otc-c", "2", "--max-grad-norm", "0.5")
    settings = json.loads((tmp_path / "out" / "checkpoint-000001" / "train_config.json").read_text())
    assert (settings["algo"], settings["otc_c"], settings["max_grad_norm"]) == ("otc", 2.0, 0.5)
    (log,) = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert "tool_productivity" in log and "grad_norm" in log
    # What each group type gave the trained term (curate.train.signals): the shares sum to 1 over the step's groups.
    assert sum(log[f"groups/{kind}"] for kind in ("all_correct", "mixed", "all_wrong")) == pytest.approx(1.0)
    assert {"zero_adv_acc", "tool_signal_acc/mixed", "tool_signal_acc/all_wrong"} <= set(log)
    # The advantages that run's settings give (the trainer's own function): four correct, well-formed rollouts with
    # 0-3 tool calls have equal accuracy rewards, so GRPO's advantages would all be 0; OTC's rank fewer calls higher,
    # by its reward with c = 2 (c = 1 would give others).
    config = HDPOConfig(**{field.name: settings[field.name] for field in dataclasses.fields(HDPOConfig)})
    correct, calls = torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 1, 2, 3]])
    scores = {"correct": correct, "format": correct, "tool_calls": calls}
    trained_terms = advantages(scores, config)
    trained, tool = trained_terms["acc"], trained_terms.get("tool", torch.zeros(1, 4))
    assert list(trained_terms) == ["acc"]  # otc's entry trains the accuracy term only: no tool advantages computed
    r_acc = accuracy_rewards(correct, correct)
    torch.testing.assert_close(trained, otc_advantages(r_acc, correct, calls, 2.0))
    assert not torch.allclose(trained, otc_advantages(r_acc, correct, calls, 1.0))
    assert torch.equal(grpo_advantages(r_acc), torch.zeros(1, 4)) and not torch.allclose(trained, torch.zeros(1, 4))
    assert trained[0].tolist() == sorted(trained[0].tolist(), reverse=True) and not tool.any()
