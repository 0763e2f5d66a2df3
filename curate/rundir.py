"""The run directory: committed batches, resume state, final shards and the manifest.

    RUN_DIR/
      recipe.yaml          the resolved recipe this run executes
      state/state.pkl      rows done, funnel so far, stateful stages' state (atomic)
      state/kept/          one canonical parquet part per committed batch
      state/rejected/      one parquet part per committed batch (+ stage, reason, detail)
      kept/                output shards of the recipe's kind (sft or rl)
      rejected/            every rejected sample whole, with stage, reason, detail
      manifest.json        written last

A batch is committed by writing its parts (write, then rename) and then the
state that counts them; a part whose batch number is not yet in the state is
debris of a killed run and is deleted on resume. Final shards are rebuilt from
the parts, so a run killed while finalising simply finalises again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml

from curate.errors import UserError
from curate.formats import get_format
from curate.sample import ROW_SCHEMA, Sample

REJECTED_SCHEMA = pa.schema(list(ROW_SCHEMA) + [pa.field(name, pa.string()) for name in ("stage", "reason", "detail")])
OUTPUT_FORMAT = {"sft": "messages", "rl": "verl"}


@dataclass
class StageStats:
    name: str
    rows_in: int = 0
    kept: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, other: StageStats) -> None:
        self.rows_in += other.rows_in
        self.kept += other.kept
        self.rejected += other.rejected
        self.reasons.update(other.reasons)
        self.seconds += other.seconds

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.rows_in,
            "kept": self.kept,
            "rejected": self.rejected,
            "reasons": dict(self.reasons.most_common()),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunState:
    recipe_sha256: str
    rows_done: int = 0
    batches_done: int = 0
    stats: dict[str, StageStats] = field(default_factory=dict)
    stage_states: dict[str, Any] = field(default_factory=dict)
    resumed: int = 0
    inputs: list[tuple[str, int, int]] = field(default_factory=list)  # (path, size, mtime_ns) at start


@dataclass(frozen=True)
class Rejection:
    sample: Sample
    stage: str
    reason: str
    detail: str


def fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """What identifies the input files cheaply: a changed file cannot be resumed into."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rejected_table(rejections: list[Rejection]) -> pa.Table:
    rows = [{**r.sample.to_row(), "stage": r.stage, "reason": r.reason, "detail": r.detail} for r in rejections]
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state_dir = self.path / "state"
        self.kept_parts = self.state_dir / "kept"
        self.rejected_parts = self.state_dir / "rejected"
        self.state_file = self.state_dir / "state.pkl"
        self.manifest_file = self.path / "manifest.json"

    # --- lifecycle -------------------------------------------------------

    def open(self, recipe_sha256: str, resolved_recipe: dict[str, Any], inputs: list[tuple[str, int, int]],
             force: bool) -> RunState:
        """Start a run here, or resume the one that is here; `force` discards whatever is here."""
        if force:
            shutil.rmtree(self.path, ignore_errors=True)
        previous_sha = self.load_state_or_manifest_sha()
        if previous_sha is None and self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"{self.path} exists and is not a curate run directory; choose another -o RUN_DIR")
        if previous_sha is not None and previous_sha != recipe_sha256:
            raise UserError(
                f"{self.path} holds a run of a different recipe (sha256 {previous_sha[:12]} vs {recipe_sha256[:12]});"
                " use another -o RUN_DIR, or --force to discard it and start over"
            )
        state = self.load_state() or RunState(recipe_sha256, inputs=inputs)
        if state.inputs != inputs:
            raise UserError(
                f"{self.path}: the input files changed since this run started; resuming would mix two datasets."
                " Use --force to start over, or another -o RUN_DIR"
            )
        for folder in (self.kept_parts, self.rejected_parts):
            folder.mkdir(parents=True, exist_ok=True)
        (self.path / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
        if not self.state_file.exists():  # a run stopped before its first batch must still resume here
            atomic_write_bytes(self.state_file, pickle.dumps(state))
        self._drop_uncommitted_parts(state.batches_done)
        return state

    def load_state_or_manifest_sha(self) -> str | None:
        if self.manifest_file.exists():
            return json.loads(self.manifest_file.read_text())["recipe_sha256"]
        state = self.load_state()
        return state.recipe_sha256 if state else None

    def load_state(self) -> RunState | None:
        if not self.state_file.exists():
            return None
        with self.state_file.open("rb") as handle:
            return pickle.load(handle)

    def is_complete(self) -> bool:
        return self.manifest_file.exists()

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_file.exists():
            raise UserError(f"{self.path}: no manifest.json; the run has not finished (rerun `curate run` to resume it)")
        return json.loads(self.manifest_file.read_text())

    # --- committing batches ----------------------------------------------

    def commit_batch(self, state: RunState, kept: list[Sample], rejected: list[Rejection], rows: int) -> None:
        """Write the batch's parts, then the state that counts them."""
        name = f"part-{state.batches_done:06d}.parquet"
        write_parquet_atomic(pa.Table.from_pylist([s.to_row() for s in kept], schema=ROW_SCHEMA), self.kept_parts / name)
        write_parquet_atomic(rejected_table(rejected), self.rejected_parts / name)
        state.rows_done += rows
        state.batches_done += 1
        atomic_write_bytes(self.state_file, pickle.dumps(state))

    def _drop_uncommitted_parts(self, batches_done: int) -> None:
        for folder in (self.kept_parts, self.rejected_parts):
            for part in folder.iterdir():
                if part.suffix == ".tmp" or int(part.stem.split("-")[1]) >= batches_done:
                    part.unlink()

    def _parts(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("part-*.parquet"))

    # --- finalising --------------------------------------------------------

    def finalize(self, state: RunState, output_kind: str, shard_rows: int) -> dict[str, Any]:
        """Compact parts into kept/ and rejected/ shards, check the accounting, write the manifest last."""
        outputs = self._replace_dir("kept", lambda tmp: self._write_kept_shards(tmp, output_kind, shard_rows))
        rejected = self._replace_dir("rejected", lambda tmp: self._write_rejected_shards(tmp, shard_rows))
        stages = list(state.stats.values())
        input_rows = stages[0].rows_in if stages else 0
        kept_rows = sum(o["rows"] for o in outputs)
        rejected_rows = sum(o["rows"] for o in rejected)
        manifest = {
            "input_rows": input_rows,
            "kept_rows": kept_rows,
            "rejected_rows": rejected_rows,
            "stages": [s.to_manifest() for s in stages],
            "recipe_sha256": state.recipe_sha256,
            "output_kind": output_kind,
            "output_format": OUTPUT_FORMAT[output_kind],
            "outputs": outputs,
            "rejected": rejected,
            "resumed": state.resumed,
        }
        check_accounting(manifest)
        atomic_write_bytes(self.manifest_file, json.dumps(manifest, indent=2).encode())
        # The shards now hold every row; the parts would only double the disk use.
        shutil.rmtree(self.kept_parts)
        shutil.rmtree(self.rejected_parts)
        return manifest

    def _replace_dir(self, name: str, fill: Any) -> list[dict[str, Any]]:
        final, tmp = self.path / name, self.path / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        entries = fill(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return [{**e, "path": f"{name}/{e['path']}"} for e in entries]

    def _write_kept_shards(self, folder: Path, output_kind: str, shard_rows: int) -> list[dict[str, Any]]:
        writer = get_format(OUTPUT_FORMAT[output_kind])
        entries = []
        for index, chunk in enumerate(_chunks(self.iter_kept(), shard_rows)):
            path = folder / f"shard-{index:05d}.parquet"
            rows = writer.write(chunk, path)
            entries.append({"path": path.name, "rows": rows, "sha256": file_sha256(path)})
        return entries

    def _write_rejected_shards(self, folder: Path, shard_rows: int) -> list[dict[str, Any]]:
        parts = self._parts(self.rejected_parts)
        ds.write_dataset(
            ds.dataset(parts, schema=REJECTED_SCHEMA, format="parquet"),
            folder,
            format="parquet",
            basename_template="shard-{i}.parquet",
            max_rows_per_file=shard_rows,
            max_rows_per_group=min(shard_rows, 1024),
            preserve_order=True,
            existing_data_behavior="overwrite_or_ignore",
        )
        shards = sorted(folder.glob("shard-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
        return [
            {"path": p.name, "rows": pq.ParquetFile(p).metadata.num_rows, "sha256": file_sha256(p)}
            for p in shards
        ]

    def iter_kept(self) -> Iterator[Sample]:
        for part in self._parts(self.kept_parts):
            for batch in pq.ParquetFile(part).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield Sample.from_row(row)


def check_accounting(manifest: dict[str, Any]) -> None:
    """input rows = kept + rejected, and the funnel agrees with the shards; a violation is a bug."""
    funnel_rejected = sum(stage["rejected"] for stage in manifest["stages"])
    last_kept = manifest["stages"][-1]["kept"] if manifest["stages"] else 0
    if not (
        manifest["input_rows"] == manifest["kept_rows"] + manifest["rejected_rows"]
        and funnel_rejected == manifest["rejected_rows"]
        and last_kept == manifest["kept_rows"]
    ):
        raise RuntimeError(
            "accounting invariant violated: input_rows={input_rows} kept_rows={kept_rows} rejected_rows={rejected_rows}".format(
                **manifest
            )
            + f" funnel_rejected={funnel_rejected} funnel_kept={last_kept}"
        )


def _chunks(items: Iterable[Sample], size: int) -> Iterator[Iterator[Sample]]:
    """Lazy chunks of `size` items, so a shard never holds more than it writes."""
    iterator = iter(items)
    while True:
        first = next(iterator, None)
        if first is None:
            return
        yield _prepend(first, islice(iterator, size - 1))


def _prepend(first: Sample, rest: Iterator[Sample]) -> Iterator[Sample]:
    yield first
    yield from rest
