"""Cost control for paid judges: request and token rate limits, and a budget that stops the run.

Both count only what is really sent: cache hits cost nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from curate.errors import UserError


class RateLimiter:
    """At most `requests_per_minute` requests and `tokens_per_minute` (estimated) tokens in any 60 s window."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 window: float = 60.0) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window = window
        self._sent: deque[tuple[float, int]] = deque()  # (time, tokens) of requests in the window
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        """Wait until a request of `tokens` fits in the window, then count it."""
        async with self._lock:  # one waiter at a time, so requests go out in arrival order
            while (delay := self._wait(tokens, time.monotonic())) > 0:
                await asyncio.sleep(delay)
            self._sent.append((time.monotonic(), tokens))

    def _wait(self, tokens: int, now: float) -> float:
        while self._sent and self._sent[0][0] <= now - self.window:
            self._sent.popleft()
        over_requests = self.requests_per_minute is not None and len(self._sent) + 1 > self.requests_per_minute
        used = sum(t for _, t in self._sent)
        # A single request larger than the whole limit is let through alone rather than waiting forever.
        over_tokens = self.tokens_per_minute is not None and self._sent and used + tokens > self.tokens_per_minute
        if not (over_requests or over_tokens):
            return 0.0
        return self._sent[0][0] + self.window - now


class BudgetExhausted(UserError):
    """The run stopped at its budget; what was judged is cached, so rerunning resumes without paying twice."""


@dataclass
class Budget:
    """Stops a run after `max_requests` requests or `max_usd` estimated spend (from token counts and prices)."""

    max_requests: int | None = None
    max_usd: float | None = None
    usd_per_million_input: float = 0.0
    usd_per_million_output: float = 0.0
    requests: int = 0
    usd: float = 0.0

    def check(self) -> None:
        """Raise BudgetExhausted when the next request would go over."""
        if self.max_requests is not None and self.requests >= self.max_requests:
            self._stop(f"{self.requests} requests (max_requests: {self.max_requests})")
        if self.max_usd is not None and self.usd >= self.max_usd:
            self._stop(f"an estimated ${self.usd:.4f} (max_usd: {self.max_usd})")

    def charge(self, input_tokens: int, output_tokens: int) -> None:
        self.usd += (input_tokens * self.usd_per_million_input + output_tokens * self.usd_per_million_output) / 1e6

    def _stop(self, spent: str) -> None:
        raise BudgetExhausted(f"judge budget reached after {spent}; the verdicts so far are cached: raise the budget "
                              f"in the recipe and run the same command again to resume without paying twice")
