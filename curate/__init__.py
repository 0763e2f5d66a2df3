"""curate: curation of tool-use trajectories for agentic (multimodal) models, and an HDPO trainer."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# In the repository the stage packages sit beside this one (filters/, judges/); the wheel installs them inside it
# (curate.filters, curate.judges: pyproject.toml's package-dir). A checkout imported from its root (the working
# directory first on sys.path) finds this folder, which holds neither: this finder maps them to those folders.
SOURCE_SUBPACKAGES = ("filters", "judges")
_HERE = Path(__file__).resolve().parent


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, child = fullname.partition(".")
        if package != __name__ or child not in SOURCE_SUBPACKAGES:
            return None  # their modules are found through the package's __path__: the folder itself
        folder = _HERE.parent / child
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _in_source_tree() -> bool:
    return all(not (_HERE / name).is_dir() and (_HERE.parent / name / "__init__.py").is_file()
               for name in SOURCE_SUBPACKAGES)


if _in_source_tree() and not any(type(finder).__name__ == "_SourceTreeFinder" for finder in sys.meta_path):
    sys.meta_path.append(_SourceTreeFinder())
