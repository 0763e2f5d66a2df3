"""A local OpenAI-compatible chat-completions server for tests of the `openai` backend and the judges.

`ChatServer` answers `POST /v1/chat/completions` on 127.0.0.1 (a free port) from a daemon thread and
records every request. Each completion is `answer(body, choice_index)`; the default echoes the last user
text. Failures are scripted: each request consumes the next entry of `faults`, if any:
- an HTTP status ("429", "500", "400", ...): that status with a JSON error body; 429 sends `Retry-After`;
- "garbage": 200 with a body that is not JSON;
- "slow": sleep `slow_seconds`, then answer normally;
- "drop": close the connection without answering;
- "<status>+auth" (e.g. "503+auth"): that status, its error message echoing the request's Authorization header,
  as a careless proxy might.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Answer = Callable[[dict[str, Any], int], str]


def last_user_text(body: dict[str, Any], index: int = 0) -> str:
    """The text of the last user message, whether its content is a string or a list of parts."""
    content = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


class LocalServer:
    """A JSON-over-HTTP server on 127.0.0.1 (a free port), serving from a daemon thread while in a `with`.
    Subclasses answer in `handle(path, headers, raw_body) -> (status, extra headers, payload)`; a None
    payload drops the connection."""

    def __init__(self) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.app = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]

    def __enter__(self) -> Self:
        threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, str], bytes | None]:
        raise NotImplementedError

    def handle_get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes | None]:
        return 404, {}, b'{"error": {"code": 404, "message": "not found"}}'


class ChatServer(LocalServer):
    """`with ChatServer(answer=...) as server:` point a client at `server.base_url`."""

    def __init__(self, answer: Answer = last_user_text, max_n: int | None = None, slow_seconds: float = 1.0,
                 retry_after: float = 0.1, reverse_choices: bool = False) -> None:
        self.answer = answer
        self.max_n = max_n  # most choices per response, to play a server that ignores `n`
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.reverse_choices = reverse_choices  # list choices last index first
        self.requests: list[dict[str, Any]] = []  # JSON bodies, in arrival order
        self.headers: list[dict[str, str]] = []  # their headers, names lower-cased
        self.faults: deque[str] = deque()
        self._lock = threading.Lock()
        super().__init__()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, str], bytes | None]:
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {}, b'{"error": {"message": "not found"}}'
        return self.respond(json.loads(raw), headers)

    def respond(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes | None]:
        """Status, extra headers and payload for one request; a None payload drops the connection."""
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            fault = self.faults.popleft() if self.faults else None
        if fault == "drop":
            return 0, {}, None
        if fault == "garbage":
            return 200, {}, b"<html>upstream exploded</html>"
        if fault == "slow":
            time.sleep(self.slow_seconds)
        elif fault is not None:
            status = int(fault.removesuffix("+auth"))
            extra = {"Retry-After": str(self.retry_after)} if status == 429 else {}
            echoed = f" for {headers.get('authorization', '')}" if fault.endswith("+auth") else ""
            return status, extra, json.dumps({"error": {"message": f"scripted {status}{echoed}"}}).encode()
        return 200, {}, json.dumps(self.completion(body)).encode()

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat.completion object with min(n, max_n) choices."""
        count = min(body.get("n", 1), self.max_n or body.get("n", 1))
        choices = [{"index": i, "message": {"role": "assistant", "content": self.answer(body, i)},
                    "finish_reason": "stop"} for i in range(count)]
        if self.reverse_choices:
            choices.reverse()
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"), "choices": choices}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(*self.server.app.handle(self.path, self._lower_headers(), raw))  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._reply(*self.server.app.handle_get(self.path, self._lower_headers()))  # type: ignore[attr-defined]

    def _lower_headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _reply(self, status: int, extra: dict[str, str], payload: bytes | None) -> None:
        if payload is None:
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **extra}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        try:
            self.end_headers()
            self.wfile.write(payload)
        except ConnectionError:  # the client stopped waiting (a "slow" fault)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the server's `requests` instead of the access log."""
