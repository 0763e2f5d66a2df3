"""The one transient-failure policy (`curate.retry`) and the one OpenAI-compatible client, through the real clients
against local servers: backoff that honours Retry-After, a failure that persists stops instead of becoming a
verdict, and the API key masked in every error of every backend."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path

import pytest
from conftest import processed
from curate_testkit.gemini_server import GeminiServer
from curate_testkit.servers import ChatServer

from curate.generation import Prompt, SamplingParams
from curate.generation.openai import ChatClient, ChatRejected, OpenAIGenerator
from curate.retry import RetryPolicy, TransientError, TransientFailure, aretry, retry, retry_after_seconds
from curate.sample import Message, TextPart
from curate.judges.strategic_tool import StrategicToolJudge
from curate.judges.verifier import JudgeVerifier

SECRET = "sk-do-not-leak-7788"


def prompt(text: str) -> Prompt:
    return Prompt((Message("user", [TextPart(text)]),))


def test_retry_waits_retry_after_else_backoff_and_stops_with_what_failed() -> None:
    waits: list[float] = []
    outcomes = iter([TransientError("HTTP 429", retry_after=7.0), TransientError("HTTP 503"),
                     TransientError("HTTP 503")])

    def attempt() -> str:
        raise next(outcomes)

    with pytest.raises(TransientFailure, match=r"^POST x failed after 3 attempts: HTTP 503$"):
        retry(attempt, RetryPolicy(max_retries=2, backoff=0.5), "POST x", sleep=waits.append)
    assert 7.0 <= waits[0] <= 7.5  # the server's Retry-After, plus jitter up to `backoff`
    assert 1.0 <= waits[1] <= 1.5  # no Retry-After: backoff doubled for the second retry, plus jitter


def test_backoff_is_capped_and_async_retry_returns_the_first_success() -> None:
    assert RetryPolicy(backoff=1.0, max_backoff=4.0).delay(10) <= 5.0
    calls: list[int] = []

    async def attempt() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("HTTP 500")
        return 42

    assert asyncio.run(aretry(attempt, RetryPolicy(max_retries=5, backoff=0.0), "x")) == 42
    assert len(calls) == 3


def test_retry_after_reads_seconds_google_delays_and_http_dates() -> None:
    assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds("7s") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (retry_after_seconds(later) or 0) <= 31


@pytest.mark.parametrize("fault", ["400+auth", "503+auth"])
def test_the_openai_client_masks_the_key_in_every_error_of_the_generator_and_the_judge(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fault: str) -> None:
    monkeypatch.setenv("CURATE_TEST_KEY", SECRET)
    with ChatServer() as server:
        generator = OpenAIGenerator("m", base_url=server.base_url, api_key_env="CURATE_TEST_KEY", max_retries=0,
                                    backoff=0.0)
        server.faults.append(fault)
        with pytest.raises((ChatRejected, TransientFailure)) as from_generator:
            generator.generate([prompt("q")], 1, SamplingParams())
        generator.close()
        stage = StrategicToolJudge(StrategicToolJudge.Options(
            backend="openai", model="m", max_retries=0, backoff=0.0,
            backend_options={"base_url": server.base_url, "api_key_env": "CURATE_TEST_KEY"}))
        server.faults.append(fault)
        from test_judges import trajectory
        with pytest.raises((ChatRejected, TransientFailure)) as from_judge:
            processed(stage, [trajectory("t", "print(1)")], tmp_path / "c.sqlite")
        assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.headers)  # the key was sent
    for error in (from_generator.value, from_judge.value):
        assert SECRET not in str(error) and SECRET not in repr(error) and "***" in str(error)


def test_the_chat_client_classifies_status_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATE_TEST_KEY", SECRET)
    with ChatServer(retry_after=3.0) as server:
        client = ChatClient(server.base_url, "CURATE_TEST_KEY")
        server.faults.extend(["429", "502", "garbage", "404"])
        with pytest.raises(TransientError) as limited:
            client.post({"model": "m", "messages": [{"role": "user", "content": "q"}]})
        assert limited.value.retry_after == 3.0
        for expected in (TransientError, TransientError, ChatRejected):
            with pytest.raises(expected):
                client.post({"model": "m", "messages": [{"role": "user", "content": "q"}]})
        assert client.post({"model": "m", "messages": [{"role": "user", "content": "q"}]})["choices"]
        client.close()
    assert SECRET not in repr(client)


def test_gemini_masks_the_key_a_server_echoes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    from test_judges import trajectory
    with GeminiServer() as server:
        server.faults.extend(["503+key", "400+key"])
        for _ in range(2):
            stage = StrategicToolJudge(StrategicToolJudge.Options(
                model="g", max_retries=0, backoff=0.0, backend_options={"base_url": server.base_url}))
            with pytest.raises(Exception) as stopped:
                processed(stage, [trajectory("t", "print(1)")], tmp_path / "c.sqlite")
            assert SECRET not in str(stopped.value) and "***" in str(stopped.value)


def test_the_trainer_judge_reward_stops_on_an_outage_instead_of_scoring_wrong(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A reward of 0 for an answer the judge never saw would teach the policy wrong: the training stops
    (its checkpoints resume) instead."""
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    with GeminiServer(answer=lambda body: '{"verdict": "CORRECT"}') as server:
        server.outage = 503
        verifier = JudgeVerifier(tmp_path / "c.sqlite", model="g", max_retries=1, backoff=0.0,
                                 backend_options={"base_url": server.base_url})
        with pytest.raises(TransientFailure, match="failed after 2 attempts"):
            verifier("What is 2+2?", "four", "4")
        server.outage = None
        assert verifier("What is 2+2?", "four", "4") is True
        verifier.close()
