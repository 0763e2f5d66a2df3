"""Base of the stages that re-execute a trajectory's code in the sandbox (`curate.sandbox`).

The sandbox library runs cells; `curate.sandbox.trajectory` turns a sample into cells and the execution into a
record. This base gives a stage one warm sandbox per process, built from its options, and the records of a batch.
"""

from __future__ import annotations

from typing import Any

from curate.sample import Sample
from curate.sandbox import Sandbox, SandboxOptions, isolation_for
from curate.sandbox.trajectory import code_calls, execute_many
from curate.stage import Stage, StageContext


class SandboxStage(Stage):
    """Base of stages that re-execute a trajectory's code: one warm sandbox per process, from the options."""

    Options = SandboxOptions
    batch_size = 16

    def preflight(self) -> None:
        isolation_for(self.options)  # fails closed: no working isolation, no row runs

    def setup(self, context: StageContext) -> None:
        self.sandbox = Sandbox(self.options)

    def teardown(self) -> None:
        self.sandbox.close()

    def executed(self, batch: list[Sample], fresh: bool = False) -> dict[int, dict[str, Any]]:
        """Execution records of the samples that have code calls, by `id(sample)`."""
        with_code = [sample for sample in batch if code_calls(sample)]
        return {id(sample): record for sample, record in zip(with_code, execute_many(self.sandbox, with_code, fresh))}
