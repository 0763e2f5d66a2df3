"""Probe and judge stages build their model at the first request the cache cannot answer: a rerun, or a run on a
cache that holds every answer, loads no model. Counted (constructions), not timed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_accounting, messages_row, write_jsonl
from test_executor import outcome

import curate.generation
import curate.generation.hf
import curate.judges.local
from curate.executor import LocalExecutor
from curate.recipe import load_recipe

QUESTIONS = [("Repeat the word: lemon. Answer with the word only.", "lemon"),
             ("What is 4821 * 53312 - 123456789? Give the exact integer.", str(4821 * 53312 - 123456789)),
             ("Repeat the word: piano. Answer with the word only.", "piano")]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many generators were made and models loaded (probe and judge), through the real constructors."""
    counts = {"generators": 0, "models": 0}

    def counting(function: Any, what: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[what] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(curate.generation, "make_generator", counting(curate.generation.make_generator, "generators"))
    monkeypatch.setattr(curate.generation.hf, "load_model", counting(curate.generation.hf.load_model, "models"))
    monkeypatch.setattr(curate.judges.local, "load_model", counting(curate.judges.local.load_model, "models"))
    return counts


def recipe(tmp_path: Path) -> Path:
    rows = [{**messages_row(index, question), "answer": answer} for index, (question, answer) in enumerate(QUESTIONS)]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lazy", "input": {"paths": [str(write_jsonl(tmp_path / "input.jsonl", rows))]},
        "stages": [
            {"base_model_solvable": {"model": "smollm2-135m", "k": 2, "temperature": 0.0, "max_tokens": 8,
                                     "instruction": ""}},
            {"strategic_tool_judge": {"backend": "transformers", "model": "smollm2-135m",
                                      "backend_options": {"string_tokens": 0, "max_prompt_tokens": 64},
                                      "min_scores": {"visual_relevance": 1, "reasoning_coherence": 1,
                                                     "tool_rationale": 1}}}],
        "output": {"kind": "sft"}, "batch_size": 2}))
    return path


def run(path: Path, run_dir: Path, cache: Path) -> dict[str, Any]:
    return LocalExecutor(load_recipe(path), run_dir, cache_path=cache, progress=False).run()


def test_a_cached_rerun_loads_no_model_and_gives_the_same_run(tmp_path: Path, built: dict[str, int]) -> None:
    path, cache = recipe(tmp_path), tmp_path / "cache.sqlite"
    run(path, tmp_path / "first", cache)
    # The counters see the builds: one generator for the probe, its model and the judge's model.
    assert built == {"generators": 1, "models": 2}
    first = outcome(tmp_path / "first")
    assert first[0] and first[1]  # both kept and rejected rows: the stages really ran

    built.update(generators=0, models=0)
    manifest = run(path, tmp_path / "second", cache)  # a new run directory, every answer in the cache
    assert built == {"generators": 0, "models": 0}
    assert_accounting(tmp_path / "second")
    assert manifest["input_rows"] == len(QUESTIONS)
    assert outcome(tmp_path / "second") == first

    run(path, tmp_path / "first", cache)  # the finished run, asked again
    assert built == {"generators": 0, "models": 0}
