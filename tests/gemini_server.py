"""A local Gemini API server for tests and benchmarks of the `gemini` judge backend.

`GeminiServer` answers `POST /{version}/models/{model}:generateContent` on 127.0.0.1 (a free port) from a
daemon thread, as `google.genai.Client(http_options=HttpOptions(base_url=server.base_url))` calls it, and
records every request as `{path, headers, body}`. The candidate's text is `answer(body)`; every request
sleeps `latency` seconds first. Failures are scripted: each request consumes the next entry of `faults`:
- an HTTP status ("429", "500", "400", ...): that status with a Google-style error body; 429 also says
  when to retry, in a `Retry-After` header (unless `retry_after_header` is off) and as `google.rpc.RetryInfo`;
- "garbage": 200 with a well-formed response whose candidate text is not JSON (the model answered garbage);
- "badjson": 200 with a body that is not JSON at all;
- "slow": sleep `slow_seconds`, then answer normally.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from servers import LocalServer

Answer = Callable[[dict[str, Any]], str]
PATH = re.compile(r"^/[^/]+/models/[^/:]+:generateContent$")
STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE"}
IMAGE_TOKENS = 258  # what Gemini counts for one small inline image


def _parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [part for content in body.get("contents", []) for part in content.get("parts", [])]


def request_text(body: dict[str, Any]) -> str:
    """All text parts of the request's contents, concatenated in order."""
    return "".join(part["text"] for part in _parts(body) if "text" in part)


def request_images(body: dict[str, Any]) -> list[bytes]:
    """The decoded bytes of every inline image of the request's contents, in order.

    The client sends URL-safe base64 without padding; the API takes either alphabet, so this does too."""
    def decode(data: str) -> bytes:
        return base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_") + "=" * (-len(data) % 4))
    return [decode(part["inlineData"]["data"]) for part in _parts(body) if "inlineData" in part]


def system_text(body: dict[str, Any]) -> str:
    """The system instruction's text."""
    return "".join(part.get("text", "") for part in body.get("systemInstruction", {}).get("parts", []))


class GeminiServer(LocalServer):
    """`with GeminiServer(answer=...) as server:` point a client at `server.base_url`."""

    def __init__(self, answer: Answer = lambda body: '{"ok": true}', latency: float = 0.0, slow_seconds: float = 1.0,
                 retry_after: float = 0.1, retry_after_header: bool = True) -> None:
        self.answer = answer
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.retry_after_header = retry_after_header
        self.requests: list[dict[str, Any]] = []  # {"path", "headers" (names lower-cased), "body"}, in arrival order
        self.faults: deque[str] = deque()
        self._lock = threading.Lock()
        super().__init__()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, str], bytes | None]:
        if not PATH.match(path.split("?", 1)[0]):
            return self.error(404)
        return self.respond(path, headers, json.loads(raw))

    def respond(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """Status, extra headers and payload for one request."""
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            fault = self.faults.popleft() if self.faults else None
        time.sleep(self.latency)
        if fault == "badjson":
            return 200, {}, b"<html>upstream exploded</html>"
        if fault == "slow":
            time.sleep(self.slow_seconds)
        elif fault not in (None, "garbage"):
            return self.error(int(fault))
        text = "I think it is fine, really." if fault == "garbage" else self.answer(body)
        return 200, {}, json.dumps(self.response(body, text)).encode()

    def error(self, status: int) -> tuple[int, dict[str, str], bytes]:
        """A Google-style error response; a 429 says when to retry."""
        error: dict[str, Any] = {"code": status, "message": f"scripted {status}",
                                 "status": STATUS_NAMES.get(status, HTTPStatus(status).phrase.upper())}
        headers = {}
        if status == 429:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{self.retry_after}s"}]
            if self.retry_after_header:
                headers["Retry-After"] = str(self.retry_after)
        return status, headers, json.dumps({"error": error}).encode()

    @staticmethod
    def response(body: dict[str, Any], text: str) -> dict[str, Any]:
        """A GenerateContentResponse with one candidate and token counts estimated from the request."""
        prompt_tokens = (len(request_text(body)) + len(system_text(body))) // 4 + IMAGE_TOKENS * len(request_images(body))
        usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": len(text) // 4,
                 "totalTokenCount": prompt_tokens + len(text) // 4}
        candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "test"}
