"""What every judge backend implements: one structured request in, one reply out, a single attempt.

Backends only talk to their model and classify failures (`curate.retry.TransientError` for what a retry
may fix); retries, rate limits, the budget, parsing and
the cache belong to `curate.judges.runner.JudgeRunner`, so each backend stays a thin adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from pydantic import BaseModel

from curate.generation import Prompt


@dataclass(frozen=True)
class JudgeRequest:
    system: str  # the rubric, sent as the system instruction
    prompt: Prompt  # what is judged: text and images
    schema: type[BaseModel]  # the verdict's shape, sent as the response schema where the backend supports one
    temperature: float = 0.0
    max_tokens: int = 1024


@dataclass(frozen=True)
class JudgeReply:
    text: str  # the model's answer, expected to be JSON of `schema`
    input_tokens: int
    output_tokens: int


class JudgeBackend(Protocol):
    name: str  # backend name, part of the cache key
    model: str
    settings: dict[str, Any]  # backend options that change answers (part of the cache key too)

    async def complete(self, request: JudgeRequest) -> JudgeReply:
        """One attempt. Raises TransientError for transient failures; anything else is fatal."""
        ...

    async def aclose(self) -> None: ...


@cache
def json_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The pydantic model as plain JSON schema, without titles (some servers reject unknown keys). Cached:
    pydantic builds it anew on every call, and every request's cache key needs it. Do not mutate it."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(schema.model_json_schema())


class BatchBackend(JudgeBackend, Protocol):
    """A backend with a batch API (`mode: batch`): jobs of many requests, each named by its cache key,
    answered later at a lower price. Errors where retrying may help are TransientError, as online."""

    def submit_batch(self, display_name: str, entries: list[tuple[str, JudgeRequest]]) -> str:
        """Create a job of (key, request) entries under `display_name`; the job's name."""
        ...

    def find_batch(self, display_name: str) -> str | None:
        """The job created under `display_name`, if any."""
        ...

    def batch_state(self, job: str) -> str:
        """pending, running, succeeded, failed, cancelled or expired."""
        ...

    def batch_results(self, job: str) -> dict[str, JudgeReply | str]:
        """A succeeded job's outcome per key: the reply, or the request's error."""
        ...
