"""text_dedup: near-duplicate questions across batches and files, its index as resumable stage state, Ray parity."""

from __future__ import annotations

import os
import pickle
import random
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ONE_WORKER, REPO, assert_accounting, messages_row, shard_ids, write_jsonl
from curate.filters.text_dedup import TextDedup
from curate_testkit.harness import killed_mid_run
from curate_testkit.sample_generator import paraphrase, with_context

from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.recipe import _validate, load_recipe
from curate.sample import Message, Sample, TextPart, ToolCall
from curate.stage import StageContext, Verdict
from curate.textnorm import Normaliser, char_shingles

CORE_QUESTIONS = ["What is the total amount on this receipt?", "What word is written on the small green sign?",
                  "What is the difference between the tallest and the shortest bar?",
                  "Who designed the landmark on this postcard?"]


def question(sample_id: str, text: str, answer: str = "") -> Sample:
    messages = [Message("user", [TextPart(text)])]
    if answer:
        messages.append(Message("assistant", [TextPart(answer)]))
    return Sample(sample_id, "t", messages)


def stage(tmp_path: Path, **options: object) -> TextDedup:
    dedup = TextDedup(TextDedup.Options(**options))
    dedup.setup(StageContext(tmp_path / "cache.sqlite", tmp_path))
    return dedup


def distinct_questions(count: int) -> list[str]:
    """Questions as the bundled sample writes them: a context sentence, then one of a few task questions."""
    return [with_context(f"q{k}", CORE_QUESTIONS[k % len(CORE_QUESTIONS)]) for k in range(count)]


def true_jaccard(first: str, second: str) -> float:
    a, b = (char_shingles(Normaliser()(text), 5) for text in (first, second))
    return len(a & b) / len(a | b)


# --- verdicts ------------------------------------------------------------------------------------


def test_paraphrased_questions_are_rejected_naming_the_first_and_the_jaccard(tmp_path: Path) -> None:
    rng = random.Random(7)
    originals = distinct_questions(40)
    copies = [paraphrase(text, rng) for text in originals[:20]]
    dedup = stage(tmp_path)
    verdicts = dedup.process([question(f"o{k}", text) for k, text in enumerate(originals)])
    assert all(v.keep for v in verdicts)
    copied = [question(f"c{k}", text) for k, text in enumerate(copies)]
    verdicts = dedup.process(copied)
    assert [v.reason for v in verdicts] == ["near_duplicate_text"] * 20
    for k, (verdict, sample) in enumerate(zip(verdicts, copied)):
        jaccard = sample.meta["text_dedup"]["jaccard"]
        assert sample.meta["text_dedup"]["duplicate_of"] == f"o{k}" and 0.7 <= jaccard <= 1.0
        assert re.fullmatch(rf"question (near-duplicate of|same after normalisation as) sample o{k}"
                            rf" \(estimated Jaccard {jaccard:.2f}\)", verdict.detail)
        assert abs(jaccard - true_jaccard(originals[k], copies[k])) < 0.2  # an estimate of the real similarity


def test_equal_after_normalisation_is_the_exact_fast_path(tmp_path: Path) -> None:
    dedup = stage(tmp_path)
    verdicts = dedup.process([question("a", "<image>\nHow many Birds are on the WIRE?"),
                              question("b", "how  many birds, are on the wire"),
                              question("c", "Count the birds flying above the lake.")])
    assert [v.keep for v in verdicts] == [True, False, True]
    assert verdicts[1].detail == "question same after normalisation as sample a (estimated Jaccard 1.00)"


def test_numbers_count_unless_ignored(tmp_path: Path) -> None:
    pair = [question("a", "What is 1234 * 5678 - 91011? Give the exact integer."),
            question("b", "What is 4321 * 8765 - 11019? Give the exact integer.")]
    assert [v.keep for v in stage(tmp_path).process(pair)] == [True, True]
    ignoring = stage(tmp_path, ignore_numbers=True).process(pair)
    assert (ignoring[1].keep, ignoring[1].detail) == (False, "question same after normalisation as sample a"
                                                       " (estimated Jaccard 1.00)")


def test_first_occurrence_kept_within_and_across_batches_and_rejected_ones_stay_out(tmp_path: Path) -> None:
    base = "Which of the four coloured bars in the chart of ticket sales is the tallest one?"
    dedup = stage(tmp_path)
    first = dedup.process([question("a", base), question("b", base.replace("tallest", "highest")),
                           question("c", "How many people are standing in the queue at the bakery?")])
    second = dedup.process([question("d", base.replace("four", "4").lower())])
    assert [v.keep for v in first + second] == [True, False, True, False]
    assert all("sample a " in v.detail for v in (first[1], second[0]))
    assert dedup.ids == ["a", "c"]


def test_the_text_option_picks_the_trajectory_or_the_final_answer(tmp_path: Path) -> None:
    call = Message("assistant", [TextPart("Let me compute.")], [ToolCall("python", {"code": "print(6 * 7)"}, "c")])
    trajectory = [question("t1", "What is six times seven?", "<answer>42</answer>"),
                  Sample("t2", "t", [Message("user", [TextPart("What is six times seven?")]), call,
                                     Message("tool", [TextPart("42")]), Message("assistant", [TextPart("42")])])]
    assert [v.keep for v in stage(tmp_path).process(trajectory)] == [True, False]
    assert [v.keep for v in stage(tmp_path, text="trajectory").process(trajectory)] == [True, True]
    answers = [question("f1", "Name the river.", "The answer is the Danube river."),
               question("f2", "Which river is shown?", "The answer is the Danube river!"),
               Sample("f3", "t", [Message("user", [TextPart("Prompt only")])], answer="the answer is the danube river")]
    verdicts = stage(tmp_path, text="final_answer").process(answers)
    assert [v.keep for v in verdicts] == [True, False, False]
    assert verdicts[2].detail.startswith("final_answer same after normalisation as sample f1")


def test_samples_without_text_are_kept(tmp_path: Path) -> None:
    verdicts = stage(tmp_path).process([question("a", ""), question("b", "<image>"), question("c", " ?! ")])
    assert all(v.keep for v in verdicts)


def test_an_estimate_exactly_at_the_threshold_counts(tmp_path: Path) -> None:
    """Agreeing on 14 of 25 values estimates a Jaccard of exactly 0.56, the threshold (0.56 × 25 is
    14.000000000000002 in floats: the count needed must still be 14)."""
    import numpy as np
    import rensa

    from curate.filters.text_dedup import SEED

    def signature(text: str) -> np.ndarray:
        minhash = rensa.RMinHash(num_perm=25, seed=SEED)
        minhash.update(sorted(set(text.split())))
        return np.asarray(minhash.digest())

    first = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    seconds = (" ".join(first.split()[:8] + [f"{word}{k}" for word in "uvw"]) for k in range(1000))
    second = next(text for text in seconds if (signature(text) == signature(first)).sum() == 14)
    dedup = stage(tmp_path, shingle="word", shingle_size=1, num_perm=25, bands=25, threshold=0.56)
    verdicts = dedup.process([question("a", first), question("b", second)])
    assert [v.keep for v in verdicts] == [True, False]
    assert "estimated Jaccard 0.56" in verdicts[1].detail


def test_verdicts_equal_brute_force_jaccard_away_from_the_threshold(tmp_path: Path) -> None:
    """LSH finds every pair the exact all-pairs definition finds, when no pair sits close to the threshold."""
    rng = random.Random(3)
    texts = distinct_questions(120)
    texts += [paraphrase(rng.choice(texts), rng, edits=1) for _ in range(60)]
    order = list(range(len(texts)))
    rng.shuffle(order)
    texts = [texts[k] for k in order]
    kept: list[str] = []
    stream: list[str] = []
    expected: list[str | None] = []
    for text in texts:  # the definition: the earliest kept text at Jaccard >= 0.7
        similarities = [true_jaccard(earlier, text) for earlier in kept]
        if any(abs(similarity - 0.7) < 0.1 for similarity in similarities):
            continue  # too close to the threshold for an estimate to call: left out of the stream
        similar = [k for k, similarity in zip(kept, similarities) if similarity >= 0.7]
        expected.append(f"s{stream.index(similar[0])}" if similar else None)
        kept += [] if similar else [text]
        stream.append(text)
    texts = stream
    dedup = stage(tmp_path)
    samples = [question(f"s{k}", text) for k, text in enumerate(texts)]
    got = [v for start in range(0, len(samples), 16) for v in dedup.process(samples[start : start + 16])]
    assert [s.meta.get("text_dedup", {}).get("duplicate_of") for s in samples] == expected
    assert sum(not v.keep for v in got) >= 50


def test_prepared_signatures_give_the_same_verdicts(tmp_path: Path) -> None:
    rng = random.Random(5)
    texts = distinct_questions(30) + [paraphrase(t, rng) for t in distinct_questions(10)]
    direct = stage(tmp_path).process([question(f"s{k}", t) for k, t in enumerate(texts)])
    prepared = [question(f"s{k}", t) for k, t in enumerate(texts)]
    TextDedup().prepare(prepared)  # as in a worker: an instance never set up, rows pickled to the driver
    prepared = pickle.loads(pickle.dumps(prepared))
    assert stage(tmp_path).process(prepared) == direct
    assert all("minhash" not in s.meta.get("text_dedup", {}) for s in prepared)  # the bulky part is dropped


def test_state_dict_round_trip_continues_the_stream(tmp_path: Path) -> None:
    rng = random.Random(11)
    texts = distinct_questions(60)
    texts += [paraphrase(rng.choice(texts), rng) for _ in range(30)]
    rng.shuffle(texts)
    stream = [question(f"s{k}", t) for k, t in enumerate(texts)]
    whole = stage(tmp_path)
    expected: list[Verdict] = [v for i in range(0, 90, 10) for v in whole.process(stream[i : i + 10])]
    first = stage(tmp_path)
    got = [v for i in range(0, 40, 10) for v in first.process(stream[i : i + 10])]
    second = stage(tmp_path)
    second.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))  # as the executor saves it
    got += [v for i in range(40, 90, 10) for v in second.process(stream[i : i + 10])]
    assert got == expected and sum(not v.keep for v in expected) >= 20


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bands": 30}, r"must divide num_perm \(252\)"),
        ({"num_perm": 64, "bands": 128}, r"must divide num_perm \(64\)"),
        ({"threshold": 0}, "greater than 0"),
        ({"threshold": 1.5}, "less than or equal to 1"),
        ({"shingle_size": 0}, "greater than or equal to 1"),
        ({"shingle": "line"}, "'char' or 'word'"),
        ({"text": "answer"}, "'question', 'trajectory' or 'final_answer'"),
        ({"treshold": 0.8}, r"unknown option 'treshold' \(did you mean 'threshold'\?\)"),
    ],
)
def test_bad_options_fail_when_the_recipe_loads(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _validate(TextDedup.Options, options, "recipe.yaml: stage 'text_dedup'")


def test_word_shingles_work_end_to_end(tmp_path: Path) -> None:
    dedup = stage(tmp_path, shingle="word", shingle_size=2, threshold=0.5, num_perm=64, bands=16)
    verdicts = dedup.process([question("a", "the red fox jumps over the lazy brown dog near the river bank"),
                              question("b", "the red fox jumps over the lazy brown dog near the river"),
                              question("c", "a completely different question about prime numbers")])
    assert [v.keep for v in verdicts] == [True, False, True]


# --- in a run: kill -9 and resume, Ray ------------------------------------------------------------


def rows_with_near_duplicates(count: int) -> list[dict]:
    """Distinct questions with a paraphrase of an earlier one every fifth row."""
    rng = random.Random(1)
    texts: list[str] = []
    for k in range(count):
        texts.append(paraphrase(rng.choice(texts), rng) if k % 5 == 4 else with_context(f"r{k}", CORE_QUESTIONS[k % 4]))
    return [messages_row(k, question=text) for k, text in enumerate(texts)]


def dedup_recipe(tmp_path: Path, source: Path, extra: list[dict] | None = None, batch_size: int = 4) -> Path:
    path = tmp_path / "dedup.yaml"
    path.write_text(yaml.safe_dump({"name": "dedup", "input": {"paths": [str(source)]},
                                    "stages": [{"text_dedup": {}}, *(extra or [])],
                                    "output": {"kind": "sft", "shard_rows": 16}, "batch_size": batch_size}))
    return path


def outcome(run_dir: Path) -> tuple[list[str], list[tuple[str, str, str, str]], list[tuple]]:
    manifest = assert_accounting(run_dir)
    rejected = pq.read_table(run_dir / "rejected", columns=["id", "stage", "reason", "detail"]).to_pylist()
    funnel = [(s["name"], s["in"], s["kept"], s["rejected"], s["reasons"]) for s in manifest["stages"]]
    verdicts = sorted((r["id"], r["stage"], r["reason"], r["detail"]) for r in rejected)
    return shard_ids(run_dir / "kept"), verdicts, funnel


KILLABLE_RUN = """
import sys
from pathlib import Path
from curate_testkit import stage_fixtures
from curate.registry import register_stage
register_stage(stage_fixtures.Slow)
from curate.executor import LocalExecutor
from curate.recipe import load_recipe
recipe, run_dir, cache = sys.argv[1:4]
LocalExecutor(load_recipe(Path(recipe)), Path(run_dir), workers=2, cache_path=Path(cache), progress=False).run()
"""


def test_kill_9_then_resume_gives_the_uninterrupted_verdicts(tmp_path: Path) -> None:
    from curate_testkit.stage_fixtures import Slow

    from curate.registry import register_stage
    register_stage(Slow)
    source = write_jsonl(tmp_path / "in.jsonl", rows_with_near_duplicates(60))
    recipe = dedup_recipe(tmp_path, source, [{"slow": {"seconds": 0.4}}])
    LocalExecutor(load_recipe(recipe), tmp_path / "clean", workers=2, cache_path=tmp_path / "c.sqlite",
                  progress=False).run()
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with killed_mid_run([sys.executable, "-c", KILLABLE_RUN, str(recipe), str(run_dir), str(tmp_path / "c.sqlite")],
                        run_dir, 4, env=env):
        pass
    assert not (run_dir / "manifest.json").exists(), "the run finished before it could be killed"
    resumed = LocalExecutor(load_recipe(recipe), run_dir, workers=2, cache_path=tmp_path / "c.sqlite",
                            progress=False).run()
    assert resumed["resumed"] == 1
    assert outcome(run_dir) == outcome(tmp_path / "clean")
    assert outcome(run_dir)[2][1][4] == {"near_duplicate_text": 12}


@pytest.mark.xdist_group(ONE_WORKER)
def test_ray_executor_gives_the_local_verdicts(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the Ray executor is the optional extra `ray`")
    from curate.ray_executor import RayExecutor

    eval_set = REPO / "data" / "sample" / "eval" / "mini_bench.parquet"
    copied = pq.read_table(eval_set, columns=["question"]).column("question")[2].as_py()
    rows = rows_with_near_duplicates(40)
    rows.insert(23, messages_row(100, question=copied))
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = load_recipe(dedup_recipe(tmp_path, source, [{"decontaminate": {"benchmarks": {
        "mini_bench": {"paths": [str(eval_set)], "image": "image", "id": "id"}}}}], batch_size=6))
    local = LocalExecutor(recipe, tmp_path / "local", workers=2, cache_path=tmp_path / "c.sqlite", progress=False).run()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        RayExecutor(recipe, tmp_path / "ray", cache_path=tmp_path / "c.sqlite", progress=False).run()
    finally:
        ray.shutdown()
    assert outcome(tmp_path / "ray") == outcome(tmp_path / "local")
    assert [s["reasons"] for s in local["stages"][1:]] == [{"near_duplicate_text": 8}, {"contaminated": 1}]
