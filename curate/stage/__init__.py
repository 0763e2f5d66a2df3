"""The stage protocol: a batch of samples in, one verdict per sample out.

A filter is a small subclass that implements `check` (one sample, return
`True`/`False` or a `Verdict`) or, when batching pays, `process` (a whole
batch). Everything else (statistics, progress, the rejected-sample writer,
resume, parallelism) belongs to the executor, which reads only what a stage
declares here: its options model, its resources and its batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from curate.sample import Sample


@dataclass(frozen=True)
class Resources:
    """What one instance of a stage needs.

    CPU-only stages are fanned out over the executor's worker processes.
    A stage with `gpus > 0`, `io=True` or `heavy=True` runs as one instance in the driver:
    a model (on GPU or CPU) is loaded once, and network stages keep their own concurrency.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    io: bool = False
    heavy: bool = False  # state too costly to hold once per worker process (a model on the CPU)


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str = ""
    detail: str = ""


KEEP = Verdict(True)


def reject(reason: str, detail: str = "") -> Verdict:
    return Verdict(False, reason, detail)


class StageOptions(BaseModel):
    """Base of every stage's options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageContext:
    """What the run lends a stage at setup: the shared cache and a scratch folder."""

    cache_path: Path
    scratch_dir: Path
    extras: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Base class of every stage. Subclasses set `name` and usually `Options`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 64
    # A stateful stage sees every row, in input order, in one process (e.g. a
    # dedup index); it saves its state with each committed batch.
    stateful: ClassVar[bool] = False
    # Every rejection reason the stage can give -> one line saying what it means (the reference docs list them).
    reasons: ClassVar[dict[str, str]] = {}

    def __init__(self, options: StageOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def setup(self, context: StageContext) -> None:
        """Load heavy state (a model, a client, a sandbox pool)."""

    def teardown(self) -> None:
        """Release what `setup` took."""

    def settings(self) -> dict[str, Any]:
        """How this stage reads its options, for the run's manifest (its entry's `settings`): e.g. which of two
        readings of a paper's criterion it applies. Computed from the options alone, on an instance never set up."""
        return {}

    def preflight(self) -> None:
        """Stop the run before any row (a UserError saying what to do) when this machine cannot run the stage.
        It runs once, in the driver, on an instance that was never set up."""

    def process(self, batch: list[Sample]) -> list[Verdict]:
        """Judge a batch; may annotate `sample.meta[self.name]`."""
        return [as_verdict(self.check(sample), self.name) for sample in batch]

    def prepare(self, batch: list[Sample]) -> None:
        """Stateless work a stage that runs in the driver can hand to the worker processes beforehand
        (it may annotate meta for `process` to use), e.g. hashing images before a stateful index.
        It runs on an instance that was never set up: it may use the options, not setup's state."""

    def has_prepare(self) -> bool:
        return type(self).prepare is not Stage.prepare

    def check(self, sample: Sample) -> bool | Verdict:
        raise NotImplementedError(f"stage {self.name!r} implements neither check() nor process()")

    def state_dict(self) -> Any:
        """State a stateful stage needs to resume (picklable)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore what `state_dict` returned."""

    def runs_in_workers(self) -> bool:
        """Whether the executor may fan this stage out over worker processes."""
        resources = self.resources
        return not (self.stateful or resources.gpus or resources.io or resources.heavy)

    @classmethod
    def default_placement(cls) -> str:
        """"workers" or "driver", with the default options (for listings). A stage with required options (an
        evaluation set to name) is built from unvalidated defaults: what it must be told does not move it."""
        required = any(info.is_required() for info in cls.Options.model_fields.values())
        stage = cls(cls.Options.model_construct()) if required else cls()
        return "workers" if stage.runs_in_workers() else "driver"


def as_verdict(result: bool | Verdict, stage_name: str) -> Verdict:
    """Let filters return a bare bool, as datatrove's do; False rejects with the stage's name."""
    if isinstance(result, Verdict):
        return result
    return KEEP if result else reject(stage_name)
