"""Rollout turns sampled by vLLM on the trainer's GPU, refreshed with the policy's weights after every update.

The engine runs in this process, beside the policy (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so loading the new
weights is a call on vLLM's own model (`LLM.apply_model` → `model.load_weights`, which maps transformers'
parameter names to vLLM's) with no copy through a pipe. The prefix cache is reset with every load: its
cached keys and values were computed by the old weights.

Rollouts stay token ids end to end: each turn continues the rollout's exact ids (`prompt_token_ids`), and
vLLM's output `token_ids` are what the loss is computed on. For a vision-language policy the expanded image
placeholder runs (`<|image_pad|>` × features) are folded back to one placeholder per image, as vLLM expects
next to `multi_modal_data`, which it expands again from the same images. The sampling distribution is
vLLM's (its kernels, in bfloat16 for a float32 policy); the loss takes log-probs from the policy itself, as
TRL does.

vLLM is an optional extra (`pip install 'curate[gpu]'`), imported only here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from curate.errors import UserError
from curate.generation import pil_image
from curate.generation.hf import LoadedModel
from curate.models import resolve_model
from curate.train.rollout import STOP, Rollout, RolloutConfig, placeholder_ids


def fold_placeholders(ids: list[int], placeholders: list[int]) -> list[int]:
    """`ids` with every run of one placeholder id folded to a single one: the prompt as the chat template writes
    it before the processor expands each image into its features."""
    folded: list[int] = []
    for token in ids:
        if not (token in placeholders and folded and folded[-1] == token):
            folded.append(token)
    return folded


def turn_request(rollout: Rollout, placeholders: list[int]) -> dict[str, Any]:
    """A vLLM token prompt continuing the rollout, with its images (the prompt's, then the tool's) for a
    vision-language policy."""
    if not (placeholders and rollout.images):
        return {"prompt_token_ids": list(rollout.ids)}
    return {"prompt_token_ids": fold_placeholders(rollout.ids, placeholders),
            "multi_modal_data": {"image": [pil_image(image) for image in rollout.images]}}


def turn_sampling(config: RolloutConfig, placeholders: list[int]) -> dict[str, Any]:
    """`vllm.SamplingParams` of one turn: the same stops and limits as `TransformersTurns`. The stop string stays
    in the output (its tokens are the policy's), and placeholder ids get a -100 logit bias, as `suppress_tokens`
    does for transformers."""
    return {"n": 1, "temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_new_tokens,
            "stop": [STOP], "include_stop_str_in_output": True,
            "logit_bias": dict.fromkeys(placeholders, -100.0) or None}


def vllm_dtype(policy_dtype: torch.dtype) -> str:
    """vLLM's dtype for a policy: its own, but bfloat16 for a float32 policy (the trainer keeps float32 weights;
    vLLM's attention kernels are half precision, and `load_weights` casts on copy)."""
    return "bfloat16" if policy_dtype == torch.float32 else str(policy_dtype).removeprefix("torch.")


class VLLMTurns:
    def __init__(self, loaded: LoadedModel, model: str, config: RolloutConfig, gpu_memory_utilization: float = 0.3,
                 seed: int = 0) -> None:
        # In-process engine: `apply_model` reaches the model directly instead of pickling weights to a worker.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("--generation vllm needs vLLM on a GPU machine: pip install 'curate[gpu]', "
                            "or leave --generation at transformers") from None
        if not str(loaded.device).startswith("cuda"):
            raise UserError(f"--generation vllm samples on the GPU the policy trains on, but the policy is on "
                            f"{loaded.device}: use --device cuda")
        self.config = config
        self.placeholders = placeholder_ids(loaded)
        # A turn starts below `max_tokens` and adds at most `max_new_tokens`; the model's own limit caps it.
        positions = getattr(loaded.net.config.get_text_config(), "max_position_embeddings", None)
        engine_args: dict[str, Any] = {
            "model": resolve_model(model), "dtype": vllm_dtype(loaded.net.dtype), "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization, "enable_prefix_caching": True,
            "max_model_len": min(config.max_tokens + config.max_new_tokens, positions or 1 << 30)}
        if loaded.vision:  # a prompt's images, and those each call may show
            engine_args["limit_mm_per_prompt"] = {"image": 8 + config.max_turns * config.observation_images}
        self.llm = LLM(**engine_args)

    def sample(self, rollouts: list[Rollout]) -> list[list[int]]:
        from vllm import SamplingParams

        requests = [turn_request(rollout, self.placeholders) for rollout in rollouts]
        outputs = self.llm.generate(requests, SamplingParams(**turn_sampling(self.config, self.placeholders)),
                                    use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    @torch.no_grad()
    def load_policy(self, net: torch.nn.Module) -> None:
        weights = list(net.state_dict().items())
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()
