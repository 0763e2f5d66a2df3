"""The trainer in two processes (torchrun, gloo on the CPU, the policy sharded with FSDP2) against one, on the
toy policy: the same SFT steps and the same HDPO update (in one pass or micro-batched) give the same losses and
weights; checkpoints written by two processes resume in one and the reverse; a rank that dies ends the run with
one line."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli
from curate_testkit import distributed_update
from curate_testkit.harness import run_curate
from curate_testkit.toy import build_toy_policy, cold_start_data, hashed, toy_prompts
from curate_testkit.vllm_device import VLLM_DEVICE, needs_vllm
from torch.distributed.checkpoint import FileSystemReader

from curate.formats import get_format
from curate.generation.hf import load_model
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.checkpoint import checkpoint_weights, is_sharded_checkpoint
from curate.train.rollout import RolloutConfig, RolloutEngine

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_policy(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def sft_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 trajectories: at batch size 2, three micro-batches, so a step of two leaves a last step of one."""
    path = tmp_path_factory.mktemp("sft") / "sft.parquet"
    get_format("messages").write(cold_start_data(("hash", "chain"), range(3, 6)), path)
    return path


def curate(*args: str, nproc: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    launch = ["--nproc", str(nproc)] if nproc else []
    return run_curate(*args, *launch, env=ENV, timeout=timeout)


def sft(shard: Path, model: Path, out: Path, epochs: int, grad_accum: int, nproc: int | None = None) -> None:
    curate("train", "sft", str(shard), "--model", str(model), "-o", str(out), "--lr", "1e-3", "--batch-size", "2",
           "--max-tokens", "64", "--epochs", str(epochs), "--grad-accum", str(grad_accum), "--save-every", "2",
           nproc=nproc)


def losses(out: Path, log: str = "sft_log.jsonl") -> list[float]:
    return [json.loads(line)["loss"] for line in (out / log).read_text().splitlines()]


def assert_same_weights(first: Path, second: Path) -> None:
    ours, theirs = checkpoint_weights(first), checkpoint_weights(second)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], **TOLERANCE, msg=name)


# The SFT runs below are shared by the tests after them, on one worker under pytest-xdist: each launch of the
# trainer starts processes that import torch and transformers, which is most of a test's time.
SFT_GROUP = pytest.mark.xdist_group("distributed-sft")


@pytest.fixture(scope="module")
def sft_runs(toy: Path, sft_shard: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """one: 2 epochs in one process (2 micro-batches a step); two-then-one: its first epoch in two processes (one
    micro-batch a rank), resumed in one; one-then-two: one's checkpoint-000002 resumed in two processes (so its
    checkpoint-000004 is written by two ranks); bf16: the first epoch under torchrun in bfloat16 with activation
    checkpointing."""
    runs = tmp_path_factory.mktemp("sft-runs")
    sft(sft_shard, toy, runs / "one", epochs=2, grad_accum=2)
    sft(sft_shard, toy, runs / "two-then-one", epochs=1, grad_accum=1, nproc=2)
    shutil.copytree(runs / "two-then-one", runs / "two")  # as two processes left it, before the resume
    sft(sft_shard, toy, runs / "two-then-one", epochs=2, grad_accum=2)  # resumed in one process
    shutil.copytree(runs / "one" / "checkpoint-000002", runs / "one-then-two" / "checkpoint-000002")
    sft(sft_shard, toy, runs / "one-then-two", epochs=2, grad_accum=1, nproc=2)  # resumed in two
    # FSDP's mixed precision needs torchrun; one process (2 micro-batches a step) is enough to compare.
    curate("train", "sft", str(sft_shard), "--model", str(toy), "-o", str(runs / "bf16"), "--lr", "1e-3",
           "--batch-size", "2", "--max-tokens", "64", "--grad-accum", "2", "--bf16", "--activation-checkpointing",
           nproc=1)
    return runs


@SFT_GROUP
def test_two_process_sft_steps_equal_one_process_steps_and_checkpoints_resume_across(toy: Path, sft_runs: Path) -> None:
    """A 2-process step of one micro-batch a rank is the 1-process step of two; checkpoint-000002 (end of the
    first epoch) resumed in the other number of processes continues as the uninterrupted run."""
    torch.testing.assert_close(losses(sft_runs / "two"), losses(sft_runs / "one")[:2], **TOLERANCE)
    assert_same_weights(sft_runs / "two" / "checkpoint-000002", sft_runs / "one" / "checkpoint-000002")
    torch.testing.assert_close(losses(sft_runs / "two-then-one"), losses(sft_runs / "one"), **TOLERANCE)
    torch.testing.assert_close(losses(sft_runs / "one-then-two"), losses(sft_runs / "one")[2:], **TOLERANCE)
    for resumed in ("two-then-one", "one-then-two"):
        assert_same_weights(sft_runs / resumed / "checkpoint-000004", sft_runs / "one" / "checkpoint-000004")
    # Written by two ranks, each its shards: the whole of every parameter's moments, keyed by name, in one checkpoint
    saved = saved_tensors(sft_runs / "two" / "checkpoint-000002")
    for name, parameter in load_model(str(toy), "cpu").net.named_parameters():
        assert saved[f"optimizer.state.{name}.exp_avg"].size == parameter.shape, name


@SFT_GROUP
def test_bf16_and_activation_checkpointing_take_the_same_steps_within_rounding(sft_runs: Path) -> None:
    """bfloat16 compute and activation checkpointing: the same steps within bfloat16's rounding, float32 weights
    kept."""
    torch.testing.assert_close(losses(sft_runs / "bf16"), losses(sft_runs / "one")[:2], rtol=0.02, atol=0)
    assert losses(sft_runs / "bf16") != losses(sft_runs / "one")[:2]  # it did compute in bfloat16
    kept = saved_tensors(sft_runs / "bf16" / "checkpoint-000002")
    assert all(saved.properties.dtype == torch.float32 for name, saved in kept.items() if name.startswith("model."))


def saved_tensors(checkpoint: Path) -> dict:
    """What a checkpoint's distributed checkpoint holds: each tensor's global shape and dtype, by key."""
    return FileSystemReader(str(checkpoint / "state")).read_metadata().state_dict_metadata


@SFT_GROUP
def test_an_export_is_a_plain_save_pretrained_folder_with_the_same_logits(toy: Path, sft_runs: Path,
                                                                         tmp_path: Path) -> None:
    """`curate train export` of a run whose last checkpoint two ranks wrote: transformers loads it alone, with the
    same logits as the checkpoint read directly."""
    from transformers import AutoModelForCausalLM

    run, exported = sft_runs / "one-then-two", tmp_path / "exported"
    exporting = cli("train", "export", str(run), str(exported))
    assert exporting.exit_code == 0, exporting.stderr
    model = AutoModelForCausalLM.from_pretrained(exported)
    checkpoint = load_model(str(run / "checkpoint-000004"), "cpu", "float32").net
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, checkpoint(ids).logits, rtol=0, atol=0)
        assert not torch.equal(model(ids).logits, load_model(str(toy), "cpu", "float32").net(ids).logits)  # trained
    again = cli("train", "export", str(run), str(exported))  # never into a folder holding something else
    assert again.exit_code == 2, again.stdout


def test_a_model_folder_is_read_slice_by_slice_only_when_its_files_hold_every_weight_by_name(toy: Path,
                                                                                            tmp_path: Path) -> None:
    """Under torchrun each rank reads its slices of the safetensors files when they name every weight as the model
    does (the tied head aside); else (weights transformers renames or fuses on load) rank 0 reads it whole."""
    from safetensors.torch import load_file, save_file

    from curate.train.checkpoint import reads_as_is

    net = load_model(str(toy), "cpu", weights=False).net
    assert reads_as_is(toy, net)
    renamed = tmp_path / "renamed"
    shutil.copytree(toy, renamed)
    weights = load_file(renamed / "model.safetensors")
    weights["model.norm.gamma"] = weights.pop("model.norm.weight")
    save_file(weights, renamed / "model.safetensors")
    assert not reads_as_is(renamed, net) and not reads_as_is(tmp_path / "no-such-folder", net)


def test_a_folder_named_like_a_checkpoint_that_curate_did_not_write_is_refused_on_resume(toy: Path,
                                                                                         tmp_path: Path) -> None:
    """A `checkpoint-NNNNNN` folder without the trainer's state (a `save_pretrained` folder copied there, say) does
    not resume: one line says why, and it still loads as a model."""
    from curate.errors import UserError
    from curate.train.checkpoint import start_or_resume

    stray = tmp_path / "run" / "checkpoint-000003"
    shutil.copytree(toy, stray)
    with pytest.raises(UserError, match="is not a checkpoint curate train wrote"):
        start_or_resume(tmp_path / "run", str(toy), "cpu", 1e-3, True)
    assert load_model(str(stray), "cpu").net.config.hidden_size > 0


@pytest.fixture(scope="module")
def rollout_groups(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 prompts × G = 4 rollouts written turn by turn: right and wrong answers, with 0, 1 or 2 tool calls (run
    in the sandbox), so both advantage channels are non-zero."""
    loaded = load_model(str(toy), "cpu", "float32")
    ids = lambda text: loaded.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    groups = []
    with Sandbox(SandboxOptions(timeout=5, cpu_seconds=5)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=3, max_new_tokens=16, max_tokens=200))
        for prompt in toy_prompts(("hash",), range(3, 7)):
            number = int(prompt.answer)
            call = f'<tool_call>{{"name": "python", "arguments": {{"code": "print({number})"}}}}</tool_call>'
            plans = [[], [call], [call, call], []]
            answers = [number, number, number, hashed(number)]  # the last one wrong
            group = []
            for plan, answer in zip(plans, answers, strict=True):
                rollout = engine.start(prompt)
                for turn in plan:
                    engine.advance([rollout], [ids(turn)])
                engine.advance([rollout], [ids(f"<answer>{answer}</answer><|im_end|>")])
                group.append(rollout)
            groups.append(group)
    path = tmp_path_factory.mktemp("rollouts") / "rollouts.pkl"
    path.write_bytes(pickle.dumps(groups))
    return path


# One launch of each kind computes every variant the tests below compare (starting the processes is most of the
# time); the tests share it, on one worker under pytest-xdist.
UPDATES_GROUP = pytest.mark.xdist_group("distributed-updates")
VARIANTS = ("0", "1", "150", "150:reduce")


@pytest.fixture(scope="module")
def updates(toy: Path, rollout_groups: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/one/0: the one-process update of all the rollouts in one pass; OUT/two/VARIANT: two processes' update
    (see `distributed_update.py` for the variants)."""
    out = tmp_path_factory.mktemp("updates")
    worker = [distributed_update.__file__, str(toy), str(rollout_groups)]
    subprocess.run([sys.executable, *worker, str(out / "one"), "0"], check=True, env=ENV, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *worker,
                    str(out / "two"), *VARIANTS], check=True, env=ENV, timeout=600, capture_output=True)
    return out


def assert_same_update(two: Path, one: Path) -> None:
    """The same losses, clip fractions, clipped gradient norm (the whole model's, over both ranks' shards) and
    updated weights."""
    ones, twos = (json.loads((path / "update.json").read_text()) for path in (one, two))
    assert ones.keys() == twos.keys() and ones["grad_norm"] > 0.05 and ones["tool"] != 0  # clipped; both channels
    torch.testing.assert_close(twos, ones, **TOLERANCE)
    assert_same_weights(two / "checkpoint-000001", one / "checkpoint-000001")


@UPDATES_GROUP
def test_two_process_hdpo_update_equals_the_one_process_update(updates: Path) -> None:
    """Same rollouts, each prompt's G on one rank."""
    assert_same_update(updates / "two" / "0", updates / "one" / "0")


@UPDATES_GROUP
@pytest.mark.parametrize("variant", ["1", "150", "150:reduce"])
def test_two_process_micro_batched_update_equals_the_one_process_one_pass_update(updates: Path, variant: str) -> None:
    """Micro-batched: the gradient sync skipped on all but a minibatch's last micro-batch, and ranks with fewer
    micro-batches running passes at weight 0, give the one-process update of all the rollouts in one pass; so does
    reducing after every micro-batch (`--reduce-every-micro-batch`, `:reduce`)."""
    assert_same_update(updates / "two" / variant, updates / "one" / "0")


def test_hdpo_under_torchrun_logs_each_step_once_and_resumes_in_one_process(toy: Path, tmp_path: Path) -> None:
    """`torchrun -m curate train hdpo`: the ranks' rollouts (sampled by each rank's unsharded copy) reduced to one
    log line a step, written once; its checkpoint resumed by a one-process run."""
    prompts = tmp_path / "prompts.parquet"
    get_format("verl").write(toy_prompts(("copy", "hash"), range(1, 5)), prompts)
    args = ["train", "hdpo", str(prompts), "--model", str(toy), "-o", str(tmp_path / "out"), "--prompts", "4",
            "-G", "2", "--max-new-tokens", "8", "--max-turns", "1", "--max-tokens", "100", "--sandbox-workers", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "curate"]
    result = subprocess.run([*torchrun, *args, "--steps", "1"], capture_output=True, text=True, cwd=REPO, env=ENV,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    curate(*args, "--steps", "2")
    log = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    # Each step's line covers the 4 prompts x G 2 = 8 rollouts of both ranks: its accuracy is a count of eighths, and
    # the update it logs had a real (finite) gradient norm.
    assert all((entry["accuracy"] * 8).is_integer() and math.isfinite(entry["grad_norm"]) for entry in log)
    assert torch.load(tmp_path / "out" / "checkpoint-000002" / "trainer_state.pt")["step"] == 2


@needs_vllm
def test_hdpo_with_one_vllm_engine_per_rank(toy: Path, tmp_path: Path) -> None:
    """`--generation vllm --nproc 2`: each rank's engine a data-parallel replica in vLLM's torchrun mode, synced
    with the gathered weights; ranks whose rollouts finish first keep stepping their engine until all have."""
    prompts = tmp_path / "prompts.parquet"
    get_format("verl").write(toy_prompts(("copy", "hash"), range(1, 5)), prompts)
    curate("train", "hdpo", str(prompts), "--model", str(toy), "-o", str(tmp_path / "out"), "--prompts", "4", "-G", "2",
           "--max-new-tokens", "8", "--max-turns", "2", "--max-tokens", "100", "--sandbox-workers", "1", "--steps", "2",
           "--device", VLLM_DEVICE, "--generation", "vllm", "--vllm-memory", "0.2", nproc=2)
    log = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert is_sharded_checkpoint(tmp_path / "out" / "checkpoint-000002")


def test_prompts_that_do_not_split_over_the_processes_are_one_line_before_any_process_starts(
        toy: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.parquet"
    get_format("verl").write(toy_prompts(("copy",), range(1, 5)), prompts)
    result = cli("train", "hdpo", str(prompts), "--model", str(toy), "-o", str(tmp_path / "out"), "--prompts", "3",
                 "--steps", "1", "--nproc", "2")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --prompts: 3 do not split evenly over 2 processes: use a multiple of 2"
    assert not (tmp_path / "out").exists()


def test_a_ranks_own_error_is_said_once_then_the_launchers_line() -> None:
    """A rank that stops on a one-line error exits 2: the launcher names it after that rank's own line."""
    from curate.train.launch import how

    assert how(2) == "stopped on the error above"
    assert how(-9).startswith("was killed by SIGKILL")


def worker_with_rank(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child process that runs as `rank` (from its environment)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    return None


def test_a_rank_that_dies_ends_the_run_with_one_line(toy: Path, sft_shard: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "curate", "train", "sft", str(sft_shard), "--model", str(toy),
                                "-o", str(out), "--batch-size", "1", "--max-tokens", "64", "--epochs", "1000",
                                "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out / "sft_log.jsonl").exists() and time.monotonic() < deadline:  # training, mid-run
            time.sleep(0.2)
        victim = worker_with_rank(process.pid, 1)
        assert victim is not None, "no rank 1 worker found"
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)  # never a hang: the launcher stops the other rank
    finally:
        process.kill()
    assert process.returncode == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "error: process 1 of 2 was killed by SIGKILL (rerun the same command to resume from the last checkpoint); "
        "the other processes were stopped")
