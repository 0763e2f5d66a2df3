"""Runs judge requests through a backend: cache first, then bounded concurrency, rate limits, budget,
retries with backoff, and parsing into the verdict schema.

Outcomes per request:
- a parsed verdict (an instance of the request's schema), from the cache or the model;
- a `JudgeFailure` (the stage's `judge_error`): answers were received and none is the schema after
  `parse_retries` extra attempts; it quotes them, and it is cached, since they were paid for and would
  come back the same.
Transient errors that outlast the retry policy (`curate.retry`) are never an outcome: `run` raises
`TransientFailure` once the requests in flight have finished and been cached, so the batch is not
committed and a rerun pays only for what is missing. A budget stop raises `BudgetExhausted` the same way.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from curate.cache import Cache, cache_key
from curate.retry import RetryPolicy, aretry
from curate.judges.backend import JudgeBackend, JudgeReply, JudgeRequest, json_schema
from curate.judges.limits import Budget, RateLimiter


@dataclass(frozen=True)
class JudgeFailure:
    message: str


class JudgeRunner:
    def __init__(self, backend: JudgeBackend, cache: Cache, rubric_id: str, concurrency: int = 8,
                 limiter: RateLimiter | None = None, budget: Budget | None = None,
                 retry: RetryPolicy = RetryPolicy(), parse_retries: int = 2) -> None:
        self.backend = backend
        self.cache = cache
        self.rubric_id = rubric_id  # name@version and digest of the rubric text: part of every cache key
        self.concurrency = concurrency
        self.limiter = limiter or RateLimiter()
        self.budget = budget or Budget()
        self.retry = retry  # transient errors (429, 5xx, timeouts)
        self.parse_retries = parse_retries  # answers that are not the schema
        # One loop for the runner's life: async clients keep connections bound to the loop that opened them.
        self._loop = asyncio.new_event_loop()

    def run(self, requests: list[JudgeRequest]) -> list[BaseModel | JudgeFailure]:
        return self._loop.run_until_complete(self._run_all(requests))

    def close(self) -> None:
        self._loop.run_until_complete(self.backend.aclose())
        self._loop.close()

    async def _run_all(self, requests: list[JudgeRequest]) -> list[BaseModel | JudgeFailure]:
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(request: JudgeRequest) -> BaseModel | JudgeFailure:
            async with semaphore:
                return await self._judge(request)

        outcomes = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        for outcome in outcomes:  # re-raise only after every request in flight has been cached
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def key(self, request: JudgeRequest) -> str:
        return request_key(self.backend.name, self.backend.model, self.backend.settings, self.rubric_id, request)

    async def _judge(self, request: JudgeRequest) -> BaseModel | JudgeFailure:
        key = self.key(request)
        cached = self.cache.get(key)
        if cached is not None:
            return JudgeFailure(cached["failure"]) if "failure" in cached else request.schema.model_validate(cached)
        answers: list[str] = []
        for _ in range(self.parse_retries + 1):
            reply = await self._complete(request)
            verdict = parse_verdict(reply.text, request.schema)
            if verdict is not None:
                self.cache.put(key, verdict.model_dump())
                return verdict
            answers.append(reply.text)
        failure = JudgeFailure(f"{len(answers)} answers were not a {request.schema.__name__}: "
                               f"{' | '.join(a[:120] for a in answers)}")
        self.cache.put(key, {"failure": failure.message})
        return failure

    async def _complete(self, request: JudgeRequest) -> JudgeReply:
        """One answer, retrying transient failures as the policy says; TransientFailure when they persist."""

        async def attempt() -> JudgeReply:
            self.budget.check()
            await self.limiter.acquire(estimate_tokens(request))
            self.budget.requests += 1
            reply = await self.backend.complete(request)
            self.budget.charge(reply.input_tokens, reply.output_tokens)
            return reply

        return await aretry(attempt, self.retry, f"{self.backend.name} {self.backend.model}")


def request_key(backend: str, model: str, settings: dict[str, Any], rubric_id: str, request: JudgeRequest) -> str:
    """The cache key of a judge request: everything that determines its verdict."""
    what = {"rubric": rubric_id, "prompt": request.prompt.key(), "system": request.system,
            "schema": json_schema(request.schema)}
    params = {"temperature": request.temperature, "max_tokens": request.max_tokens, **settings}
    return cache_key(backend, model, what, params)


def estimate_tokens(request: JudgeRequest) -> int:
    """Tokens a request may use, for the tokens-per-minute limit: ~4 characters a token, 258 an image
    (Gemini's count for an image up to 384 px), plus the longest answer allowed."""
    text = request.system + "".join(m.text for m in request.prompt.messages)
    return len(text) // 4 + 258 * len(request.prompt.shown_images()) + request.max_tokens


def parse_verdict(text: str, schema: type[BaseModel]) -> BaseModel | None:
    """The schema instance in a model's answer: the whole text as JSON, else the first {...} block in it
    (models wrap JSON in prose or code fences when a server cannot force the schema)."""
    candidates = [text.strip()]
    fenced = re.search(r"\{.*\}", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(0))
    for candidate in candidates:
        try:
            return schema.model_validate(json.loads(candidate))
        except (ValueError, ValidationError):
            continue
    return None

