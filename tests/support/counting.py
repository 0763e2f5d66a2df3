"""How many prompts reach a generation backend: counted at its `generate`, for the tests that check what a cache
spares (curate itself has no use for the count)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from curate.generation import Prompt, SamplingParams


class PromptCount:
    def __init__(self) -> None:
        self.prompts = 0


def count_prompts(monkeypatch: pytest.MonkeyPatch, backend: type) -> PromptCount:
    """Counts, until the test ends, the prompts every instance of `backend` (a generator class) is asked to
    complete, once each whatever `n` or the retries."""
    count = PromptCount()
    generate = backend.generate

    def counted(self: object, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[list[str]]:
        count.prompts += len(prompts)
        return generate(self, prompts, n, params)

    monkeypatch.setattr(backend, "generate", counted)
    return count
