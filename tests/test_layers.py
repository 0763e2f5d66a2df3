"""The import graph of `curate` (with the stages of `filters/` and `judges/`, installed as `curate.filters` and
`curate.judges`): no cycles, and no arrow from a lower layer to a higher one. Only imports that run when a module
is imported count; an import inside a function or under `TYPE_CHECKING` is how a lower layer names a higher one
lazily (the registries, the CLI's commands), and is allowed.

The layers, bottom first, are the map of the code that `docs/development.md` draws."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

PACKAGE_FOLDERS = {"curate": REPO / "curate", "curate.filters": REPO / "filters", "curate.judges": REPO / "judges"}

# Each module belongs to the layer of the longest name below that is it or one of its packages.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("curate", "curate.errors", "curate.sample", "curate.textnorm", "curate.hashindex",
                    "curate.verify", "curate.console", "curate.retry", "curate.storage", "curate.cache",
                    "curate.models", "curate.bundled", "curate.vllm_engine")),
    ("stage protocol and registry", ("curate.stage", "curate.registry")),
    ("inputs, engines, sandbox, run folders", ("curate.formats", "curate.images", "curate.generation",
                                                "curate.sandbox", "curate.recipe", "curate.rundir",
                                                "curate.inspect")),
    ("stage bases", ("curate.stage.probe", "curate.stage.sandbox")),
    ("stages", ("curate.filters", "curate.judges")),
    ("executors", ("curate.executor", "curate.ray_executor")),
    ("trainer", ("curate.train",)),
    ("commands", ("curate.cli", "curate.__main__", "curate.doctor", "curate.estimate")),
]


def module_files() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGE_FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            if package == "curate" and relative.parts[0] in ("filters", "judges"):
                continue  # a checkout's mapping, not modules of their own
            yield ".".join([package, *(part for part in relative.parts if part != "__init__")]), path


def imported_on_load(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules `name` imports when it is imported (module level, conditional branches included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)  # a submodule imported by name

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return (found & known) - {name}


def import_graph() -> dict[str, set[str]]:
    files = dict(module_files())
    return {name: imported_on_load(name, path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to the map in docs/development.md)"
    return max(matches)[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_graph_reads_every_module_and_its_imports() -> None:
    graph = import_graph()
    assert {"curate.executor", "curate.filters.image_dedup", "curate.judges.gemini", "curate.train.hdpo"} <= set(graph)
    assert "curate.sample" in graph["curate.executor"]  # `from curate.sample import ...`
    assert "curate.sample" in graph["curate.filters.image_dedup"]
    assert "curate.cli" in graph["curate.__main__"]


def test_there_are_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_module_imports_a_higher_layer() -> None:
    graph = import_graph()
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
              for module, imports in sorted(graph.items()) for imported in sorted(imports)
              if layer_of(imported) > layer_of(module)]
    assert upward == [], "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_arrow() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("curate.train.hdpo") > layer_of("curate.executor") > layer_of("curate.filters.text_dedup")
