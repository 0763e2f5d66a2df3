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
    profiles:
      local:                           # chosen with --local; merged over the recipe
        stages: {image_dedup: {max_distance: 2}}

Relative input paths resolve against the recipe file's folder. Any fsspec URL works too
(`s3://bucket/raw/*.parquet`, `gs://...`, `hf://datasets/org/name/...`, `https://...`); globs are expanded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate import storage
from curate.errors import UserError
from curate.formats import format_names
from curate.formats.spec import InlineSpec
from curate.registry import get_stage_class, suggest
from curate.stage import Stage, StageOptions


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    format: str | dict[str, Any] = "auto"  # a name, or {inline: {...}} (validated by `_format_name`)


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str | InputFile] = Field(min_length=1)
    format: str | dict[str, Any] = "auto"


class FormatSpec(BaseModel):
    """A format described in the recipe instead of named (see curate/formats/spec.py)."""

    model_config = ConfigDict(extra="forbid")
    inline: InlineSpec


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["sft", "rl"]
    shard_rows: int = Field(default=5000, gt=0)


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    description: str = ""
    input: InputSpec
    stages: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)
    output: OutputSpec
    batch_size: int = Field(default=256, gt=0)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)


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
    resolved = model.model_dump(exclude={"profiles"})
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
    if fmt != "auto" and fmt not in format_names():
        raise UserError(f"unknown format {fmt!r}{suggest(fmt, format_names())}; choose one of: {', '.join(format_names())}")
    return fmt


def _stage_specs(entries: list[dict[str, dict[str, Any] | None]], path: Path) -> tuple[StageSpec, ...]:
    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        if len(entry) != 1:
            raise UserError(f"{path}: stage {position} must be a single `name: {{options}}` mapping, got {list(entry)}")
        name, options = next(iter(entry.items()))
        cls = get_stage_class(name)
        validated = _validate(cls.Options, options or {}, f"{path}: stage {name!r}")
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        specs.append(StageSpec(label, name, cls, validated))
    return tuple(specs)


def _validate(model: type[BaseModel], data: Any, where: str) -> Any:
    """Validate with pydantic, turning its first error into a one-line message with a suggestion."""
    try:
        return model.model_validate(data)
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
