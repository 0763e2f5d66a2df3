"""The docs stay true to the code: generated reference pages are current, stages declare the reasons they give,
and every shell block marked runnable in the quick start and the tutorials runs on the bundled sample."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from curate.registry import STAGES, stage_classes
from curate.stage import Stage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gen_docs  # noqa: E402

RUNNABLE_PAGES = ["docs/getting-started.md", *sorted(
    str(path.relative_to(REPO)) for path in (REPO / "docs" / "tutorials").glob("*.md"))]
RUNNABLE_BLOCK = re.compile(r"<!-- runnable -->\s*\n```bash\n(.*?)```", re.DOTALL)


def test_generated_reference_pages_are_up_to_date() -> None:
    # In a fresh process: other tests register stages of their own in this one, which no page lists.
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                           text=True, cwd=REPO, check=False)
    assert check.returncode == 0, check.stderr


def test_the_generator_knows_every_environment_variable_the_code_reads() -> None:
    read = gen_docs.environment_variables()
    assert {"CURATE_CACHE", "CURATE_MODELS", "CURATE_BWRAP", "GEMINI_API_KEY", "OPENAI_API_KEY"} <= read
    assert read <= set(gen_docs.ENVIRONMENT), read - set(gen_docs.ENVIRONMENT)


def emitted_reasons(cls: type[Stage]) -> set[str]:
    """The reasons a stage's code gives where they can be read without running it: literal first arguments of
    `reject(...)`, literals assigned to `reason` or returned by a function whose name says reason, the reason slot
    of `(index, reason, detail)` tuples, and a judge's dimension reasons. It reads the class, the module-level
    functions of its module, the functions it imports by name, and its base classes up to `Stage`."""
    sources = [inspect.getsource(base) for base in cls.__mro__ if issubclass(base, Stage) and base is not Stage]
    module = sys.modules[cls.__module__]
    for value in vars(module).values():
        if inspect.isfunction(value) and (value.__module__ == module.__name__ or value.__module__.startswith(
                ("curate.filters.", "curate.judges.", "curate.images"))):
            sources.append(inspect.getsource(value))
    found: set[str] = set(getattr(cls, "dimension_reasons", {}).values())
    for source in sources:
        for node in ast.walk(ast.parse(textwrap.dedent(source))):
            found.update(_reason_literals(node))
    return found


def _reason_literals(node: ast.AST) -> set[str]:
    def literals(expression: ast.AST | None) -> set[str]:  # a literal, or either branch of a conditional
        if isinstance(expression, ast.IfExp):
            return literals(expression.body) | literals(expression.orelse)
        if isinstance(expression, ast.Constant) and isinstance(expression.value, str):
            return {expression.value} if re.fullmatch(r"[a-z]+(_[a-z]+)*", expression.value) else set()
        return set()

    if isinstance(node, ast.Call) and ast.unparse(node.func) == "reject" and node.args:
        return literals(node.args[0])
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "reason" for t in node.targets):
        return literals(node.value)
    def returned(expression: ast.AST | None) -> set[str]:  # a lookup table returns its values, not its keys
        if isinstance(expression, ast.Call) and isinstance(expression.func, ast.Attribute) \
                and isinstance(expression.func.value, ast.Dict) and expression.func.attr == "get":
            return {v for item in [*expression.func.value.values, *expression.args[1:]] for v in literals(item)}
        return literals(expression)

    if isinstance(node, ast.FunctionDef) and "reason" in node.name:
        return {value for child in ast.walk(node) if isinstance(child, ast.Return) for value in returned(child.value)}
    # `(index, reason, detail)`; a tuple of three strings is a type's choices (`Literal[...]`), not a verdict.
    if isinstance(node, ast.Tuple) and len(node.elts) == 3 and isinstance(node.elts[1], ast.Constant) \
            and not (isinstance(node.elts[0], ast.Constant) and isinstance(node.elts[0].value, str)):
        return literals(node.elts[1])
    return set()


@pytest.mark.parametrize("name", sorted(STAGES.builtin))  # not the tests' own stages, registered as modules import
def test_every_stage_declares_the_reasons_it_gives(name: str) -> None:
    cls = STAGES.load(name)
    assert cls.reasons, f"stage {name!r} declares no rejection reasons (class attribute `reasons`)"
    assert all(isinstance(text, str) and text.strip() for text in cls.reasons.values())
    undeclared = emitted_reasons(cls) - set(cls.reasons)
    assert not undeclared, f"stage {name!r} gives reasons it does not declare in `reasons`: {sorted(undeclared)}"


def test_the_reason_scan_finds_what_the_stages_give() -> None:
    """The static scan is what the test above relies on: it must see the reasons built in every way stages
    build them (literal, conditional, returned by a helper, in a mismatch tuple, a judge's dimensions)."""
    classes = stage_classes()
    assert {"truncated_image", "unreadable_image", "empty_image"} <= emitted_reasons(classes["image_integrity"])
    assert {"syntax_error", "timeout", "bad_input", "sandbox_crash"} <= emitted_reasons(classes["execution_failure"])
    assert {"inconsistent_output", "not_executed"} <= emitted_reasons(classes["consistency"])
    assert {"missing_image", "bad_roles"} <= emitted_reasons(classes["format"])
    assert {"not_strategic", "judge_error"} <= emitted_reasons(classes["strategic_tool_judge"])


def runnable_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in RUNNABLE_PAGES:
        text = (REPO / page).read_text(encoding="utf-8")
        blocks.extend((page, block) for block in RUNNABLE_BLOCK.findall(text))
    return blocks


def test_the_quick_start_and_every_tutorial_have_runnable_blocks() -> None:
    pages = {page for page, _ in runnable_blocks()}
    assert pages == set(RUNNABLE_PAGES), set(RUNNABLE_PAGES) - pages


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_runnable_blocks_run(page: str, tmp_path: Path) -> None:
    """A page's runnable blocks run in order, in one shell, from a folder laid out like the repository (its
    entries linked), as a user types them after the install: `curate` on the PATH, on CPU, without an API key."""
    blocks = [block for name, block in runnable_blocks() if name == page]
    for entry in REPO.iterdir():
        if entry.name not in {".git", ".venv", ".venv-newest", "runs"}:
            (tmp_path / entry.name).symlink_to(entry)
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("GEMINI_", "GOOGLE_", "OPENAI_"))}
    environment |= {"PATH": f"{Path(sys.executable).parent}:{environment.get('PATH', '/usr/bin:/bin')}",
                    "PYTHONPATH": str(REPO), "CURATE_CACHE": str(tmp_path / "cache.sqlite"), "OMP_NUM_THREADS": "1"}
    script = "set -euo pipefail\n" + "\n".join(blocks)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{page}: a runnable block failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if page in PAGE_CHECKS:
        PAGE_CHECKS[page](tmp_path)


def the_training_tutorial_trained(root: Path) -> None:
    """The tutorial's chain on the real SmolLM2 (shards of `curate run`, SFT, HDPO from the SFT checkpoint, the
    plot), as the trainer's own tests check it on the toy policy."""
    import torch

    from curate.generation.hf import load_model
    from curate.train.checkpoint import is_sharded_checkpoint

    assert is_sharded_checkpoint(root / "runs" / "train-sft" / "checkpoint-000001")
    out = root / "runs" / "train-hdpo"
    (entry,) = [json.loads(line) for line in (out / "hdpo_log.jsonl").read_text().splitlines()]
    assert entry["step"] == 1
    for key in ("accuracy", "tool_call_rate", "mean_tool_calls", "tool_productivity", "qualifying_ratio", "loss_acc",
                "loss_tool", "clip_frac_acc", "clip_frac_tool", "grad_norm", "seconds", "groups/mixed", "zero_adv_acc",
                "tool_signal_acc/all_correct", "tool_signal_tool/mixed"):
        assert key in entry, key
    checkpoint = out / "checkpoint-000001"
    assert torch.load(checkpoint / "trainer_state.pt")["step"] == 1
    settings = json.loads((checkpoint / "train_config.json").read_text())
    assert settings["max_tokens"] == 512 and settings["generation"] == "transformers" and settings["rollouts"] == 2
    assert settings["model"].endswith("runs/train-sft/checkpoint-000001")
    assert load_model(str(checkpoint), "cpu", "float32").net.config.model_type == "llama"  # SmolLM2, trained on
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


PAGE_CHECKS = {"docs/tutorials/train.md": the_training_tutorial_trained}
