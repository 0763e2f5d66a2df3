"""Find stages by name: the built-in `filters` and `judges` packages, plus plugins.

A third-party package adds a stage through the `curate.stages` entry point
group (`name = "module:Class"`). The executor knows stages only through here.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from curate.errors import UserError
from curate.stage import Stage

BUILTIN_PACKAGES = ("filters", "judges")
ENTRY_POINT_GROUP = "curate.stages"


_registered: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Add a stage defined in a script or notebook (packages use the entry point instead)."""
    _registered[cls.name] = cls
    return cls


def stage_classes() -> dict[str, type[Stage]]:
    return {**_discovered_stage_classes(), **_registered}


@cache
def _discovered_stage_classes() -> dict[str, type[Stage]]:
    found: dict[str, type[Stage]] = {}
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for module_info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package_name}.{module_info.name}")
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, Stage) and cls.name and cls.__module__ == module.__name__:
                    found[cls.name] = cls
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry_point.load()
        if not (inspect.isclass(cls) and issubclass(cls, Stage)):
            raise UserError(f"entry point {entry_point.name!r} = {entry_point.value} is not a curate Stage subclass")
        found[entry_point.name] = cls
    return found


def get_stage_class(name: str) -> type[Stage]:
    classes = stage_classes()
    if name not in classes:
        raise UserError(f"unknown stage {name!r}{suggest(name, classes)}; `curate stages` lists them")
    return classes[name]


def suggest(word: str, candidates: object) -> str:
    """', did you mean X?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)  # type: ignore[arg-type]
    return f" (did you mean {close[0]!r}?)" if close else ""
