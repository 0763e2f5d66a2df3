"""The name -> class registries: lazy (listing stages and loading a CPU recipe import no torch, vLLM or
google-genai), complete (the built-in tables name every stage and format class there is), and open to plugins
through entry points."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from curate.errors import UserError
from curate.formats import FORMATS, Format
from curate.formats.spec import SpecFormat
from curate.generation import BACKENDS as GENERATION_BACKENDS
from curate.judges.stage import BACKENDS as JUDGE_BACKENDS
from curate.registry import STAGES, Registry
from curate.stage import Stage

HEAVY = ("torch", "vllm", "google.genai")

LIST_THEN_LOAD = f"""
import sys
from pathlib import Path
from click.testing import CliRunner
from curate.cli import main
from curate.recipe import load_recipe

def heavy():
    return [name for name in {HEAVY!r} if name in sys.modules]

listing = CliRunner().invoke(main, ["stages"])
assert listing.exit_code == 0 and "consistency  [" in listing.output, listing.output
print("stages", heavy())
recipe = load_recipe(Path(sys.argv[1]))
print("recipe", [spec.name for spec in recipe.stages], heavy())
"""


def test_listing_stages_and_loading_a_cpu_recipe_import_no_torch_vllm_or_genai(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("")
    recipe = tmp_path / "cpu.yaml"
    recipe.write_text("input: {paths: [rows.jsonl], format: messages}\n"
                      "stages: [{image_integrity: {}}, {image_dedup: {}}, {format: {}}, {consistency: {}}]\n"
                      "output: {kind: sft}\n")
    result = subprocess.run([sys.executable, "-c", LIST_THEN_LOAD, str(recipe)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "stages []", "recipe ['image_integrity', 'image_dedup', 'format', 'consistency'] []"]


def test_the_builtin_tables_name_every_stage_and_format_class() -> None:
    """A stage or format module whose class is missing from its table (or listed under another name) fails here."""
    assert STAGES.builtin == defined_classes(("curate.filters", "curate.judges"), Stage)
    # SpecFormat is the reader of inline specs (`inline:{...}`), not a format chosen by name.
    assert FORMATS.builtin == defined_classes(("curate.formats",), Format, leave_out=(SpecFormat,))


def defined_classes(packages: tuple[str, ...], base: type, leave_out: tuple[type, ...] = ()) -> dict[str, str]:
    """name -> "module:Class" of every named subclass of `base` defined in the packages' modules."""
    found: dict[str, str] = {}
    for package in packages:
        for module_info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            module = importlib.import_module(f"{package}.{module_info.name}")
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, base) and cls.name and cls.__module__ == module.__name__ and cls not in leave_out:
                    found[cls.name] = f"{cls.__module__}:{cls.__qualname__}"
    return found


def test_every_backend_in_the_tables_resolves_to_a_module_and_class() -> None:
    # Read, not imported: the modules need torch, vLLM or a provider's SDK.
    for registry in (GENERATION_BACKENDS, JUDGE_BACKENDS):
        for name in registry:
            module_name, class_name = registry[name].split(":")
            spec = importlib.util.find_spec(module_name)
            assert spec is not None and spec.origin is not None, registry[name]
            assert f"\nclass {class_name}" in Path(spec.origin).read_text(), registry[name]


def test_an_unknown_name_is_one_line_with_the_closest_name() -> None:
    with pytest.raises(UserError, match=r"unknown format 'thymme' \(did you mean 'thyme'\?\); choose one of: deepeyes,"):
        FORMATS.load("thymme")
    with pytest.raises(UserError, match=r"unknown generation backend 'vlm' \(did you mean 'vllm'\?\)"):
        GENERATION_BACKENDS.load("vlm")
    with pytest.raises(UserError, match=r"unknown stage 'consistensy' \(did you mean 'consistency'\?\); `curate st"):
        STAGES.load("consistensy")


def plugin_site(tmp_path: Path, group: str, entries: dict[str, str], module: str) -> Path:
    """An installed distribution as importlib.metadata finds it: a module and a dist-info with entry points."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_plugin.py").write_text(module)
    dist = site / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (dist / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    return site


PLUGIN_FORMATS = """
from curate.formats.messages import MessagesFormat

class TabFormat(MessagesFormat):
    name = "tabs"

class NotAFormat:
    pass
"""


def test_an_entry_point_adds_a_name_a_registered_class_overrides_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    site = plugin_site(tmp_path, "curate.formats", {"tabs": "my_plugin:TabFormat", "broken": "my_plugin:NotAFormat",
                                                    "messages": "my_plugin:TabFormat"}, PLUGIN_FORMATS)
    monkeypatch.syspath_prepend(str(site))
    registry: Registry[Format] = Registry("format", {"messages": "curate.formats.messages:MessagesFormat"},
                                          "curate.formats", Format)
    assert registry.names() == ["broken", "messages", "tabs"]
    assert registry.load("tabs").__module__ == "my_plugin"
    assert registry["messages"] == "my_plugin:TabFormat"  # an installed plugin wins over a built-in
    with pytest.raises(UserError, match=r"format 'broken' = my_plugin:NotAFormat is not a curate\.formats\.Format"):
        registry.load("broken")

    class Local(Format):
        name = "tabs"

    assert registry.register(Local) is Local and registry.load("tabs") is Local


PLUGIN_BACKEND = """
class Echo:
    '''A generation backend of another package: answers every prompt with `reply`.'''

    def __init__(self, model, reply="<answer>4</answer>"):
        self.backend, self.model, self.reply = "echo", model, reply

    def generate(self, prompts, n, params):
        return [[self.reply] * n for _ in prompts]

    def close(self):
        pass
"""

RUN_PLUGIN_BACKEND = """
import sys
from pathlib import Path
from curate.errors import UserError
from curate.generation import BackendSpec, Prompt, SamplingParams, make_generator
from curate.recipe import load_recipe
from curate.sample import Message, TextPart

spec = load_recipe(Path(sys.argv[1])).stages[0]
print(spec.options.backend, spec.options.backend_options)
generator = make_generator(BackendSpec(spec.options.backend, spec.options.model, spec.options.backend_options))
print(generator.generate([Prompt((Message("user", [TextPart("2 + 2?")]),))], 2, SamplingParams()))
try:
    load_recipe(Path(sys.argv[2]))
except UserError as error:
    print(error)
"""


def test_a_generation_backend_from_an_entry_point_is_named_in_a_recipe(tmp_path: Path) -> None:
    site = plugin_site(tmp_path, "curate.generation_backends", {"echo": "my_plugin:Echo"}, PLUGIN_BACKEND)
    (tmp_path / "rows.jsonl").write_text("")
    recipes = []
    for name, options in (("good", "{reply: hello}"), ("typo", "{rply: hello}")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text("input: {paths: [rows.jsonl], format: messages}\noutput: {kind: sft}\n"
                          f"stages: [{{base_model_solvable: {{backend: echo, model: m, backend_options: {options}}}}}]\n")
        recipes.append(str(recipe))
    result = subprocess.run([sys.executable, "-c", RUN_PLUGIN_BACKEND, *recipes], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": f"{site}:{REPO}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "echo {'reply': 'hello'}", "[['hello', 'hello']]",
        f"{recipes[1]}: stage 'base_model_solvable': unknown option 'backend_options.rply' for backend 'echo'"
        " (did you mean 'reply'?); valid options: reply"]
