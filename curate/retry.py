"""The one policy for transient failures of remote and engine calls (judges online and batch, probes on every
backend, the trainer's judge reward).

- One attempt that fails in a way a later attempt may not (429, 5xx, a timeout, a dropped connection, a body
  that is not the API's) raises `TransientError`, with the server's `Retry-After` where it gave one.
- `retry` / `aretry` repeat the attempt up to `RetryPolicy.max_retries` times, waiting the server's
  `Retry-After` or exponential backoff (capped at `max_backoff`), plus jitter so that many clients do not
  come back in step.
- A call that still fails raises `TransientFailure`. It is never turned into a verdict: the executor does
  not commit the batch, the run stops with one line, and the same command resumes at that batch. Every
  answer received before the stop is in the cache, so a resume pays for nothing twice.

Why stop rather than defer the row and retry it before the run ends: an outage outlasts any in-process wait
worth having (a deferred row would only be a longer retry, holding its batch and every batch after it in
memory, since commits follow input order), and a stopped run costs nothing to resume.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from curate.errors import UserError

T = TypeVar("T")


class TransientError(Exception):
    """One attempt failed in a way worth retrying; `retry_after` in seconds if the server said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientFailure(UserError):
    """A call still failed transiently after the policy's retries: the run stops, nothing is recorded for the
    call, and running the same command again resumes (it is a UserError so that it prints as one line)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5  # attempts after the first
    backoff: float = 1.0  # seconds before the first retry, doubled per retry; also the jitter's range
    max_backoff: float = 60.0  # the longest wait of our own (a server's Retry-After is honoured as given)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        wait = retry_after if retry_after is not None else min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return wait + random.uniform(0, self.backoff)


def retry(attempt: Callable[[], T], policy: RetryPolicy, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """`attempt()`, repeated on TransientError as `policy` allows; TransientFailure naming `what` when it persists."""
    error: TransientError | None = None
    for number in range(policy.max_retries + 1):
        if error is not None:
            sleep(policy.delay(number, error.retry_after))
        try:
            return attempt()
        except TransientError as exc:
            error = exc
    raise _failure(what, policy, error)


async def aretry(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """`retry` for coroutines: the waits do not block the event loop."""
    error: TransientError | None = None
    for number in range(policy.max_retries + 1):
        if error is not None:
            await asyncio.sleep(policy.delay(number, error.retry_after))
        try:
            return await attempt()
        except TransientError as exc:
            error = exc
    raise _failure(what, policy, error)


def _failure(what: str, policy: RetryPolicy, error: TransientError | None) -> TransientFailure:
    attempts = policy.max_retries + 1
    return TransientFailure(f"{what} failed after {attempts} attempt{'s' * (attempts > 1)}: {error}")


def retry_after_seconds(value: object) -> float | None:
    """A `Retry-After` header in seconds: a number (or "7s", as Google's RetryInfo says), or an HTTP date; None
    when absent or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return max(0.0, float(value.strip().removesuffix("s")))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def masked(text: str, *secrets: str) -> str:
    """`text` on one line, with every non-empty secret replaced by ***."""
    line = " ".join(text.split())
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line
