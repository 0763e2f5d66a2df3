"""Judge stages through the real google-genai client and a real OpenAI-compatible client, over HTTP to
local servers: verdicts, request shape, retries, judge_error, budget stop and resume, cache, secrets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, assert_accounting, cli, processed, shard_ids
from curate_testkit.pictures import png_bytes
from curate_testkit.gemini_server import GeminiServer, request_images, request_text, system_text
from google import genai
from google.genai import Client as GenaiClient
from curate_testkit.servers import ChatServer

from curate.executor import LocalExecutor, StageError
from curate.formats import get_format
from curate.recipe import load_recipe
from curate.retry import TransientFailure
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall
from curate.verify import AnswerVerifier
from curate.judges.ambiguity import AmbiguityJudge
from curate.judges.limits import BudgetExhausted, RateLimiter
from curate.judges.stage import load_rubric
from curate.judges.strategic_tool import StrategicToolJudge
from curate.judges.verifier import JudgeVerifier

KEY = "test-key-do-not-leak-4242"


@pytest.fixture(autouse=True)
def gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)


def trajectory(sample_id: str, code: str, question: str = "What is the tallest bar?") -> Sample:
    call = ToolCall("python", {"code": code}, "call_0")
    messages = [Message("system", [TextPart("You may call python.")]),
                Message("user", [ImagePart(0), TextPart(question)]),
                Message("assistant", [TextPart("Let me measure.")], [call]),
                Message("tool", [TextPart("60"), ImagePart(1)], tool_call_id="call_0"),
                Message("assistant", [TextPart("<answer>60</answer>")])]
    return Sample(sample_id, "test", messages, [Image(png_bytes(1), "png"), Image(png_bytes(2), "png")], "60")


def pointless_if_hello(body: dict[str, Any]) -> str:
    """Scores from the request: a trajectory that only prints 'hello' gets a low tool rationale."""
    pointless = "print('hello')" in request_text(body)
    return json.dumps({"visual_relevance": 4, "reasoning_coherence": 4, "tool_rationale": 1 if pointless else 5,
                       "justification": "The call prints a constant." if pointless else "The crop is needed."})


def judge(stage_class: type, batch: list[Sample], cache: Path, **options: Any) -> tuple[Any, list]:
    stage = stage_class(stage_class.Options(**{"backoff": 0.01, **options}))
    return stage, processed(stage, batch, cache)


def test_strategic_judge_applies_scores_and_sends_rubric_schema_and_images(tmp_path: Path) -> None:
    no_tools = Sample("plain", "test", [Message("user", [TextPart("Hi?")]), Message("assistant", [TextPart("Hello")])])
    batch = [trajectory("good", "print(image_1.crop((0, 0, 8, 8)).size)"), trajectory("pointless", "print('hello')"), no_tools]
    with GeminiServer(answer=pointless_if_hello) as server:
        _, verdicts = judge(StrategicToolJudge, batch, tmp_path / "c.sqlite", model="gemini-test",
                            backend_options={"base_url": server.base_url})
        requests = server.requests
    assert [(v.keep, v.reason) for v in verdicts] == [(True, ""), (False, "not_strategic"), (True, "")]
    assert verdicts[1].detail == "tool_rationale 1 < 3: The call prints a constant."
    assert batch[0].meta["strategic_tool_judge"]["tool_rationale"] == 5  # scores kept for kept samples too
    assert batch[1].meta["strategic_tool_judge"]["justification"] == "The call prints a constant."
    assert batch[2].meta["strategic_tool_judge"]["judged"] is False
    assert len(requests) == 2 and all(":generateContent" in r["path"] and "gemini-test" in r["path"] for r in requests)
    body = requests[0]["body"]
    assert system_text(body) == load_rubric("strategic_tool_use").text
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert set(config["responseJsonSchema"]["properties"]) == {"visual_relevance", "reasoning_coherence",
                                                                 "tool_rationale", "justification"}
    assert request_images(body) == [png_bytes(1), png_bytes(2)]  # the question's image and the observation's
    text = request_text(body)
    assert "What is the tallest bar?" in text and "[tool call: python]" in text and "## Reference answer\n60" in text
    assert "You may call python." not in text  # the trajectory's system prompt is not what is judged


def test_rate_limit_and_server_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    with GeminiServer(answer=pointless_if_hello, retry_after=0.3) as server:
        server.faults.extend(["429", "500"])
        started = time.monotonic()
        stage, (verdict,) = judge(StrategicToolJudge, [trajectory("good", "print(1)")], tmp_path / "c.sqlite",
                                  backend_options={"base_url": server.base_url})
        elapsed = time.monotonic() - started
        assert len(server.requests) == 3
    assert verdict.keep and stage.runner.budget.requests == 3  # retries counted against max_requests too
    assert elapsed >= 0.3  # the 429's Retry-After was honoured


def test_persistent_garbage_is_judge_error_not_a_low_score(tmp_path: Path) -> None:
    with GeminiServer(answer=lambda body: "I think it is fine!") as server:
        _, (verdict,) = judge(StrategicToolJudge, [sample := trajectory("t", "print(1)")], tmp_path / "c.sqlite",
                              parse_retries=2, backend_options={"base_url": server.base_url})
        assert len(server.requests) == 3  # asked again twice
    assert (verdict.keep, verdict.reason) == (False, "judge_error")
    assert "3 answers were not a StrategicScores" in verdict.detail and "I think it is fine!" in verdict.detail
    assert "tool_rationale" not in sample.meta["strategic_tool_judge"]


def test_transient_errors_that_never_end_stop_the_batch_and_are_not_cached(tmp_path: Path) -> None:
    """Never a verdict: the batch raises (so it is not committed) once the answered request is cached."""
    with GeminiServer(answer=pointless_if_hello, retry_after=0.0) as server:
        server.faults.extend(["503"] * 3)
        stage = StrategicToolJudge(StrategicToolJudge.Options(backoff=0.01, max_retries=2, concurrency=1,
                                                              backend_options={"base_url": server.base_url}))
        with pytest.raises(TransientFailure, match=r"failed after 3 attempts: .*HTTP 503") as stopped:
            processed(stage, [trajectory("t", "print(1)"), trajectory("u", "print(2)")], tmp_path / "c.sqlite")
        assert "\n" not in str(stopped.value) and KEY not in str(stopped.value)
        assert len(server.requests) == 4  # the first row's 3 attempts, then the second row answered
        _, verdicts = judge(StrategicToolJudge, [trajectory("t", "print(1)"), trajectory("u", "print(2)")],
                            tmp_path / "c.sqlite", backend_options={"base_url": server.base_url})
        assert [v.keep for v in verdicts] == [True, True]
        assert len(server.requests) == 5  # only the unanswered row is asked again: the answered one was cached


def test_rubric_override_and_version_are_part_of_the_cache_key(tmp_path: Path) -> None:
    rubric = tmp_path / "mine.md"
    rubric.write_text("---\nname: mine\nversion: 1\n---\nBe strict.")
    with GeminiServer(answer=pointless_if_hello) as server:
        options = {"rubric": str(rubric), "backend_options": {"base_url": server.base_url}}
        judge(StrategicToolJudge, [trajectory("t", "print(1)")], tmp_path / "c.sqlite", **options)
        judge(StrategicToolJudge, [trajectory("t", "print(1)")], tmp_path / "c.sqlite", **options)
        assert len(server.requests) == 1 and system_text(server.requests[0]["body"]) == "Be strict."
        rubric.write_text("---\nname: mine\nversion: 2\n---\nBe strict.")
        judge(StrategicToolJudge, [trajectory("t", "print(1)")], tmp_path / "c.sqlite", **options)
        assert len(server.requests) == 2  # a new rubric version is asked anew


def test_unknown_dimension_in_thresholds_is_a_user_error(tmp_path: Path) -> None:
    from curate.errors import UserError

    with pytest.raises(UserError, match="min_scores names \\['relevance'\\]"):
        judge(StrategicToolJudge, [], tmp_path / "c.sqlite", min_scores={"relevance": 2})


def ambiguity_answer(body: dict[str, Any], index: int) -> str:
    question = body["messages"][-1]["content"]
    text = "".join(part.get("text", "") for part in question)
    vague = "What is the number?" in text
    return json.dumps({"clarity": 1 if vague else 5, "answer_consistency": 5,
                       "justification": "Three bars, three numbers." if vague else "One value."})


def rl_prompt(sample_id: str, question: str) -> Sample:
    return Sample(sample_id, "test", [Message("user", [ImagePart(0), TextPart(question)])],
                  [Image(png_bytes(4), "png")], "60")


def test_ambiguity_judge_on_an_openai_compatible_server(tmp_path: Path) -> None:
    batch = [rl_prompt("vague", "What is the number?"), rl_prompt("clear", "What is the value of bar B?")]
    with ChatServer(answer=ambiguity_answer) as server:
        _, verdicts = judge(AmbiguityJudge, batch, tmp_path / "c.sqlite", backend="openai", model="judge",
                            backend_options={"base_url": server.base_url})
        body = server.requests[0]
    assert [(v.keep, v.reason) for v in verdicts] == [(False, "ambiguous"), (True, "")]
    assert body["response_format"]["type"] == "json_schema"
    assert body["messages"][0] == {"role": "system", "content": load_rubric("ambiguity").text}
    parts = body["messages"][1]["content"]
    assert parts[1]["type"] == "image_url" and parts[-1]["text"] == "\n## Ground truth\n60"


def test_openai_server_without_json_schema_gets_the_schema_in_the_prompt(tmp_path: Path) -> None:
    class NoSchemaServer(ChatServer):
        def respond(self, body: dict, headers: dict) -> tuple[int, dict[str, str], bytes | None]:
            if "response_format" in body:
                self.requests.append(body)
                return 400, {"Content-Type": "application/json"}, b'{"error": "response_format is not supported"}'
            return super().respond(body, headers)

    with NoSchemaServer(answer=lambda body, i: "Sure! ```json\n" + ambiguity_answer(body, i) + "\n```") as server:
        _, verdicts = judge(AmbiguityJudge, [rl_prompt("a", "What is the number?"), rl_prompt("b", "Bar B?")],
                            tmp_path / "c.sqlite", backend="openai", model="judge", concurrency=1,
                            backend_options={"base_url": server.base_url})
        assert sum("response_format" in b for b in server.requests) == 1  # asked once, then remembered
        assert "JSON schema" in server.requests[-1]["messages"][0]["content"]
    assert [v.reason for v in verdicts] == ["ambiguous", ""]  # parsed out of prose and a code fence


def test_rate_limiter_spaces_requests_and_tokens() -> None:
    def waits(limiter: RateLimiter, sends: list[tuple[float, int]]) -> list[float]:
        """The wait before each send at its time (on the limiter's clock), each counted when it goes."""
        out = []
        for now, tokens in sends:
            out.append(limiter._wait(tokens, now))
            limiter._sent.append((now + out[-1], tokens))
        return out

    # 2 requests a 10 s window: the third, at t = 3, waits until the first (t = 1) leaves it, at t = 11.
    assert waits(RateLimiter(requests_per_minute=2, window=10), [(1, 1), (2, 1), (3, 1), (30, 1)]) == [0, 0, 8, 0]
    # 100 tokens a window: 60 + 30 fit, + 20 does not, until the 60 leaves; one request above the limit goes alone.
    assert waits(RateLimiter(tokens_per_minute=100, window=10), [(1, 60), (2, 30), (3, 20)]) == [0, 0, 8]
    assert waits(RateLimiter(tokens_per_minute=100, window=10), [(1, 500)]) == [0]

    async def elapsed(limiter: RateLimiter, sizes: list[int]) -> float:  # the real clock: the wait happens
        start = time.monotonic()
        for size in sizes:
            await limiter.acquire(size)
        return time.monotonic() - start

    assert asyncio.run(elapsed(RateLimiter(requests_per_minute=2, window=0.4), [1, 1, 1])) >= 0.35


def test_judge_verifier_decides_what_rules_cannot(tmp_path: Path) -> None:
    def verdict(body: dict[str, Any], index: int) -> str:
        text = body["messages"][-1]["content"][0]["text"]
        return json.dumps({"verdict": "CORRECT" if "Eiffel" in text.split("## Candidate answer")[1] else "INCORRECT"})

    with ChatServer(answer=verdict) as server:
        judge_verifier = JudgeVerifier(tmp_path / "c.sqlite", backend="openai", model="judge",
                                       backend_options={"base_url": server.base_url})
        verify = AnswerVerifier(judge=judge_verifier)
        assert verify("<answer>The Eiffel Tower</answer>", "Eiffel Tower").rule == "judge"
        assert verify("<answer>The Eiffel Tower</answer>", "Eiffel Tower").correct
        assert not verify("<answer>Big Ben</answer>", "Eiffel Tower").correct
        assert not verify("<answer>41</answer>", "42").correct  # a rule decided: no request
        judge_verifier.close()
        assert len(server.requests) == 2  # the repeated question came from the cache


# --- whole runs: budget, resume, cache, secrets ------------------------------------------------------


def sft_recipe(tmp_path: Path, rows: int, base_url: str, **judge_options: Any) -> Path:
    samples = [trajectory(f"t{i}", f"print('hello')  # {i}" if i % 3 == 0 else f"print({i})") for i in range(rows)]
    data = tmp_path / "in.jsonl"
    get_format("messages").write(samples, data)
    recipe = tmp_path / "judge.yaml"
    options = {"model": "gemini-test", "backoff": 0.01, "backend_options": {"base_url": base_url}, **judge_options}
    recipe.write_text(yaml.safe_dump({"input": {"paths": [str(data)]}, "stages": [{"strategic_tool_judge": options}],
                                      "output": {"kind": "sft"}, "batch_size": 4}))
    return recipe


def test_budget_stops_the_run_and_a_rerun_resumes_without_paying_twice(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clients = []
    monkeypatch.setattr(genai, "Client", lambda *args, **kwargs: clients.append(1) or GenaiClient(*args, **kwargs))
    with GeminiServer(answer=pointless_if_hello) as server:
        recipe = sft_recipe(tmp_path, 10, server.base_url, max_requests=6, concurrency=2)
        with pytest.raises(StageError, match="stage 'strategic_tool_judge' stopped: judge budget reached after 6 "
                                             "requests.*run the same command again to resume") as stopped:
            LocalExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
        assert isinstance(stopped.value.__cause__, BudgetExhausted) and stopped.value.one_line
        assert len(server.requests) == 6 and not (tmp_path / "run" / "manifest.json").exists()
        manifest = LocalExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite",
                                 progress=False).run()  # a new run's budget: 6 more requests are enough
        assert len(server.requests) == 10  # each trajectory paid for exactly once
        assert manifest["resumed"] == 1
        assert_accounting(tmp_path / "run")
        assert manifest["stages"][1]["reasons"] == {"not_strategic": 4}
        assert clients  # the counter sees the client the runs above made
        clients.clear()
        LocalExecutor(load_recipe(recipe), tmp_path / "again", cache_path=tmp_path / "c.sqlite", progress=False).run()
        assert len(server.requests) == 10  # a repeated run makes no request
        assert not clients  # and opens no client


def test_cli_missing_key_fails_before_work_and_the_key_never_reaches_disk(tmp_path: Path) -> None:
    with GeminiServer(answer=pointless_if_hello) as server:
        recipe = sft_recipe(tmp_path, 4, server.base_url)
        command = ["run", str(recipe), "-o", str(tmp_path / "run"), "--no-progress", "--cache", str(tmp_path / "c.sqlite")]
        missing = cli(*command, env={"GEMINI_API_KEY": None, "GOOGLE_API_KEY": None})
        assert missing.exit_code == 2 and missing.stderr.strip().count("\n") == 0
        assert "GEMINI_API_KEY" in missing.stderr and "GOOGLE_API_KEY" in missing.stderr and "--local" in missing.stderr
        assert not server.requests and not list((tmp_path / "run").rglob("*.parquet"))
        ran = cli(*command, env={"GEMINI_API_KEY": KEY, "GOOGLE_API_KEY": None})
        assert ran.exit_code == 0, ran.stderr
        assert all(r["headers"].get("x-goog-api-key") == KEY for r in server.requests)
    written = [p for p in [*(tmp_path / "run").rglob("*"), *tmp_path.glob("c.sqlite*")] if p.is_file()]
    assert written and not [p for p in written if KEY.encode() in p.read_bytes()]
    assert KEY not in ran.stdout + ran.stderr + missing.stderr


def test_local_backend_always_answers_in_the_schema(tmp_path: Path) -> None:
    batch = [trajectory("t", "print(image_1.size)")]
    _, (verdict,) = judge(StrategicToolJudge, batch, tmp_path / "c.sqlite", backend="transformers",
                          model="smollm2-135m", backend_options={"string_tokens": 8}, min_scores={
                              "visual_relevance": 1, "reasoning_coherence": 1, "tool_rationale": 1})
    scores = batch[0].meta["strategic_tool_judge"]
    assert verdict.keep and all(scores[d] in range(1, 6) for d in ("visual_relevance", "reasoning_coherence",
                                                                   "tool_rationale"))
    assert isinstance(scores["justification"], str)


def test_an_outage_stops_the_run_without_rejecting_and_the_same_command_then_judges_every_row(tmp_path: Path) -> None:
    """The strategic judge on its Gemini backend, the server down (503 to everything): the run stops with one line
    and commits nothing; once the server is back, the same command on the same -o judges all rows as a fault-free
    run does."""
    def outcome(run_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
        assert_accounting(run_dir)
        rejected = [(r["id"], r["reason"]) for r in pq.read_table(run_dir / "rejected").to_pylist()]
        return shard_ids(run_dir / "kept"), sorted(rejected)

    with GeminiServer(answer=pointless_if_hello) as server:
        recipe = sft_recipe(tmp_path, 8, server.base_url, max_retries=2)
        command = [sys.executable, "-m", "curate", "run", str(recipe), "-o", str(tmp_path / "run"), "--no-progress",
                   "--cache", str(tmp_path / "c.sqlite")]
        env = {**os.environ, "GEMINI_API_KEY": KEY}
        server.outage = 503
        down = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        assert down.returncode == 2, down.stderr
        (line,) = down.stderr.strip().splitlines()
        assert line.startswith("error: stage 'strategic_tool_judge' stopped: gemini gemini-test failed after 3 attempts")
        assert "HTTP 503" in line and "run the same command again to resume" in line and KEY not in line
        assert not list((tmp_path / "run").rglob("*.parquet")) and not (tmp_path / "run" / "manifest.json").exists()
        server.outage = None
        answered_before = len(server.requests)
        up = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        assert up.returncode == 0, up.stderr
        assert len(server.requests) - answered_before == 8  # every row judged once, now
        clean = [*command[:6], str(tmp_path / "clean"), "--no-progress", "--cache", str(tmp_path / "clean.sqlite")]
        assert subprocess.run(clean, capture_output=True, text=True, cwd=REPO, env=env, check=False).returncode == 0
    assert outcome(tmp_path / "run") == outcome(tmp_path / "clean")
    assert [reason for _, reason in outcome(tmp_path / "run")[1]] == ["not_strategic"] * 3
