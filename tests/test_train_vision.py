"""The trainer's vision path on a real Qwen2-VL: the tiny randomly initialised one of `tiny_vlm.py` (a config, a
character-level tokenizer of our own and the real Qwen2-VL processor, image-only where torchvision is missing),
loaded by `load_model` like any checkpoint. The image goes through the processor (its `<|image_pad|>` expansion
and `pixel_values` / `image_grid_thw`) into the vision tower, in one SFT step and in one HDPO step whose rollouts
generate with the pixel inputs. The same model through vLLM is tested in `test_vlm_vllm.py`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from curate_testkit.tiny_vlm import CROP_CALL, MERGE, build_tiny_qwen2_vl, picture_prompt, png
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

from curate.errors import UserError
from curate.formats import get_format
from curate.generation.hf import LoadedModel, load_model
from curate.sample import ImagePart, Message, Sample, TextPart, ToolCall
from curate.sandbox import Sandbox, SandboxOptions
from curate.train.chat import ChatEncoder, policy_turns
from curate.train.hdpo import HDPOConfig, hdpo_step, rollout_logprobs
from curate.train.rollout import RolloutConfig, RolloutEngine, padded, placeholder_ids
from curate.train.sft import SFTConfig, encode_examples, train_sft
from curate.train.vllm_turns import turn_request, turn_sampling
from curate.verify import Verification


def picture_trajectory() -> Sample:
    """Question on a picture, a python call, an observation showing a crop (an image in the tool's output),
    the answer."""
    return Sample("v0", "toy", [
        Message("user", [ImagePart(0), TextPart("What color is it?")]),
        Message("assistant", [], [ToolCall("python", {"code": "crop = image_1.crop((0, 0, 32, 32))"}, "c0")]),
        Message("tool", [TextPart("crop:"), ImagePart(1)], tool_call_id="c0"),
        Message("assistant", [TextPart("<answer>red</answer>")])], [png("red"), png("red", (32, 32))], "red")


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"))


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(before[name], after[name]) for name in before if name.startswith(prefix))


def test_vision_sft_masks_image_and_observation_tokens_and_one_step_trains_the_vision_tower(tiny_vl: Path,
                                                                                           tmp_path: Path) -> None:
    loaded = load_model(str(tiny_vl), "cpu", "float32")
    assert loaded.vision and isinstance(loaded.net, Qwen2VLForConditionalGeneration)
    assert isinstance(loaded.processor, Qwen2VLProcessor)
    sample = picture_trajectory()
    encoder = ChatEncoder(loaded.processor, loaded.vision)
    encoded = encoder.encode(policy_turns(sample), sample.images)
    ids, mask = encoded.input_ids, encoded.loss_mask.bool()
    image_token = loaded.processor.image_token_id
    grid = encoded.vision["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4], [1, 4, 4]] and encoded.vision["pixel_values"].shape[0] == 32
    # the processor expanded each placeholder to one token per 2x2 patches; none of them is trained
    assert int((ids == image_token).sum()) == int(grid.prod(-1).sum()) // MERGE**2 == 8
    assert not mask[ids == image_token].any()
    trained, masked = loaded.tokenizer.decode(ids[mask]), loaded.tokenizer.decode(ids[~mask])
    assert trained == ('<tool_call>{"name": "python", "arguments": {"code": "crop = image_1.crop((0, 0, 32, 32))"}}'
                       "</tool_call><|im_end|>\n<answer>red</answer><|im_end|>\n")
    assert "<tool_response>\ncrop:<|vision_start|>" in masked and "What color is it?" in masked
    assert "mm_token_type_ids" not in encoded.vision  # derived from the ids where batches are built
    # a cut through the image tokens would leave more features than placeholders: such an example is left out
    assert encode_examples([sample], encoder, max_tokens=10) == []

    shard = tmp_path / "sft.parquet"
    get_format("messages").write([sample], shard)
    checkpoint = train_sft(SFTConfig(model=str(tiny_vl), shards=[shard], out=tmp_path / "sft", lr=1e-3,
                                     max_tokens=512))
    (record,) = [json.loads(line) for line in (tmp_path / "sft" / "sft_log.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and math.isfinite(record["loss"]) and record["loss"] > 0
    reloaded = load_model(str(checkpoint), "cpu", "float32")  # the checkpoint is a Qwen2-VL with its processor
    assert reloaded.vision and reloaded.net.config.model_type == "qwen2_vl"
    before, after = loaded.net.state_dict(), reloaded.net.state_dict()
    assert changed(before, after, "model.visual.")  # the loss reached the vision tower: the pixels were read
    assert changed(before, after, "model.language_model.")
    assert ChatEncoder(reloaded.processor, True).encode(policy_turns(sample), sample.images).input_ids.equal(ids)


class Alternating:
    """A verifier that calls every other rollout correct, so that the group's advantages are ±1 whatever
    a random policy writes (answers from rules would all be wrong: zero advantages, no update)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completion: str, truth: Any, question: str = "") -> Verification:
        self.calls += 1
        return Verification(self.calls % 2 == 1, completion, "test")


def record_forwards(loaded: LoadedModel) -> tuple[list[bool], list[bool]]:
    """Two records that fill as the model runs: for each forward of the vision tower, whether gradients were on
    (an update reading the image rather than sampling with it); for each forward of the model over more than one
    token (a prefill, or a loss), whether its ids came with their token types (`mm_token_type_ids`, from which
    Qwen2-VL's M-RoPE positions are computed; decoding steps reuse them, and transformers releases differ in
    whether they pass them again)."""
    pixels: list[bool] = []
    typed: list[bool] = []

    def model_forward(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[1] > 1:
            types = kwargs.get("mm_token_type_ids")
            typed.append(types is not None and types.shape == kwargs["input_ids"].shape)

    loaded.net.model.visual.register_forward_hook(lambda module, args, output: pixels.append(torch.is_grad_enabled()))
    loaded.net.register_forward_pre_hook(model_forward, with_kwargs=True)
    return pixels, typed


def prefer_image_placeholders(loaded: LoadedModel) -> None:
    """Makes `<|image_pad|>` by far the likeliest next token: a policy that would write placeholders."""
    pad = loaded.processor.image_token_id

    def boost(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits + 100 * torch.nn.functional.one_hot(torch.tensor(pad), logits.shape[-1])

    loaded.net.lm_head.register_forward_hook(boost)


def test_vision_hdpo_step_samples_and_updates_with_the_image(tiny_vl: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(str(tiny_vl), "cpu", "float32")
    pixels, typed = record_forwards(loaded)
    before = {name: value.detach().clone() for name, value in loaded.net.state_dict().items()}
    optimizer = torch.optim.AdamW(loaded.net.parameters(), lr=1e-3)
    config = HDPOConfig(model=str(tiny_vl), shards=[], out=tmp_path, prompts_per_step=1, rollouts=2, max_turns=1,
                        max_new_tokens=8, max_tokens=256)
    with Sandbox(SandboxOptions(timeout=10, cpu_seconds=10)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256))
        metrics = hdpo_step(loaded, engine, optimizer, [picture_prompt()], Alternating(), config)
    # tool productivity is None in a step without calls, a group type's tool signal in a step without such a group;
    # every other metric is a finite number
    assert metrics["accuracy"] == 0.5 and all(math.isfinite(v) for v in metrics.values() if v is not None)
    assert all(k == "tool_productivity" or k.startswith("tool_signal_") for k, v in metrics.items() if v is None)
    # each rollout sampled with the image (once per turn: a sampled `</tool_call>` makes two), then each trained
    # row read it; the ids always came with their token types
    assert pixels.count(False) >= 2 and pixels[-2:] == [True, True] and pixels.count(True) == 2 and all(typed)
    after = loaded.net.state_dict()
    assert changed(before, after, "model.visual.") and changed(before, after, "model.language_model.")


def test_vision_rollout_continues_with_the_image_after_a_tool_turn(tiny_vl: Path) -> None:
    """The second turn is generated on ids longer than the prompt (the image's token types follow them), by a
    policy that would write image placeholders (a rollout never holds more of them than image features)."""
    loaded = load_model(str(tiny_vl), "cpu", "float32")
    pixels, typed = record_forwards(loaded)
    prefer_image_placeholders(loaded)
    tokenizer = loaded.tokenizer
    with Sandbox(SandboxOptions(timeout=10, cpu_seconds=10)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256))
        rollout = engine.start(picture_prompt())
        code = '<tool_call>{"name": "python", "arguments": {"code": "print(image_1.size)"}}</tool_call>'
        first = tokenizer(code, add_special_tokens=False).input_ids
        engine.advance([rollout], [first])
        assert "<tool_response>\n(64, 64)\n</tool_response>" in tokenizer.decode(rollout.ids)  # the image, preloaded
        (finished,) = engine.run([rollout])
    assert finished.done and len(finished.turns) == 2 and pixels == [False] and typed == [True]
    policy = torch.tensor(finished.policy_mask).bool()
    ids = torch.tensor(finished.ids)
    assert policy.sum() > len(first) and not (ids[policy] == loaded.processor.image_token_id).any()


def test_images_the_tool_shows_come_back_to_the_policy_in_its_observation(tiny_vl: Path) -> None:
    """A call that shows a crop: the observation carries it as image tokens with its pixel inputs, and the next
    turn is generated, and the rollout read for the loss, with both images (Qwen2-VL itself checks that image
    features and image tokens match). Past `observation_images`, the observation says how many were left out."""
    loaded = load_model(str(tiny_vl), "cpu", "float32")
    tokenizer, pad = loaded.tokenizer, loaded.processor.image_token_id
    images_seen: list[int] = []

    def count_images(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        images_seen.append(len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]))

    loaded.net.model.visual.register_forward_pre_hook(count_images, with_kwargs=True)  # each encoding of pixels
    with Sandbox(SandboxOptions(timeout=10, cpu_seconds=10)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256))
        rollout = engine.start(picture_prompt())
        engine.advance([rollout], [tokenizer(CROP_CALL, add_special_tokens=False).input_ids])
        assert len(rollout.images) == 2 and rollout.images[1].data[:4] == b"\x89PNG"
        grid = rollout.vision["image_grid_thw"]
        assert grid.shape[0] == 2 and rollout.vision["pixel_values"].shape[0] == grid.prod(-1).sum()
        assert rollout.ids.count(pad) == int(grid.prod(-1).sum()) // MERGE**2 == 8  # 4 tokens each (56x56 at least)
        observed = tokenizer.decode(torch.tensor(rollout.ids)[~torch.tensor(rollout.policy_mask).bool()])
        assert "<tool_response>\n(64, 64)<|vision_start|><|image_pad|>" in observed
        (finished,) = engine.run([rollout])
        capped = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256,
                                                              observation_images=1))
        twice = capped.start(picture_prompt())
        capped.advance([twice], [tokenizer(CROP_CALL.replace(".show()", ".show(); image_1.show()"),
                                           add_special_tokens=False).input_ids])
    assert len(finished.turns) == 2 and images_seen and set(images_seen) == {2}
    batch = padded([finished], tokenizer.pad_token_id)
    logprobs = rollout_logprobs(loaded, [finished], batch, 1.0)
    logprobs.sum().backward()
    assert torch.isfinite(logprobs).all() and images_seen[-1] == 2
    assert loaded.net.model.visual.patch_embed.proj.weight.grad is not None
    assert len(twice.images) == 2 and "(1 image(s) not shown)" in tokenizer.decode(twice.ids)


def test_vllm_request_folds_each_image_to_the_placeholder_vllm_expands_again(tiny_vl: Path) -> None:
    """vLLM takes a token prompt with one `<|image_pad|>` per image next to the images and expands them itself:
    the folded ids, expanded by the processor from the same images (the prompt's and the one the tool showed),
    are the rollout's ids again."""
    loaded = load_model(str(tiny_vl), "cpu", "float32")
    processor, tokenizer = loaded.processor, loaded.tokenizer
    with Sandbox(SandboxOptions(timeout=10, cpu_seconds=10)) as sandbox:
        engine = RolloutEngine(loaded, sandbox, RolloutConfig(max_turns=1, max_new_tokens=8, max_tokens=256))
        rollout = engine.start(picture_prompt())
        engine.advance([rollout], [tokenizer(CROP_CALL, add_special_tokens=False).input_ids])
    request = turn_request(rollout, placeholder_ids(loaded))
    folded, images = request["prompt_token_ids"], request["multi_modal_data"]["image"]
    assert rollout.ids.count(processor.image_token_id) == 8 and folded.count(processor.image_token_id) == 2
    assert [image.size for image in images] == [(64, 64), (32, 32)]
    expanded = processor(text=[tokenizer.decode(folded)], images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert expanded == rollout.ids
    assert turn_sampling(engine.config, placeholder_ids(loaded))["logit_bias"] == {
        processor.image_token_id: -100.0, processor.video_token_id: -100.0}


@pytest.mark.skipif(is_torchvision_available(), reason="with torchvision the stock processor loads")
def test_a_qwen_vl_checkpoint_without_torchvision_stops_with_one_line(tiny_vl: Path, tmp_path: Path) -> None:
    """A real Qwen2-VL checkpoint names the stock processor, whose video part transformers cannot build without
    torchvision: loading it says so, instead of transformers' "Can't load video processor" error."""
    stock = tmp_path / "stock"
    shutil.copytree(tiny_vl, stock)
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((stock / name).read_text())
        config["processor_class"] = "Qwen2VLProcessor"
        (stock / name).write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"its processor has a video part, which transformers builds with torchvision"):
        load_model(str(stock), "cpu", "float32")
