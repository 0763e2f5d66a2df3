"""`mode: batch`: the gemini judge through the real `google.genai` client's `batches` and `files` against a local
server speaking the Batch API; kill -9 and resume without a duplicate submission; bounded prompts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import REPO, assert_accounting, processed
from curate_testkit.pictures import png_bytes
from curate_testkit.gemini_server import GeminiBatchServer, GeminiServer, request_text
from test_judges import KEY, pointless_if_hello, sft_recipe, trajectory

from curate.cache import Cache
from curate.cli import main
from curate.errors import UserError
from curate.executor import LocalExecutor
from curate.recipe import load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall
from curate.judges.batch import BatchJobs, Job
from curate.judges.bounds import PromptBounds, bound_sample
from curate.judges.stage import load_rubric, make_runner
from curate.judges.strategic_tool import StrategicToolJudge


@pytest.fixture(autouse=True)
def gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)


def batch_options(server: GeminiServer, **options: Any) -> dict[str, Any]:
    backend = {"base_url": server.base_url, **options.pop("backend_options", {})}
    return {"model": "gemini-test", "mode": "batch", "batch_poll_seconds": 0.01, "batch_max_poll_seconds": 0.05,
            "backoff": 0.01, "backend_options": backend, **options}


def samples(count: int) -> list[Sample]:
    return [trajectory(f"t{i}", f"print('hello')  # {i}" if i % 2 else f"crop({i})") for i in range(count)]


def judge_batch(server: GeminiServer, batch: list[Sample], cache: Path, **options: Any) -> tuple[Any, list]:
    stage = StrategicToolJudge(StrategicToolJudge.Options(**batch_options(server, **options)))
    return stage, processed(stage, batch, cache)


@pytest.mark.parametrize("inline_limit", [10**9, 0], ids=["inline", "file"])
def test_batch_verdicts_and_cache_are_those_of_online(tmp_path: Path, inline_limit: int) -> None:
    batch = samples(5)
    with GeminiServer(answer=pointless_if_hello) as online_server:
        online_stage = StrategicToolJudge(StrategicToolJudge.Options(
            model="gemini-test", backoff=0.01, backend_options={"base_url": online_server.base_url}))
        online_batch = samples(5)
        online = processed(online_stage, online_batch, tmp_path / "online.sqlite")
    with GeminiBatchServer(answer=pointless_if_hello, running_polls=2) as server:
        _, verdicts = judge_batch(server, batch, tmp_path / "c.sqlite", backend_options={"inline_limit": inline_limit})
        assert len(server.jobs) == 1 and all(count == 1 for count in server.submissions.values())
        (job,) = server.jobs.values()
        assert job["inline"] == (inline_limit > 0) and len(job["entries"]) == 5
        assert server.polls >= 3  # pending/running, then succeeded: it waited
    assert [v.keep for v in verdicts] == [v.keep for v in online] == [True, False, True, False, True]
    assert [s.meta["strategic_tool_judge"] for s in batch] == [s.meta["strategic_tool_judge"] for s in online_batch]
    # The batch request is the online request: same contents, system instruction and generation config (the
    # client spells one field `mime_type` online; the API's JSON takes either spelling).
    sent = {request_text(r["body"]): same_spelling(r["body"]) for r in online_server.requests}
    for _, request in job["entries"]:
        assert same_spelling({k: v for k, v in request.items() if k != "model"}) == sent[request_text(request)]
    # Cached exactly as online: an online judge on the batch cache pays for nothing.
    with GeminiServer(answer=pointless_if_hello) as again:
        stage = StrategicToolJudge(StrategicToolJudge.Options(model="gemini-test", backend_options={"base_url": again.base_url}))
        processed(stage, samples(5), tmp_path / "c.sqlite")
        assert again.requests == []


def same_spelling(body: dict[str, Any]) -> Any:
    return json.loads(json.dumps(body).replace('"mime_type"', '"mimeType"'))


def test_failed_requests_and_missing_results_go_into_a_later_job(tmp_path: Path) -> None:
    batch = samples(4)
    with GeminiBatchServer(answer=pointless_if_hello) as server:
        stage = StrategicToolJudge(StrategicToolJudge.Options(**batch_options(server)))
        keys = [stage_key(stage, sample, tmp_path) for sample in batch]
        server.request_errors.add(keys[0])
        server.missing.add(keys[1])
        _, verdicts = judge_batch(server, batch, tmp_path / "c.sqlite")
        assert len(server.jobs) == 2
        assert server.submissions == {keys[0]: 2, keys[1]: 2, keys[2]: 1, keys[3]: 1}
    assert [v.keep for v in verdicts] == [True, False, True, False]


def stage_key(stage: StrategicToolJudge, sample: Sample, tmp_path: Path) -> str:
    runner = make_runner(stage.options, Cache(tmp_path / "keys.sqlite"), load_rubric(stage.default_rubric))
    key = runner.key(stage_request(stage, sample))
    runner.close()
    return key


def stage_request(stage: StrategicToolJudge, sample: Sample) -> Any:
    stage.rubric = load_rubric(stage.default_rubric)
    made = stage.request(sample)
    assert made is not None
    return made[0]


def test_a_request_that_keeps_failing_is_judge_error_after_the_retries(tmp_path: Path) -> None:
    with GeminiBatchServer(answer=lambda body: "not json") as server:
        _, verdicts = judge_batch(server, samples(2), tmp_path / "c.sqlite", batch_retries=1)
        assert len(server.jobs) == 2 and set(server.submissions.values()) == {2}
    assert [v.reason for v in verdicts] == ["judge_error", "judge_error"]
    assert "2 batch attempts" in verdicts[0].detail


@pytest.mark.parametrize("state", ["expired", "failed", "cancelled"])
def test_a_job_that_ends_badly_is_resubmitted_once(tmp_path: Path, state: str) -> None:
    with GeminiBatchServer(answer=pointless_if_hello) as server:
        server.job_outcomes.append(state)
        _, verdicts = judge_batch(server, samples(3), tmp_path / "c.sqlite")
        assert len(server.jobs) == 2 and set(server.submissions.values()) == {2}
    assert [v.keep for v in verdicts] == [True, False, True]


def test_a_job_that_ends_badly_twice_stops_the_run_with_one_line(tmp_path: Path) -> None:
    with GeminiBatchServer(answer=pointless_if_hello) as server:
        server.job_outcomes.extend(["failed", "expired"])
        with pytest.raises(UserError) as stopped:
            judge_batch(server, samples(3), tmp_path / "c.sqlite")
        assert len(server.jobs) == 2
    message = str(stopped.value)
    assert "\n" not in message and "expired after a resubmission" in message and "batches/job2" in message


def test_a_job_created_just_before_a_kill_is_found_by_its_display_name(tmp_path: Path) -> None:
    """Killed after the create call, before its name was recorded: the resumed run finds the job, never resubmits."""
    batch = samples(3)
    with GeminiBatchServer(answer=pointless_if_hello) as server:
        stage = StrategicToolJudge(StrategicToolJudge.Options(**batch_options(server)))
        cache = Cache(tmp_path / "c.sqlite")
        runner = make_runner(stage.options, cache, load_rubric(stage.default_rubric))
        entries = [(runner.key(request), request) for request in (stage_request(stage, s) for s in batch)]
        job = Job("curate-killed", None, tuple(key for key, _ in entries), 0)
        BatchJobs(cache).add("gemini", "gemini-test", job)
        runner.backend.submit_batch(job.display_name, entries)  # the create that the kill came right after
        runner.close()
        cache.close()
        _, verdicts = judge_batch(server, batch, tmp_path / "c.sqlite")
        assert len(server.jobs) == 1 and set(server.submissions.values()) == {1}
    assert [v.keep for v in verdicts] == [True, False, True]


def test_kill_9_while_a_job_runs_resumes_it_without_a_duplicate_submission(tmp_path: Path) -> None:
    with GeminiBatchServer(answer=pointless_if_hello) as server:
        server.hold = True  # the job runs until the test lets it finish
        recipe = sft_recipe(tmp_path, 10, server.base_url, **{k: v for k, v in batch_options(server).items()
                                                                if k not in ("model", "backend_options", "backoff")})
        command = [sys.executable, "-m", "curate", "run", str(recipe), "-o", str(tmp_path / "run"), "--no-progress",
                   "--cache", str(tmp_path / "c.sqlite")]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env={**os.environ, "GEMINI_API_KEY": KEY}, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.polls < 3:  # the job is created, named and polled
            time.sleep(0.02)
        assert server.polls >= 3, process.stderr.read().decode() if process.poll() is not None else "no poll"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert len(server.jobs) == 1 and not (tmp_path / "run" / "manifest.json").exists()
        server.hold = False
        resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "GEMINI_API_KEY": KEY},
                                 check=False)
        assert resumed.returncode == 0, resumed.stderr
        duplicates = sum(count - 1 for count in server.submissions.values())
        assert duplicates == 0 and len(server.submissions) == 10
        assert not server.requests  # nothing went online
    assert_accounting(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][1]["reasons"] == {"not_strategic": 4} and manifest["kept_rows"] == 6


# --- bounded prompts -----------------------------------------------------------------------------------------------


def long_trajectory(observation_chars: int, images: int) -> Sample:
    messages = [Message("user", [ImagePart(0), TextPart("QUESTION: which bar is tallest?")])]
    for turn in range(3):
        call = ToolCall("python", {"code": f"crop(image, {turn})"}, f"c{turn}")
        messages += [Message("assistant", [TextPart("x" * 5000 + f"REASONING {turn}: crop the left bar.")], [call]),
                     Message("tool", [TextPart(f"OBS{turn}" + "y" * observation_chars + f"END{turn}"),
                                      *[ImagePart(i) for i in range(1, images)]], tool_call_id=f"c{turn}")]
    messages.append(Message("assistant", [TextPart("FINAL <answer>60</answer>")]))
    return Sample("long", "test", messages, [Image(png_bytes(i), "png") for i in range(images)], "60")


def test_a_long_trajectory_keeps_question_answer_calls_and_reasoning_and_says_what_was_cut() -> None:
    sample = long_trajectory(400_000, 4)
    bounded, cut = bound_sample(sample, PromptBounds(max_prompt_tokens=8_000, max_images=2))
    text = "".join(m.text for m in bounded.messages)
    size = len(text) + sum(len(c.code or "") for _, c in bounded.indexed_tool_calls)
    assert size <= 8_000 * 4 - 2 * 258 * 4 and len(sample.messages[2].text) > 400_000  # the input is untouched
    for kept in ("QUESTION: which bar", "FINAL <answer>60</answer>", "REASONING 0: crop the left bar.",
                 "REASONING 2: crop the left bar.", "OBS1", "END1"):
        assert kept in text
    assert [c.code for _, c in bounded.indexed_tool_calls] == ["crop(image, 0)", "crop(image, 1)", "crop(image, 2)"]
    assert "characters cut ...]" in text and "[image left out]" in text
    shown = [p.index for m in bounded.messages for p in m.content if isinstance(p, ImagePart)]
    assert shown[0] == 0 and len(shown) == 2  # the question's image first
    assert cut is not None and cut["images_left_out"] == 8 and cut["chars_cut"] > 1_150_000
    assert bound_sample(long_trajectory(10, 1), PromptBounds(8_000, 2)) == (long_trajectory(10, 1), None)


def test_the_judge_records_the_cut_in_meta_and_sends_the_bounded_prompt(tmp_path: Path) -> None:
    with GeminiServer(answer=pointless_if_hello) as server:
        stage = StrategicToolJudge(StrategicToolJudge.Options(model="gemini-test", max_prompt_tokens=4_000,
                                                              backend_options={"base_url": server.base_url}))
        sample = long_trajectory(1_000_000, 3)
        (verdict,) = processed(stage, [sample], tmp_path / "c.sqlite")
        (request,) = server.requests
    assert verdict.keep
    sent = request_text(request["body"])
    assert len(sent) < 4_000 * 4 and "QUESTION" in sent and "FINAL" in sent
    assert sample.meta["strategic_tool_judge"]["prompt_cut"]["chars_cut"] > 2_900_000


# --- curate estimate -----------------------------------------------------------------------------------------------


def estimate_cli(recipe: Path, cache: Path) -> str:
    with pytest.MonkeyPatch.context() as patch:  # it needs no API key
        patch.delenv("GEMINI_API_KEY")
        done = CliRunner().invoke(main, ["estimate", str(recipe), "--cache", str(cache)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return done.output


def table_row(output: str, stage: str) -> list[str]:
    line = next(line for line in output.splitlines() if stage in line)
    return [cell.strip() for cell in line.strip("│ ").split("┆")]


def test_estimate_counts_what_a_run_would_send_leaves_out_the_cached_and_prices_both_modes(tmp_path: Path) -> None:
    prices = {"usd_per_million_input": 2.0, "usd_per_million_output": 12.0, "expected_output_tokens": 100}
    with GeminiServer(answer=pointless_if_hello) as server:
        recipe = sft_recipe(tmp_path, 10, server.base_url, **prices)
        cells = table_row(estimate_cli(recipe, tmp_path / "c.sqlite"), "strategic_tool_judge")
        assert not server.requests  # nothing sent
        requests, cached, input_tokens, output_tokens, online, batch = cells[2:]
        assert (requests, cached, output_tokens) == ("10", "0", "1000")
        expected_online = int(input_tokens) * 2.0 / 1e6 + 1000 * 12.0 / 1e6
        assert float(online) == pytest.approx(expected_online, abs=0.005) and float(batch) == pytest.approx(expected_online / 2, abs=0.005)
        # A run over the first 4 rows fills the cache: the estimate leaves exactly those out (same keys as the run).
        first_four = tmp_path / "four.jsonl"
        first_four.write_text("".join((tmp_path / "in.jsonl").read_text().splitlines(keepends=True)[:4]))
        LocalExecutor(load_recipe(recipe, input_paths=[str(first_four)]), tmp_path / "run", cache_path=tmp_path / "c.sqlite",
                      progress=False).run()
        assert len(server.requests) == 4
        cells = table_row(estimate_cli(recipe, tmp_path / "c.sqlite"), "strategic_tool_judge")
        assert cells[2:4] == ["6", "4"]


def test_estimate_without_prices_says_so_in_one_line(tmp_path: Path) -> None:
    recipe = sft_recipe(tmp_path, 3, "http://127.0.0.1:9")
    output = estimate_cli(recipe, tmp_path / "c.sqlite")
    notes = [line for line in output.splitlines() if line.startswith("note:")]
    assert notes == ["note: strategic_tool_judge has no price: set usd_per_million_input and usd_per_million_output "
                     "in its options to see USD"]
    assert table_row(output, "strategic_tool_judge")[2] == "3" and "3 rows read" in output


def test_a_create_call_that_failed_transiently_is_looked_up_before_it_is_retried(tmp_path: Path) -> None:
    """A 503 on create may come after the provider made the job: the retry finds it instead of paying again."""
    with GeminiBatchServer(answer=pointless_if_hello) as server:
        server.create_faults.append("503-after-create")
        _, verdicts = judge_batch(server, samples(3), tmp_path / "c.sqlite")
        assert len(server.jobs) == 1 and set(server.submissions.values()) == {1}
    assert [v.keep for v in verdicts] == [True, False, True]
