"""Training settings from one source, the config dataclasses: each field declares its default and its help once
(`setting`), and `config_options` turns the fields into a `curate train` command's click options, defaults included,
plus `--config FILE`: a YAML mapping of field names to values, which flags given on the command line override.

This module imports no torch: the dataclasses it builds on (`TrainRun`) are read by the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
import yaml
from click.core import ParameterSource

from curate.errors import UserError
from curate.registry import suggest

Command = TypeVar("Command", bound=Callable[..., Any])
Config = TypeVar("Config")
CONFIG_FILE = "config_file"  # the parameter name of --config


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
            minimum: float | None = None, cli: bool = True) -> Any:
    """A config field with its help; `flags`: its option's names [--field-name]; `minimum`: the least value it takes;
    `cli`: False for a field only a config file or code sets."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "minimum": minimum, "cli": cli})


@dataclasses.dataclass(kw_only=True)
class TrainRun:
    """What every `curate train` run takes."""

    shards: list[Path] = setting(help="Run directories of a recipe, or shard files.")
    model: str = setting(help="Hub id, local folder, .gguf file, or smollm2-135m.")
    out: Path = setting(help="Training directory: checkpoints and the metrics log; rerunning resumes from it.",
                        flags=("-o", "--output"))
    seed: int = setting(0, "Seed of the data order and sampling.")
    device: str = setting("auto", "cpu, cuda, or auto.")
    save_every: int = setting(0, "Steps between checkpoints (0: at the end).")
    resume: bool = setting(True, "Continue from the latest checkpoint in the training directory, optimizer state "
                                 "included.", cli=False)
    bf16: bool = setting(False, "With --nproc or torchrun: bfloat16 compute over float32 weights (FSDP mixed "
                                "precision; float32 reductions).")
    activation_checkpointing: bool = setting(False, "Recompute activations in the backward pass: less memory, about "
                                                    "a third more compute.")
    # Skipping the reduction on all but the last micro-batch keeps each rank's unsharded gradients (the whole model's,
    # in float32) until then: fewer collectives, but too much memory for a large policy.
    reduce_every_micro_batch: bool = setting(False, "With --nproc or torchrun: reduce gradients after every "
                                                    "micro-batch, not only a step's last (no unsharded whole-model "
                                                    "gradients held between; more collectives).")


def config_options(config: type, overrides: dict[str, dict[str, Any]] | None = None) -> Callable[[Command], Command]:
    """The click parameters of `config`'s fields, and --config FILE. `overrides`: per field, click keywords that
    replace the generated ones (a type, a help built at run time)."""
    hints = typing.get_type_hints(config)
    params = [click.option("--config", CONFIG_FILE, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                           help="YAML file of settings (the options' names, with underscores): long runs in one "
                                "file; options given here override it.")]
    for field in dataclasses.fields(config):
        if field.metadata.get("cli", True):
            params.append(_parameter(field, hints[field.name], (overrides or {}).get(field.name, {})))

    def decorate(command: Command) -> Command:
        for param in reversed(params):
            command = param(command)
        return command

    return decorate


def _parameter(field: dataclasses.Field[Any], hint: Any, override: dict[str, Any]) -> Callable[[Command], Command]:
    required = field.default is dataclasses.MISSING
    if typing.get_origin(hint) is list:  # the positional arguments; click arguments take no help
        return click.argument(field.name, nargs=-1, type=_click_type(typing.get_args(hint)[0], None))
    help_text = field.metadata["help"] + (" Required, here or in --config." if required else "")
    keywords: dict[str, Any] = {"help": help_text, "type": _click_type(hint, field.metadata["minimum"])}
    if hint is bool:
        if field.default is not False:
            raise TypeError(f"{field.name}: a flag's default must be False")
        keywords = {"help": help_text, "is_flag": True}
    elif not required:
        keywords |= {"default": field.default, "show_default": True}
    flags = field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)
    return click.option(*flags, field.name, **(keywords | override))


def _click_type(hint: Any, minimum: float | None) -> click.ParamType:
    if typing.get_origin(hint) is Literal:
        return click.Choice(typing.get_args(hint))
    if hint is int:
        return click.INT if minimum is None else click.IntRange(min=int(minimum))
    if hint is float:
        return click.FLOAT if minimum is None else click.FloatRange(min=minimum)
    if hint is Path:
        return click.Path(path_type=Path)
    if hint is bool:
        return click.BOOL
    if hint is str:
        return click.STRING
    raise TypeError(f"no command-line type for {hint!r}")


def config_from(config: type[Config], values: dict[str, Any]) -> Config:
    """`config` from a command's parameter values: each field from the command line where given there, else from
    --config FILE, else its default. Unknown keys in the file and missing required fields are one-line errors."""
    context = click.get_current_context()
    command = context.command
    params = {param.name: param for param in command.params}
    fields = {field.name: field for field in dataclasses.fields(config)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(config)
    file = values.get(CONFIG_FILE)
    chosen = {name: value for name, value in values.items() if name in fields}
    if file is not None:
        for name, value in _read(file, list(fields)).items():
            if context.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
                chosen[name] = _converted(file, name, value, params.get(name), hints[name],
                                          fields[name].metadata.get("minimum"), context)
    for name, field in fields.items():
        if field.default is dataclasses.MISSING and chosen.get(name) in (None, ()):
            param = params.get(name)
            shown = param.opts[-1] if isinstance(param, click.Option) else param.human_readable_name if param else name
            raise UserError(f"missing {shown} (give it on the command line or as `{name}:` in --config FILE)")
        if typing.get_origin(hints[name]) is list and name in chosen:
            chosen[name] = list(chosen[name])  # click gives a tuple
    return config(**chosen)


def _read(file: Path, names: list[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{file}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: a config file is a mapping of option names to values, got {type(data).__name__}")
    for key in data:
        if key not in names:
            raise UserError(f"{file}: unknown option {key!r}{suggest(str(key), names)}; valid options: "
                            f"{', '.join(names)}")
    return data


def _converted(file: Path, name: str, value: Any, param: click.Parameter | None, hint: Any,
               minimum: float | None, context: click.Context) -> Any:
    """A file's value as the command line would have given it: checked and converted by the option's type (for a
    field without an option, by its annotation's)."""
    try:
        if param is None:
            return _click_type(hint, minimum).convert(value, None, context)
        if isinstance(param, click.Argument):
            items = [value] if isinstance(value, str) else value
            return tuple(param.type.convert(item, param, context) for item in items)
        return param.type.convert(value, param, context)
    except click.BadParameter as exc:
        raise UserError(f"{file}: option {name!r}: {exc.message}") from None
