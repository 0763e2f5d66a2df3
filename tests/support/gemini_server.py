"""A local Gemini API server for tests and benchmarks of the `gemini` judge backend.

`GeminiServer` answers `POST /{version}/models/{model}:generateContent` on 127.0.0.1 (a free port) from a
daemon thread, as `google.genai.Client(http_options=HttpOptions(base_url=server.base_url))` calls it, and
records every request as `{path, headers, body}`. The candidate's text is `answer(body)`; every request
sleeps `latency` seconds first. Failures are scripted: each request consumes the next entry of `faults`:
- an HTTP status ("429", "500", "400", ...): that status with a Google-style error body; 429 also says
  when to retry, in a `Retry-After` header (unless `retry_after_header` is off) and as `google.rpc.RetryInfo`;
- "garbage": 200 with a well-formed response whose candidate text is not JSON (the model answered garbage);
- "badjson": 200 with a body that is not JSON at all;
- "slow": sleep `slow_seconds`, then answer normally;
- "<status>+key" (e.g. "503+key"): that status, its error message echoing the request's API key.
While `outage` holds a status, every request gets it (a fault-free server again once it is None).
`GeminiBatchServer` adds the Batch API and the file upload and download that `client.batches` and
`client.files` use (see its docstring).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from curate_testkit.servers import LocalServer

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
        self.outage: int | None = None  # every request answered with this status while set
        self.answered: Counter[str] = Counter()  # digest of the request body -> how often it got a real answer
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
            if self.outage is not None:
                fault = str(self.outage)
        time.sleep(self.latency)
        if fault == "badjson":
            return 200, {}, b"<html>upstream exploded</html>"
        if fault == "slow":
            time.sleep(self.slow_seconds)
        elif fault is not None and fault.endswith("+key"):
            return self.error(int(fault.removesuffix("+key")), f" for key {headers.get('x-goog-api-key', '')}")
        elif fault not in (None, "garbage"):
            return self.error(int(fault))
        text = "I think it is fine, really." if fault == "garbage" else self.answer(body)
        with self._lock:
            self.answered[hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()] += 1
        return 200, {}, json.dumps(self.response(body, text)).encode()

    def error(self, status: int, echoed: str = "") -> tuple[int, dict[str, str], bytes]:
        """A Google-style error response; a 429 says when to retry."""
        error: dict[str, Any] = {"code": status, "message": f"scripted {status}{echoed}",
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


BATCH_PATH = re.compile(r"^/[^/]+/(models/[^/:]+):batchGenerateContent$")
JOB_PATH = re.compile(r"^/[^/]+/batches/([^/:]+)$")
CANCEL_PATH = re.compile(r"^/[^/]+/batches/([^/:]+):cancel$")
UPLOAD_PATH = re.compile(r"^/upload/[^/]+/files$")
DOWNLOAD_PATH = re.compile(r"^/[^/]+/files/([^/:]+):download$")
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class GeminiBatchServer(GeminiServer):
    """The Gemini API with its Batch API, as `client.batches` and `client.files` call them:
    - `POST /{v}/models/{m}:batchGenerateContent` creates `batches/{id}` from inline requests (`metadata.key`
      names each) or an uploaded JSONL file (`{"key", "request"}` lines);
    - `GET /{v}/batches/{id}` answers the job as an operation: PENDING when created, RUNNING for `running_polls`
      polls (for ever while `hold` is set), then its terminal state: the next entry of `job_outcomes` (succeeded,
      failed, cancelled, expired; succeeded when empty). A succeeded job's results are inline when its requests
      were, else a `responsesFile` to download;
    - `GET /{v}/batches` lists the jobs; `POST /{v}/batches/{id}:cancel` cancels one;
    - `POST /upload/{v}/files`: the resumable upload protocol (start, then upload and finalize);
      `GET /{v}/files/{id}:download?alt=media`: a results file.
    `create_faults`: "503-after-create" makes the next job and answers 503, as a create that timed out would.
    Per request: a key in `request_errors` gets an error status instead of a response, one in `missing` gets
    nothing at all (each once). `submissions` counts how often each key was submitted, over every job."""

    def __init__(self, *args: Any, running_polls: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running_polls = running_polls
        self.hold = False
        self.job_outcomes: deque[str] = deque()
        self.create_faults: deque[str] = deque()  # "503-after-create": make the job, answer 503
        self.request_errors: set[str] = set()
        self.missing: set[str] = set()
        self.submissions: Counter[str] = Counter()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.polls = 0
        self._uploads: dict[str, bytearray] = {}
        self._ids = itertools.count(1)

    # --- routing -----------------------------------------------------------------------------------------

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, str], bytes | None]:
        route, _, query = path.partition("?")
        if match := BATCH_PATH.match(route):
            return self._create(match.group(1), json.loads(raw)["batch"])
        if match := CANCEL_PATH.match(route):
            return self._cancel(match.group(1))
        if UPLOAD_PATH.match(route):
            return self._upload(headers, parse_qs(query), raw)
        return super().handle(path, headers, raw)

    def handle_get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes | None]:
        route = path.partition("?")[0]
        if match := JOB_PATH.match(route):
            return self._get(match.group(1))
        if route.rstrip("/").endswith("/batches"):
            with self._lock:
                return 200, {}, json.dumps({"operations": [self._operation(job) for job in self.jobs.values()]}).encode()
        if (match := DOWNLOAD_PATH.match(route)) and f"files/{match.group(1)}" in self.files:
            return 200, {"Content-Type": "application/octet-stream"}, self.files[f"files/{match.group(1)}"]
        return self.error(404)

    # --- jobs ----------------------------------------------------------------------------------------------

    def _create(self, model: str, batch: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        source = batch["inputConfig"]
        if "fileName" in source:
            lines = [json.loads(line) for line in self.files[source["fileName"]].splitlines() if line.strip()]
            entries = [(line["key"], line["request"]) for line in lines]
        else:
            entries = [(item["metadata"]["key"], item["request"]) for item in source["requests"]["requests"]]
        with self._lock:
            self.submissions.update(key for key, _ in entries)
            job = {"id": f"job{next(self._ids)}", "model": model, "display_name": batch.get("displayName", ""),
                   "entries": entries, "inline": "fileName" not in source, "state": "pending", "polls": 0, "output": None}
            self.jobs[job["id"]] = job
            if self.create_faults and self.create_faults.popleft() == "503-after-create":
                return self.error(503)  # the job exists, the client does not know
            return 200, {}, json.dumps(self._operation(job)).encode()

    def _get(self, job_id: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return self.error(404)
            self.polls += 1
            if job["state"] not in TERMINAL and not self.hold:
                job["polls"] += 1
                job["state"] = "running" if job["polls"] <= self.running_polls else self._finish(job)
            return 200, {}, json.dumps(self._operation(job)).encode()

    def _cancel(self, job_id: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            if job_id not in self.jobs:
                return self.error(404)
            self.jobs[job_id]["state"] = "cancelled"
        return 200, {}, b"{}"

    def _finish(self, job: dict[str, Any]) -> str:
        """The job's terminal state; a succeeded job gets its results."""
        outcome = self.job_outcomes.popleft() if self.job_outcomes else "succeeded"
        if outcome != "succeeded":
            return outcome
        results = []
        for key, request in job["entries"]:
            if key in self.missing:
                self.missing.discard(key)
                continue
            if key in self.request_errors:
                self.request_errors.discard(key)
                results.append({"key": key, "error": {"code": 500, "message": "scripted per-request error"}})
            else:
                results.append({"key": key, "response": self.response(request, self.answer(request))})
        if job["inline"]:
            job["output"] = {"inlinedResponses": {"inlinedResponses": [
                {**{k: v for k, v in r.items() if k != "key"}, "metadata": {"key": r["key"]}} for r in results]}}
        else:
            name = f"files/results-{job['id']}"
            self.files[name] = "".join(json.dumps(r) + "\n" for r in results).encode()
            job["output"] = {"responsesFile": name}
        return "succeeded"

    def _operation(self, job: dict[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": job["model"], "displayName": job["display_name"], "state": f"BATCH_STATE_{job['state'].upper()}",
            "createTime": "2026-01-01T00:00:00Z"}
        if job["output"] is not None:
            metadata["output"] = job["output"]
        return {"name": f"batches/{job['id']}", "metadata": metadata, "done": job["state"] in TERMINAL}

    # --- files ---------------------------------------------------------------------------------------------

    def _upload(self, headers: dict[str, str], query: dict[str, list[str]],
                raw: bytes) -> tuple[int, dict[str, str], bytes]:
        command = headers.get("x-goog-upload-command", "")
        if command == "start":
            upload_id = f"up{next(self._ids)}"
            self._uploads[upload_id] = bytearray()
            url = f"{self.base_url}/upload/v1beta/files?upload_id={upload_id}"
            return 200, {"x-goog-upload-url": url, "x-goog-upload-status": "active"}, b"{}"
        upload_id = query["upload_id"][0]
        self._uploads[upload_id] += raw
        if "finalize" not in command:
            return 200, {"x-goog-upload-status": "active"}, b""
        name = f"files/{upload_id}"
        self.files[name] = bytes(self._uploads.pop(upload_id))
        file = {"name": name, "mimeType": "application/jsonl", "sizeBytes": str(len(self.files[name])), "state": "ACTIVE"}
        return 200, {"x-goog-upload-status": "final"}, json.dumps({"file": file}).encode()
