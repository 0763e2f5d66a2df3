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

import pytest
import yaml
from conftest import REPO, assert_accounting, png_bytes, processed
from gemini_server import GeminiServer, request_images, request_text, system_text
from servers import ChatServer

from curate.executor import LocalExecutor
from curate.formats import get_format
from curate.recipe import load_recipe
from curate.sample import Image, ImagePart, Message, Sample, TextPart, ToolCall
from curate.verify import AnswerVerifier
from judges.ambiguity import AmbiguityJudge
from judges.limits import BudgetExhausted, RateLimiter
from judges.stage import load_rubric
from judges.strategic_tool import StrategicToolJudge
from judges.verifier import JudgeVerifier

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
    assert verdict.keep and stage.runner.requests == 3
    assert elapsed >= 0.3  # the 429's Retry-After was honoured


def test_persistent_garbage_is_judge_error_not_a_low_score(tmp_path: Path) -> None:
    with GeminiServer(answer=lambda body: "I think it is fine!") as server:
        _, (verdict,) = judge(StrategicToolJudge, [sample := trajectory("t", "print(1)")], tmp_path / "c.sqlite",
                              parse_retries=2, backend_options={"base_url": server.base_url})
        assert len(server.requests) == 3  # asked again twice
    assert (verdict.keep, verdict.reason) == (False, "judge_error")
    assert "3 answers were not a StrategicScores" in verdict.detail and "I think it is fine!" in verdict.detail
    assert "tool_rationale" not in sample.meta["strategic_tool_judge"]


def test_transient_errors_that_never_end_are_judge_error_and_not_cached(tmp_path: Path) -> None:
    with GeminiServer(answer=pointless_if_hello, retry_after=0.0) as server:
        server.faults.extend(["503"] * 3)
        _, (verdict,) = judge(StrategicToolJudge, [trajectory("t", "print(1)")], tmp_path / "c.sqlite", max_retries=2,
                              backend_options={"base_url": server.base_url})
        assert verdict.reason == "judge_error" and "gave up after 3 attempts" in verdict.detail
        _, (again,) = judge(StrategicToolJudge, [trajectory("t", "print(1)")], tmp_path / "c.sqlite",
                            backend_options={"base_url": server.base_url})
        assert again.keep and len(server.requests) == 4  # retried on the next run: nothing was paid before


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
    async def times(limiter: RateLimiter, sizes: list[int]) -> list[float]:
        start, out = time.monotonic(), []
        for size in sizes:
            await limiter.acquire(size)
            out.append(time.monotonic() - start)
        return out

    by_requests = asyncio.run(times(RateLimiter(requests_per_minute=2, window=0.4), [1, 1, 1]))
    assert by_requests[1] < 0.2 and by_requests[2] >= 0.35  # the third waits for the window
    by_tokens = asyncio.run(times(RateLimiter(tokens_per_minute=100, window=0.4), [60, 30, 20]))
    assert by_tokens[1] < 0.2 and by_tokens[2] >= 0.35  # 60 + 30 + 20 > 100: the third waits for the window


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


def test_budget_stops_the_run_and_a_rerun_resumes_without_paying_twice(tmp_path: Path) -> None:
    with GeminiServer(answer=pointless_if_hello) as server:
        recipe = sft_recipe(tmp_path, 10, server.base_url, max_requests=6, concurrency=2)
        with pytest.raises(BudgetExhausted, match="judge budget reached after 6 requests"):
            LocalExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False).run()
        assert len(server.requests) == 6 and not (tmp_path / "run" / "manifest.json").exists()
        manifest = LocalExecutor(load_recipe(recipe), tmp_path / "run", cache_path=tmp_path / "c.sqlite",
                                 progress=False).run()  # a new run's budget: 6 more requests are enough
        assert len(server.requests) == 10  # each trajectory paid for exactly once
        assert manifest["resumed"] == 1
        assert_accounting(tmp_path / "run")
        assert manifest["stages"][1]["reasons"] == {"not_strategic": 4}
        LocalExecutor(load_recipe(recipe), tmp_path / "again", cache_path=tmp_path / "c.sqlite", progress=False).run()
        assert len(server.requests) == 10  # a repeated run makes no request


def test_cli_missing_key_fails_before_work_and_the_key_never_reaches_disk(tmp_path: Path) -> None:
    with GeminiServer(answer=pointless_if_hello) as server:
        recipe = sft_recipe(tmp_path, 4, server.base_url)
        env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
        command = [sys.executable, "-m", "curate", "run", str(recipe), "-o", str(tmp_path / "run"), "--no-progress",
                   "--cache", str(tmp_path / "c.sqlite")]
        missing = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
        assert "GEMINI_API_KEY" in missing.stderr and "GOOGLE_API_KEY" in missing.stderr and "--local" in missing.stderr
        assert not server.requests and not list((tmp_path / "run").rglob("*.parquet"))
        ran = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**env, "GEMINI_API_KEY": KEY},
                             check=False)
        assert ran.returncode == 0, ran.stderr
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
