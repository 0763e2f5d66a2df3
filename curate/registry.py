"""Name -> class registries: one mechanism for stages, input formats, generation backends and judge backends.

A registry maps each name to `"module:Class"` text and imports a module only when its class is asked for, so
listing the stages imports the stage modules and nothing a backend needs (torch, vLLM, a provider's SDK), and a
recipe imports only the stages it runs. A third-party package adds names through the registry's entry point group
(`name = "module:Class"`, read from the installed metadata without importing the package); a script or notebook
through `register`. A registered class wins over an entry point, an entry point over a built-in.

The stage registry lives here: the executor knows stages only through it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from pydantic import ValidationError, ValidatorFunctionWrapHandler

from curate.errors import UserError
from curate.stage import Stage

T = TypeVar("T")


class Registry(Mapping[str, str], Generic[T]):
    """Names of one kind of plugin -> `"module:Class"`; `load(name)` imports the class at its first use."""

    def __init__(self, kind: str, builtin: Mapping[str, str], entry_point_group: str, base: type[T] | None = None,
                 listed_by: str = "") -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtin = dict(builtin)
        self._base = base  # what a loaded class must subclass; None where the kind is a Protocol
        self._listed_by = listed_by  # where the names are listed, said in the unknown-name error
        self._registered: dict[str, str] = {}
        self._loaded: dict[str, type[T]] = {}

    @cached_property
    def _plugins(self) -> dict[str, str]:
        return {entry.name: entry.value for entry in entry_points(group=self.entry_point_group)}

    def _targets(self) -> dict[str, str]:
        return {**self.builtin, **self._plugins, **self._registered}

    def __getitem__(self, name: str) -> str:
        return self._targets()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._targets()))

    def __len__(self) -> int:
        return len(self._targets())

    def names(self) -> list[str]:
        return sorted(self._targets())

    def load(self, name: str) -> type[T]:
        """The class registered under `name`, imported now if it was not yet; an unknown name is a UserError that
        suggests the closest known one."""
        if name in self._loaded:
            return self._loaded[name]
        targets = self._targets()
        if name not in targets:
            raise self.unknown(name)
        cls = EntryPoint(name, targets[name], self.entry_point_group).load()
        if not inspect.isclass(cls) or (self._base is not None and not issubclass(cls, self._base)):
            wanted = f"a {self._base.__module__}.{self._base.__qualname__} subclass" if self._base else "a class"
            raise UserError(f"{self.kind} {name!r} = {targets[name]} is not {wanted}")
        self._loaded[name] = cls
        return cls

    def classes(self) -> dict[str, type[T]]:
        """Every class, imported: what listing them with their options needs."""
        return {name: self.load(name) for name in self.names()}

    def register(self, cls: type[T], name: str | None = None) -> type[T]:
        """Add a class defined in a script, a notebook or a test (packages use the entry point group instead);
        `name` defaults to the class's `name` attribute."""
        name = name or cls.name  # type: ignore[attr-defined]
        self._registered[name] = f"{cls.__module__}:{cls.__qualname__}"
        self._loaded[name] = cls
        return cls

    def plugin_names_too(self) -> Callable[[Any, ValidatorFunctionWrapHandler], Any]:
        """A wrap validator for an option typed as a `Literal` of built-in names that also takes the names packages
        and scripts add (the option's type stays what the reference shows; a built-in name the `Literal` leaves
        out stays refused)."""
        def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
            try:
                return handler(value)
            except ValidationError:
                if isinstance(value, str) and (value in self._plugins or value in self._registered):
                    return value
                raise
        return validate

    def unknown(self, name: str) -> UserError:
        names = self.names()
        listed = self._listed_by or f"choose one of: {', '.join(names)}"
        return UserError(f"unknown {self.kind} {name!r}{suggest(name, names)}; {listed}")


STAGES: Registry[Stage] = Registry("stage", {
    "ambiguity_judge": "curate.judges.ambiguity:AmbiguityJudge",
    "base_model_solvable": "curate.filters.base_model_solvable:BaseModelSolvable",
    "consistency": "curate.filters.consistency:Consistency",
    "decontaminate": "curate.filters.decontaminate:Decontaminate",
    "execution_failure": "curate.filters.execution_failure:ExecutionFailure",
    "format": "curate.filters.well_formed:WellFormed",
    "image_dedup": "curate.filters.image_dedup:ImageDedup",
    "image_integrity": "curate.filters.image_integrity:ImageIntegrity",
    "pass_rate_variance": "curate.filters.pass_rate_variance:PassRateVariance",
    "strategic_tool_judge": "curate.judges.strategic_tool:StrategicToolJudge",
    "text_dedup": "curate.filters.text_dedup:TextDedup",
}, "curate.stages", Stage, listed_by="`curate stages` lists them")


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Add a stage defined in a script or notebook (packages use the `curate.stages` entry point instead)."""
    return STAGES.register(cls)


def stage_classes() -> dict[str, type[Stage]]:
    return STAGES.classes()


def get_stage_class(name: str) -> type[Stage]:
    return STAGES.load(name)


def suggest(word: str, candidates: Any) -> str:
    """' (did you mean X?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
