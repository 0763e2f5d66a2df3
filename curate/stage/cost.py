"""What a paid stage tells `curate estimate`: the requests a run would send it and what they would cost. The
stage side of the estimate, here so that stages (the judges) need not import the command that reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from curate.sample import Sample


@dataclass
class StageCost:
    """One paid stage's requests and their estimated tokens and price (None: no price configured)."""

    stage: str
    model: str
    requests: int = 0
    cached: int = 0  # left out: the cache holds their verdicts
    input_tokens: int = 0
    output_tokens: int = 0
    usd_per_million_input: float = 0.0
    usd_per_million_output: float = 0.0
    batch_price_ratio: float = 0.5

    @property
    def priced(self) -> bool:
        return bool(self.usd_per_million_input or self.usd_per_million_output)

    @property
    def usd_online(self) -> float:
        return (self.input_tokens * self.usd_per_million_input + self.output_tokens * self.usd_per_million_output) / 1e6

    @property
    def usd_batch(self) -> float:
        return self.usd_online * self.batch_price_ratio


class CostEstimator(Protocol):
    cost: StageCost

    def add(self, sample: Sample) -> None:
        """Count the request(s) the stage would send for this sample."""
