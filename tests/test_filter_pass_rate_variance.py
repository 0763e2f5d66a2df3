"""pass_rate_variance: buckets by measured pass rate (exact p through a local server), the real model, verl output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import processed
from curate_testkit.pictures import png_bytes
from curate_testkit.servers import ChatServer, last_user_text

from curate.formats import get_format, records
from curate.sample import Image, ImagePart, Message, Sample, TextPart
from curate.stage import Verdict
from curate.filters.pass_rate_variance import PassRateVariance


def prompt(sample_id: str, question: str, answer: str | None) -> Sample:
    messages = [Message("system", [TextPart("You may call a python tool.")]),
                Message("user", [ImagePart(0), TextPart(question)])]
    return Sample(sample_id, "test", messages, [Image(png_bytes(5), "png")], answer)


def run(batch: list[Sample], tmp_path: Path, **options: Any) -> list[Verdict]:
    return processed(PassRateVariance(PassRateVariance.Options(**options)), batch, tmp_path / "c.sqlite")


def m_of_g_correct(body: dict[str, Any], index: int) -> str:
    """The question says how many of the rollouts are right: choices 0..m-1 answer 7, the rest 0."""
    m = int(re.search(r"m=(\d+)", last_user_text(body)).group(1))
    return "<answer>7</answer>" if index < m else "<answer>0</answer>"


@pytest.mark.parametrize(("bounds", "expected"), [
    ({}, ["too_hard", "", "", "", "too_easy"]),
    ({"low": 0.25}, ["too_hard", "too_hard", "", "", "too_easy"]),
    ({"low": 0.25, "low_inclusive": True}, ["too_hard", "", "", "", "too_easy"]),
    ({"high": 0.75}, ["too_hard", "", "", "too_easy", "too_easy"]),
    ({"high": 0.75, "high_inclusive": True}, ["too_hard", "", "", "", "too_easy"]),
    ({"low_inclusive": True, "high_inclusive": True}, ["", "", "", "", ""]),
    ({"low": 0.5, "high": 0.5, "low_inclusive": True, "high_inclusive": True}, ["too_hard", "too_hard", "", "too_easy", "too_easy"]),
])
def test_bounds_are_exclusive_unless_told(tmp_path: Path, bounds: dict, expected: list[str]) -> None:
    batch = [prompt(f"p{m}", f"How many? m={m}", "7") for m in range(5)]  # p = 0, 0.25, 0.5, 0.75, 1
    with ChatServer(answer=m_of_g_correct) as server:
        verdicts = run(batch, tmp_path, backend="openai", model="policy", rollouts=4,
                       backend_options={"base_url": server.base_url}, **bounds)
    assert [v.reason for v in verdicts] == expected
    assert [s.meta["pass_rate_variance"]["pass_rate"] for s in batch] == [0, 0.25, 0.5, 0.75, 1]
    assert all(v.keep == (v.reason == "") for v in verdicts)
    details = {v.detail.split(";")[0] for v in verdicts if not v.keep}
    assert details <= {"p = 0 (0/4 correct)", "p = 0.25 (1/4 correct)", "p = 0.75 (3/4 correct)", "p = 1 (4/4 correct)"}


def test_bounds_out_of_order_fail_at_load() -> None:
    with pytest.raises(ValueError, match=r"low \(0.8\) is above high \(0.2\)"):
        PassRateVariance.Options(low=0.8, high=0.2)


def test_pass_rate_reaches_the_verl_shard(tmp_path: Path) -> None:
    batch = [prompt("half", "Guess: m=4", "7"), prompt("none", "No truth m=1", None)]
    with ChatServer(answer=m_of_g_correct) as server:
        verdicts = run(batch, tmp_path, backend="openai", model="policy", rollouts=8,
                       backend_options={"base_url": server.base_url})
        assert sum(b["n"] for b in server.requests) == 8  # the prompt without ground truth is not rolled out
    assert [v.reason for v in verdicts] == ["", "no_ground_truth"]
    get_format("verl").write(batch[:1], tmp_path / "rl.parquet")
    (row,) = list(records(tmp_path / "rl.parquet"))
    assert row["extra_info"]["pass8"] == 0.5  # Metis-RL's column, filled when G = 8
    assert json.loads(row["extra_info"]["extra"])["pass_rate"] == 0.5


def test_real_model_buckets_by_its_measured_pass_rate(tmp_path: Path) -> None:
    easy = prompt("easy", "Repeat the word: piano. Answer with the word only.", "piano")
    hard = prompt("hard", "What is 4821 * 53312 - 123456789? Give the exact integer.", str(4821 * 53312 - 123456789))
    greedy = run([easy, hard], tmp_path, rollouts=4, temperature=0.0, max_tokens=16)
    assert [v.reason for v in greedy] == ["too_easy", "too_hard"]
    sampled = [prompt(f"s{i}", q, a) for i, (q, a) in enumerate([
        ("Repeat the word: lemon. Answer with the word only.", "lemon"), ("What is 2 + 2?", "4"),
        ("Name the capital of France.", "Paris")])]
    verdicts = run(sampled, tmp_path, rollouts=4, temperature=0.8, max_tokens=16, seed=3)
    for sample, verdict in zip(sampled, verdicts, strict=True):
        p = sample.meta["pass_rate_variance"]["pass_rate"]
        assert verdict.reason == ("too_hard" if p == 0 else "too_easy" if p == 1 else "")
