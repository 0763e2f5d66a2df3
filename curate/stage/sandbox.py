"""Base of the stages that re-execute a trajectory's code in the sandbox (`curate.sandbox`).

The sandbox library runs cells; `curate.sandbox.trajectory` turns a sample into cells and the execution into a
record. This base gives a stage one warm sandbox per process, built from its options, and the records of a batch.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pydantic import Field

from curate.sample import Sample
from curate.sandbox import Sandbox, SandboxOptions, isolation_for
from curate.sandbox.trajectory import code_calls, execute_many
from curate.stage import Stage, StageContext, StageOptions

DEFAULT = SandboxOptions()  # the sandbox's own defaults: a recipe that gives no option gets them


class SandboxStageOptions(StageOptions):
    """Sandbox settings a recipe can give any stage that executes code: the sandbox's own, checked and described."""

    timeout: float = Field(default=DEFAULT.timeout, gt=0, description="wall-clock seconds per trajectory")
    cpu_seconds: int = Field(default=DEFAULT.cpu_seconds, gt=0, description="CPU seconds per trajectory")
    memory_mb: int = Field(default=DEFAULT.memory_mb, ge=512, description="address-space limit per trajectory (MiB)")
    max_processes: int = Field(default=DEFAULT.max_processes, gt=0,
                               description="processes and threads per trajectory")
    max_file_mb: int = Field(default=DEFAULT.max_file_mb, gt=0,
                             description="largest file a trajectory may write (MiB)")
    max_output_kb: int = Field(default=DEFAULT.max_output_kb, gt=0,
                               description="most text one call may print (stdout + stderr, KiB)")
    tmp_mb: int = Field(default=DEFAULT.tmp_mb, gt=0, description="size of each worker's private /tmp (MiB)")
    parallelism: int = Field(default=DEFAULT.parallelism, gt=0,
                             description="warm workers, i.e. trajectories run at once")
    worker_grace: float = Field(default=DEFAULT.worker_grace, gt=0,
                                description="seconds a worker may take beyond `timeout` to answer before the watchdog "
                                            "kills and replaces it")
    isolation: str = Field(default=DEFAULT.isolation, pattern="^(auto|bwrap|namespace)$",
                           description="auto (= bwrap): a working bubblewrap, system or bundled, else stop; "
                                       "namespace: the weaker level, only when asked for")

    def sandbox_options(self) -> SandboxOptions:
        """The sandbox's own settings, read from these options."""
        return SandboxOptions(**{field.name: getattr(self, field.name) for field in fields(SandboxOptions)})


class SandboxStage(Stage):
    """Base of stages that re-execute a trajectory's code: one warm sandbox per process, from the options."""

    Options = SandboxStageOptions
    batch_size = 16

    def preflight(self) -> None:
        isolation_for(self.options.sandbox_options())  # fails closed: no working isolation, no row runs

    def setup(self, context: StageContext) -> None:
        self.sandbox = Sandbox(self.options.sandbox_options())

    def teardown(self) -> None:
        self.sandbox.close()

    def executed(self, batch: list[Sample], fresh: bool = False) -> dict[int, dict[str, Any]]:
        """Execution records of the samples that have code calls, by `id(sample)`."""
        with_code = [sample for sample in batch if code_calls(sample)]
        return {id(sample): record for sample, record in zip(with_code, execute_many(self.sandbox, with_code, fresh))}
