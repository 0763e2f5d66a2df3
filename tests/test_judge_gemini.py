"""The `gemini` judge backend: the real `google.genai` client over HTTP against a local Gemini server."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import pytest
from curate_testkit.pictures import png_bytes
from curate_testkit.gemini_server import GeminiServer, request_images, request_text, system_text
from PIL import Image as PILImage
from pydantic import BaseModel

from curate.errors import UserError
from curate.generation import Prompt
from curate.retry import TransientError
from curate.sample import Image, ImagePart, Message, TextPart
from curate.judges.backend import JudgeReply, JudgeRequest, json_schema
from curate.judges.gemini import GeminiBackend

KEY = "test-key-123"
MODEL = "gemini-judge-test"


class Verdict(BaseModel):
    ok: bool
    reason: str


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), "red").save(buffer, format="JPEG")
    return buffer.getvalue()


PNG, JPEG = png_bytes(5), jpeg_bytes()
PROMPT = Prompt(
    (Message("system", [TextPart("Be strict.")]),
     Message("user", [TextPart("Question: what is shown?"), ImagePart(1)]),
     Message("assistant", [TextPart("A grid."), ImagePart(0), TextPart("Done.")])),
    (Image(JPEG, "jpg"), Image(PNG, "png")),
)
REQUEST = JudgeRequest(system="RUBRIC: judge the answer.", prompt=PROMPT, schema=Verdict, temperature=0.3,
                       max_tokens=77)


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake key, and none of the variables that would point the client elsewhere."""
    for name in ("GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE",
                 "GOOGLE_GENAI_API_VERSION", "GOOGLE_GENAI_HTTP_CLIENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)


def complete(base_url: str, request: JudgeRequest = REQUEST, **options: Any) -> JudgeReply:
    """One `complete` call through a fresh backend, closed afterwards."""
    async def run() -> JudgeReply:
        backend = GeminiBackend(MODEL, base_url=base_url, **options)
        try:
            return await backend.complete(request)
        finally:
            await backend.aclose()
    return asyncio.run(run())


def failure(server: GeminiServer, fault: str, **options: Any) -> Exception:
    server.faults.append(fault)
    with pytest.raises(Exception) as caught:
        complete(server.base_url, **options)
    return caught.value


def test_request_carries_rubric_schema_config_and_parts_in_order() -> None:
    with GeminiServer() as server:
        complete(server.base_url)
    (request,) = server.requests
    assert request["path"] == f"/v1/models/{MODEL}:generateContent"
    assert request["headers"]["x-goog-api-key"] == KEY
    body = request["body"]
    assert system_text(body) == "Be strict.\n\nRUBRIC: judge the answer."
    assert body["generationConfig"] == {"responseMimeType": "application/json", "responseJsonSchema": json_schema(Verdict),
                                        "temperature": 0.3, "maxOutputTokens": 77}
    (content,) = body["contents"]
    assert content["role"] == "user"
    kinds = ["text" if "text" in part else part["inlineData"].get("mimeType", part["inlineData"].get("mime_type"))
             for part in content["parts"]]
    assert kinds == ["text", "image/png", "text", "image/jpeg", "text"]
    assert request_text(body) == "Question: what is shown?A grid.Done."
    assert request_images(body) == [PNG, JPEG]


def test_reply_text_and_token_counts() -> None:
    answer = '{"ok": false, "reason": "the grid is wrong"}'
    with GeminiServer(answer=lambda body: answer) as server:
        reply = complete(server.base_url)
    body = server.requests[0]["body"]
    prompt_tokens = (len(request_text(body)) + len(system_text(body))) // 4 + 2 * 258
    assert reply == JudgeReply(text=answer, input_tokens=prompt_tokens, output_tokens=len(answer) // 4)
    assert Verdict.model_validate_json(reply.text) == Verdict(ok=False, reason="the grid is wrong")


def test_thinking_tokens_count_as_output() -> None:
    class ThinkingServer(GeminiServer):
        @staticmethod
        def response(body: dict[str, Any], text: str) -> dict[str, Any]:
            reply = GeminiServer.response(body, text)
            reply["usageMetadata"]["thoughtsTokenCount"] = 100
            return reply

    with ThinkingServer() as server:
        assert complete(server.base_url).output_tokens == len('{"ok": true}') // 4 + 100


def test_garbage_answer_is_returned_for_the_runner_to_reject() -> None:
    with GeminiServer() as server:
        server.faults.append("garbage")
        reply = complete(server.base_url)
    with pytest.raises(ValueError):
        json.loads(reply.text)


def test_429_is_retryable_with_retry_after_header() -> None:
    with GeminiServer(retry_after=2.5) as server:
        error = failure(server, "429")
    assert isinstance(error, TransientError) and error.retry_after == 2.5
    assert "429" in str(error) and "scripted 429" in str(error) and "\n" not in str(error)
    assert len(server.requests) == 1  # the client's own retries are off


def test_429_without_header_takes_the_retry_info_delay() -> None:
    with GeminiServer(retry_after=7, retry_after_header=False) as server:
        error = failure(server, "429")
    assert isinstance(error, TransientError) and error.retry_after == 7.0
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", ["500", "503"])
def test_server_errors_are_retryable(status: str) -> None:
    with GeminiServer() as server:
        error = failure(server, status)
    assert isinstance(error, TransientError) and error.retry_after is None and status in str(error)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", ["400", "403", "404"])
def test_other_client_errors_are_fatal(status: str) -> None:
    with GeminiServer() as server:
        error = failure(server, status)
    assert type(error) is RuntimeError and status in str(error) and "\n" not in str(error)
    assert len(server.requests) == 1


def test_timeout_and_unreadable_body_are_retryable() -> None:
    with GeminiServer(slow_seconds=1.0) as server:
        assert isinstance(failure(server, "slow", timeout=0.3), TransientError)
        assert isinstance(failure(server, "badjson"), TransientError)
    assert len(server.requests) == 2


def test_refused_connection_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError):
        complete(f"http://127.0.0.1:{port}")


def test_one_http_request_per_call_across_faults() -> None:
    faults = ["429", "500", "400", "garbage", "badjson", None]

    async def run(backend: GeminiBackend) -> None:
        for _ in faults:
            try:
                await backend.complete(REQUEST)
            except (TransientError, RuntimeError):
                pass
        await backend.aclose()

    with GeminiServer() as server:
        server.faults.extend(f for f in faults if f)
        asyncio.run(run(GeminiBackend(MODEL, base_url=server.base_url)))
    assert len(server.requests) == len(faults)


def test_missing_key_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(UserError) as caught:
        GeminiBackend(MODEL)
    message = str(caught.value)
    assert "GEMINI_API_KEY" in message and "GOOGLE_API_KEY" in message and "--local" in message
    assert "\n" not in message


def test_google_api_key_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY")
    monkeypatch.setenv("GOOGLE_API_KEY", "google-key-456")
    with GeminiServer() as server:
        complete(server.base_url)
    assert server.requests[0]["headers"]["x-goog-api-key"] == "google-key-456"


def test_api_key_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="JUDGE_KEY"):
        GeminiBackend(MODEL, api_key_env="JUDGE_KEY")
    monkeypatch.setenv("JUDGE_KEY", "judge-key-789")
    with GeminiServer() as server:
        complete(server.base_url, api_key_env="JUDGE_KEY")
    assert server.requests[0]["headers"]["x-goog-api-key"] == "judge-key-789"


def test_key_never_appears_in_errors_or_repr() -> None:
    with GeminiServer(slow_seconds=1.0) as server:
        errors = [failure(server, fault) for fault in ("429", "500", "400", "badjson")]
        errors.append(failure(server, "slow", timeout=0.3))
        backend = GeminiBackend(MODEL, base_url=server.base_url)
        asyncio.run(backend.aclose())
    assert all(KEY not in str(error) and KEY not in repr(error) for error in errors)
    assert KEY not in repr(backend) and MODEL in repr(backend)
    assert all(request["headers"]["x-goog-api-key"] == KEY for request in server.requests)
