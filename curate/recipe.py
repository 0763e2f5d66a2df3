"""YAML recipes: input, ordered stages with options, output; validated before any work.

    name: metis_sft
    input:
      paths: [../data/sample/sft_messages.jsonl, {path: ../data/sample/sft_thyme.jsonl, format: thyme}]
      format: auto                     # default reader for paths without one
    stages:
      - image_integrity: {}
      - image_dedup: {max_distance: 4}
    output: {kind: sft, shard_rows: 5000}
    batch_size: 256
    batch_mb: 64                       # and at most this much raw input per batch (large rows make small batches)
    profiles:
      local:                           # chosen with --local; merged over the recipe
        stages: {image_dedup: {max_distance: 2}}

Relative input paths resolve against the recipe file's folder. Any fsspec URL works too
(`s3://bucket/raw/*.parquet`, `gs://...`, `hf://datasets/org/name/...`, `https://...`); globs are expanded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate import storage
from curate.errors import UserError
from curate.formats import FORMATS
from curate.formats.spec import InlineSpec
from curate.registry import get_stage_class, suggest
from curate.stage import Stage, StageOptions


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a path (relative to the recipe's folder) or an fsspec URL; globs are expanded")
    # A name, or {inline: {...}} (validated by `_format_name`).
    format: str | dict[str, Any] = Field(default="auto", description="this file's reader: a format name, auto "
                                                                     "(sniffed), or {inline: {spec}}")


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str | InputFile] = Field(min_length=1, description="input files: a path or URL, or {path, format}")
    format: str | dict[str, Any] = Field(default="auto", description="the reader of plain paths: a format name, "
                                                                     "auto (sniffed per file), or {inline: {spec}}")


class FormatSpec(BaseModel):
    """A format described in the recipe instead of named (see curate/formats/spec.py)."""

    model_config = ConfigDict(extra="forbid")
    inline: InlineSpec


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["sft", "rl"] = Field(description="sft: HF messages parquet; rl: verl / Metis-RL parquet")
    shard_rows: int = Field(default=5000, gt=0, description="rows per output shard")


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", description="the run's name (default: the file's stem); runs/<name> by default")
    description: str = Field(default="", description="free text")
    input: InputSpec = Field(description="what to read")
    stages: list[dict[str, dict[str, Any] | None]] = Field(
        min_length=1, description="ordered `{stage name: {options}}` entries; each sees what the previous kept")
    output: OutputSpec = Field(description="what to write")
    batch_size: int = Field(default=256, gt=0, description="rows per committed batch (the unit of resume)")
    batch_mb: float = Field(default=64.0, gt=0, description="most raw input per batch (MiB); at least one row")
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> overrides merged over the recipe by --profile NAME (--local: "
                                          "`local`); a profile's `stages` maps stage names to option overrides")


@dataclass(frozen=True)
class InputSource:
    path: str  # a local path or an fsspec URL
    format: str  # a format name, or "auto" to sniff


@dataclass(frozen=True)
class StageSpec:
    label: str  # unique within the recipe: the name, or name#2 when a stage repeats
    name: str
    cls: type[Stage]  # pickled by reference, so worker processes import it without the registry
    options: StageOptions

    def build(self) -> Stage:
        return self.cls(self.options)


@dataclass(frozen=True)
class Recipe:
    name: str
    inputs: tuple[InputSource, ...]
    stages: tuple[StageSpec, ...]
    output_kind: str
    shard_rows: int
    batch_size: int
    resolved: dict[str, Any]  # the validated recipe after profile and overrides; hashed for resume checks
    batch_bytes: int = 64 << 20

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved, sort_keys=True, default=str).encode()).hexdigest()


def load_recipe(
    path: Path,
    profile: str | None = None,
    input_paths: list[str] | None = None,
    format_name: str | None = None,
) -> Recipe:
    """Read, merge the profile and overrides, and validate everything: stage names, options, formats, files."""
    raw = _read_yaml(path)
    if profile is not None:
        raw = apply_profile(raw, profile, path)
    if input_paths:
        raw.setdefault("input", {})
        raw["input"] = {"paths": list(input_paths), "format": format_name or "auto"}
    elif format_name:
        raw.setdefault("input", {})["format"] = format_name
    model = _validate(RecipeModel, raw, f"{path}")
    base_dir = Path(path).resolve().parent
    # Paths given on the command line are relative to the working directory, not the recipe.
    path_base = Path.cwd() if input_paths else base_dir
    inputs = tuple(source for entry in model.input.paths
                   for source in _input_sources(entry, model.input.format, path_base, path))
    stages = _stage_specs(model.stages, path)
    # Batch boundaries do not change any row's outcome (a resume re-batches after the last commit), so the byte
    # budget, like the worker count, stays out of the recipe's hash.
    resolved = model.model_dump(exclude={"profiles", "batch_mb"})
    resolved["input"] = [{"path": s.path, "format": s.format} for s in inputs]
    resolved["stages"] = [{s.name: s.options.model_dump(mode="json")} for s in stages]
    return Recipe(
        name=model.name or Path(path).stem,
        inputs=inputs,
        stages=stages,
        output_kind=model.output.kind,
        shard_rows=model.output.shard_rows,
        batch_size=model.batch_size,
        resolved=resolved,
        batch_bytes=int(model.batch_mb * 2**20),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML ({problem})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with input, stages and output")
    return raw


def apply_profile(raw: dict[str, Any], profile: str, path: Path) -> dict[str, Any]:
    """Merge a profile over the recipe. Its `stages` is a mapping of stage name -> option overrides."""
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise UserError(f"{path}: no profile {profile!r}{suggest(profile, profiles)}; it defines: {', '.join(profiles) or 'none'}")
    overrides = dict(profiles[profile] or {})
    merged = {key: value for key, value in raw.items()}
    stage_overrides = overrides.pop("stages", {}) or {}
    names = [next(iter(entry)) for entry in raw.get("stages", []) if isinstance(entry, dict) and entry]
    for name in stage_overrides:
        if name not in names:
            raise UserError(f"{path}: profile {profile!r} overrides stage {name!r}, which the recipe does not run{suggest(name, names)}")
    merged["stages"] = [
        {name: {**(options or {}), **(stage_overrides.get(name) or {})}}
        for entry in raw.get("stages", [])
        for name, options in entry.items()
    ]
    return _deep_merge(merged, overrides)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _input_sources(entry: str | InputFile, default_format: str | dict[str, Any], base_dir: Path,
                   recipe_path: Path) -> list[InputSource]:
    """The files one `paths` entry names: a local path (relative to `base_dir`) or any fsspec URL, globs expanded."""
    pattern, fmt = (entry, default_format) if isinstance(entry, str) else (entry.path, entry.format)
    name = _format_name(fmt, f"{recipe_path}: input format")
    return [InputSource(location, name) for location in storage.expand(pattern, base_dir)]


def _format_name(fmt: str | dict[str, Any], where: str) -> str:
    """A format name as the executors take it: a registered name, auto, or an inline spec as `inline:{json}`."""
    if isinstance(fmt, dict):
        return _validate(FormatSpec, fmt, where).inline.as_name()
    if fmt != "auto" and fmt not in FORMATS:
        raise FORMATS.unknown(fmt)
    return fmt


def _stage_specs(entries: list[dict[str, dict[str, Any] | None]], path: Path) -> tuple[StageSpec, ...]:
    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        if len(entry) != 1:
            raise UserError(f"{path}: stage {position} must be a single `name: {{options}}` mapping, got {list(entry)}")
        name, options = next(iter(entry.items()))
        cls = get_stage_class(name)
        # A stage option naming files (an evaluation set) resolves relative paths against the recipe's folder.
        validated = _validate(cls.Options, options or {}, f"{path}: stage {name!r}",
                              context={"recipe_dir": Path(path).resolve().parent})
        _check_backend_options(cls, validated, f"{path}: stage {name!r}")
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        specs.append(StageSpec(label, name, cls, validated))
    return tuple(specs)


# (backend field, its options field) of stages that hand a mapping of options to a backend class's constructor.
_BACKEND_FIELDS = (("backend", "backend_options"), ("fallback_backend", "fallback_options"))


def _check_backend_options(cls: type[Stage], options: StageOptions, where: str) -> None:
    """`backend_options` and `fallback_options` name keywords of the chosen backend's constructor: a stage that
    declares its backends (`backend_classes`: name -> "module:Class") has them checked here, not when it starts."""
    registry: Mapping[str, str] = getattr(cls, "backend_classes", {})
    for backend_field, options_field in _BACKEND_FIELDS:
        backend, given = getattr(options, backend_field, None), getattr(options, options_field, None)
        if backend not in registry or not given:
            continue
        accepted = backend_keywords(registry[backend])
        if accepted is None:  # the constructor takes **options: any name may be right
            continue
        for key in given:
            if key not in accepted:
                raise UserError(f"{where}: unknown option '{options_field}.{key}' for backend {backend!r}"
                                f"{suggest(str(key), accepted)}; valid options: {', '.join(accepted) or 'none'}")


@functools.cache
def backend_keywords(target: str) -> list[str] | None:
    """The keywords `module:Class`'s constructor takes after the model, read from its source (importing a backend
    can cost seconds: torch, a provider's SDK); None when it takes any (`**options`)."""
    module_name, class_name = target.split(":")
    spec = importlib.util.find_spec(module_name)
    source = Path(spec.origin).read_text() if spec and spec.origin else ""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is not None:
                if init.args.kwarg is not None:
                    return None
                names = [a.arg for a in (*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs)]
                return [n for n in names if n not in ("self", "model")]
    constructor = inspect.signature(getattr(importlib.import_module(module_name), class_name))
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in constructor.parameters.values()):
        return None
    return [n for n in constructor.parameters if n != "model"]


def _validate(model: type[BaseModel], data: Any, where: str, context: dict[str, Any] | None = None) -> Any:
    """Validate with pydantic, turning its first error into a one-line message with a suggestion."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors()
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a misspelt key explains a missing one
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            valid = list(_model_at(model, error["loc"][:-1]).model_fields)
            raise UserError(
                f"{where}: unknown option {field!r}{suggest(str(error['loc'][-1]), valid)};"
                f" valid options: {', '.join(valid) or 'none'}"
            ) from None
        if error["type"] == "missing":
            raise UserError(f"{where}: missing required field {field!r}") from None
        raise UserError(f"{where}: field {field!r}: {error['msg']} (got {error.get('input')!r})") from None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The nested model an error location points into (for suggesting its field names), through lists too."""
    for part in loc:
        if isinstance(part, str) and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            for candidate in (annotation, *get_args(annotation)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    model = candidate
    return model
