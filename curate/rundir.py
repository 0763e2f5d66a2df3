"""The run directory: committed batches, resume state, final shards and the manifest.

    RUN_DIR/                          a local folder or any fsspec URL (s3://bucket/runs/sft, ...)
      recipe.yaml                     the resolved recipe this run executes
      state/state-<batches>.pkl       the committed state: rows done, funnel so far, stateful stages' state,
                                      the names of the committed parts (checksummed)
      state/kept/part-<batch>-<token>.parquet       one canonical parquet part per committed batch
      state/rejected/part-<batch>-<token>.parquet   one per committed batch (+ stage, reason, detail)
      kept/                           output shards of the recipe's kind (sft or rl)
      rejected/                       every rejected sample whole, with stage, reason, detail
      manifest.json                   written last

Object stores have no rename, so nothing here relies on one. A batch is committed by writing its parts
under fresh unique names, then a new state object that names them (then the previous state object is
deleted). Each object is written whole or not at all on a store; on a local disk a torn write fails its
checksum. Resume loads the newest valid state; a part no committed state names, and any other state
object, is debris of a killed run and is deleted. Final shards are rebuilt from the named parts, so a
run killed while finalising simply finalises again; the manifest, written last, marks the run complete.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import secrets
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from curate import storage
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

    def to_manifest(self, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        entry = {
            "name": self.name,
            "in": self.rows_in,
            "kept": self.kept,
            "rejected": self.rejected,
            "reasons": dict(self.reasons.most_common()),
            "seconds": round(self.seconds, 3),
        }
        return {**entry, "settings": settings} if settings else entry


@dataclass
class RunState:
    recipe_sha256: str
    rows_done: int = 0
    batches_done: int = 0
    stats: dict[str, StageStats] = field(default_factory=dict)
    stage_states: dict[str, Any] = field(default_factory=dict)
    resumed: int = 0
    inputs: list[tuple[str, int, str]] = field(default_factory=list)  # (location, size, mtime or ETag) at start
    parts: list[str] = field(default_factory=list)  # the committed parts' names, in commit order


@dataclass(frozen=True)
class Rejection:
    sample: Sample
    stage: str
    reason: str
    detail: str


def fingerprint(locations: Iterable[str]) -> list[tuple[str, int, str]]:
    """What identifies the input files cheaply: a changed file cannot be resumed into."""
    return [storage.version(location) for location in locations]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def rejected_table(rejections: list[Rejection]) -> pa.Table:
    rows = [{**r.sample.to_row(), "stage": r.stage, "reason": r.reason, "detail": r.detail} for r in rejections]
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


def seal(state: RunState) -> bytes:
    """The state with a checksum in front, so a torn write is recognised and never resumed from."""
    payload = pickle.dumps(state)
    return hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def unseal(blob: bytes) -> RunState | None:
    digest, _, payload = blob.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    return pickle.loads(payload)


class RunDir:
    def __init__(self, location: str | Path) -> None:
        self.location = str(location)  # as the user wrote it, for messages
        self.fs, self.root = storage.filesystem(location)
        self.kept_parts = self._at("state", "kept")
        self.rejected_parts = self._at("state", "rejected")
        self.manifest_file = self._at("manifest.json")

    def _at(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # --- lifecycle -------------------------------------------------------

    def open(self, recipe_sha256: str, resolved_recipe: dict[str, Any], inputs: list[tuple[str, int, str]],
             force: bool) -> RunState:
        """Start a run here, or resume the one that is here; `force` discards whatever is here."""
        with storage.errors(self.location):
            if force:
                self.discard()
            previous_sha = self.load_state_or_manifest_sha()
            if previous_sha is None and self._entries(self.root):
                raise UserError(f"{self.location} exists and is not a curate run directory; choose another -o RUN_DIR")
            if previous_sha is not None and previous_sha != recipe_sha256:
                raise UserError(
                    f"{self.location} holds a run of a different recipe (sha256 {previous_sha[:12]} vs"
                    f" {recipe_sha256[:12]}); use another -o RUN_DIR, or --force to discard it and start over"
                )
            state = self.load_state()
            if state is None:  # a run stopped before its first batch must still resume here
                state = RunState(recipe_sha256, inputs=inputs)
                self._write_state(state)  # first, so that whatever this run writes is in a recognisable run dir
            if not self.fs.exists(self._at("recipe.yaml")):
                self.fs.pipe_file(self._at("recipe.yaml"), yaml.safe_dump(resolved_recipe, sort_keys=False).encode())
            if state.inputs != inputs:
                raise UserError(
                    f"{self.location}: the input files changed since this run started; resuming would mix two"
                    " datasets. Use --force to start over, or another -o RUN_DIR"
                )
            self._drop_uncommitted(state)
        return state

    def discard(self) -> None:
        """`--force`: delete this run directory's own objects. A location that is not a recognisable curate run
        directory (its manifest or a state object), that holds anything curate does not write, or that is `/`,
        the home or working directory (or above them) or a bucket's root is refused whole, before any deletion."""
        refuse_protected(self.location, self.fs, self.root)
        if not self.fs.exists(self.root):
            return
        if self.fs.isfile(self.root):
            raise UserError(f"{self.location} is a file, not a run directory; --force deletes only curate run"
                            " directories: choose another -o RUN_DIR")
        files = sorted(self.fs.find(self.root))
        if not files:
            return
        if self._read_manifest() is None and self.load_state() is None:
            raise UserError(f"{self.location} is not a curate run directory (no manifest.json, no state object);"
                            " --force deletes only curate run directories: choose another -o RUN_DIR")
        relative = [self._relative(path) for path in files]
        foreign = [name for name in relative if not _OWN_FILE.fullmatch(name)]
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise UserError(f"{self.location} holds {foreign[0]}{more}, which curate did not write; --force deletes"
                            " only a run directory's own files: move it away, or choose another -o RUN_DIR")
        for path in files:
            self._remove_file(path)
        if self.fs.exists(self._at("scratch")):  # every file under it was just deleted: only empty folders remain
            self.fs.rm(self._at("scratch"), recursive=True)
        self._remove_empty_folders()

    def _relative(self, path: str) -> str:
        return path.rstrip("/")[len(self.root.rstrip("/")) + 1:]

    def _remove_file(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _remove_empty_folders(self) -> None:
        """The folders curate makes, deepest first, each only when empty; then the run directory itself."""
        for folder in (*_OWN_FOLDERS, ""):
            target = self._at(folder) if folder else self.root
            if self._entries(target):
                continue
            try:
                self.fs.rmdir(target)
            except (FileNotFoundError, NotADirectoryError, OSError):
                pass  # an object store has no folders; a local one still holds something

    def load_state_or_manifest_sha(self) -> str | None:
        manifest = self._read_manifest()
        if manifest is not None:
            return manifest["recipe_sha256"]
        state = self.load_state()
        return state.recipe_sha256 if state else None

    def load_state(self) -> RunState | None:
        """The newest committed state; None before the first one."""
        for path in self._state_files():
            try:
                state = unseal(self.fs.cat_file(path))
            except FileNotFoundError:  # superseded since the listing: a running commit (seen by an observer)
                continue
            if state is not None:
                return state
        return None

    def _state_files(self) -> list[str]:
        """State objects, newest first."""
        return sorted((p for p in self._entries(self._at("state")) if _STATE_NAME.fullmatch(p.rsplit("/", 1)[-1])),
                      reverse=True)

    def _entries(self, folder: str) -> list[str]:
        self.fs.invalidate_cache(folder)  # another process (a killed run) may have written here
        try:
            return [p.rstrip("/") for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []

    def is_complete(self) -> bool:
        return self._read_manifest() is not None

    def manifest(self) -> dict[str, Any]:
        manifest = self._read_manifest()
        if manifest is None:
            raise UserError(
                f"{self.location}: no manifest.json; the run has not finished (rerun `curate run` to resume it)"
            )
        return manifest

    def _read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when absent or torn (a local write cut by a kill: the run finalises again)."""
        with storage.errors(self.location):
            try:
                return json.loads(self.fs.cat_file(self.manifest_file))
            except FileNotFoundError:
                return None
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None

    # --- committing batches ----------------------------------------------

    def commit_batch(self, state: RunState, kept: list[Sample], rejected: list[Rejection], rows: int) -> None:
        """Write the batch's parts under fresh names, then the state that names them."""
        name = f"part-{state.batches_done:06d}-{secrets.token_hex(4)}.parquet"
        kept_table = pa.Table.from_pylist([s.to_row() for s in kept], schema=ROW_SCHEMA)
        with storage.errors(self.location):
            self.fs.pipe_file(f"{self.kept_parts}/{name}", parquet_bytes(kept_table))
            self.fs.pipe_file(f"{self.rejected_parts}/{name}", parquet_bytes(rejected_table(rejected)))
            state.parts.append(name)
            state.rows_done += rows
            state.batches_done += 1
            self._write_state(state)

    def _write_state(self, state: RunState) -> None:
        """The new state object, then the previous one deleted (a kill in between leaves both: the newest counts)."""
        path = self._at("state", f"state-{state.batches_done:06d}.pkl")
        self.fs.pipe_file(path, seal(state))
        if state.batches_done:
            self._remove_file(self._at("state", f"state-{state.batches_done - 1:06d}.pkl"))

    def _drop_uncommitted(self, state: RunState) -> None:
        """Delete what no committed state names: parts of a batch whose state was never written, stale states."""
        named = set(state.parts)
        current = f"state-{state.batches_done:06d}.pkl"
        for folder in (self.kept_parts, self.rejected_parts):
            for path in self._entries(folder):
                name = path.rsplit("/", 1)[-1]
                if _PART_NAME.fullmatch(name) and name not in named:  # anything else is not ours to delete
                    self._remove_file(path)
        for path in self._state_files():
            if path.rsplit("/", 1)[-1] != current:
                self._remove_file(path)

    def _remove_own(self, folder: str, pattern: re.Pattern[str]) -> None:
        """The files of `folder` named as curate names them, then the folder when that left it empty."""
        for path in self._entries(folder):
            if pattern.fullmatch(path.rsplit("/", 1)[-1]):
                self._remove_file(path)
        if not self._entries(folder):
            try:
                self.fs.rmdir(folder)
            except (FileNotFoundError, NotADirectoryError, OSError):
                pass

    # --- finalising --------------------------------------------------------

    def finalize(self, state: RunState, output_kind: str, shard_rows: int,
                 settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Compact parts into kept/ and rejected/ shards, check the accounting, write the manifest last.
        `settings` (by stage label) is what each stage says about how it read its options."""
        with storage.errors(self.location):
            outputs = self._write_shards("kept", lambda folder: self._write_kept_shards(state, folder, output_kind,
                                                                                         shard_rows))
            rejected = self._write_shards("rejected", lambda folder: self._write_rejected_shards(state, folder,
                                                                                               shard_rows))
            stages = list(state.stats.values())
            input_rows = stages[0].rows_in if stages else 0
            kept_rows = sum(o["rows"] for o in outputs)
            rejected_rows = sum(o["rows"] for o in rejected)
            manifest = {
                "input_rows": input_rows,
                "kept_rows": kept_rows,
                "rejected_rows": rejected_rows,
                "stages": [s.to_manifest((settings or {}).get(s.name)) for s in stages],
                "recipe_sha256": state.recipe_sha256,
                "output_kind": output_kind,
                "output_format": OUTPUT_FORMAT[output_kind],
                "outputs": outputs,
                "rejected": rejected,
                "resumed": state.resumed,
            }
            check_accounting(manifest)
            self.fs.pipe_file(self.manifest_file, json.dumps(manifest, indent=2).encode())
            # The shards now hold every row; the parts would only double the space used.
            self._remove_own(self.kept_parts, _PART_NAME)
            self._remove_own(self.rejected_parts, _PART_NAME)
        return manifest

    def _write_shards(self, name: str, fill: Callable[[Path], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Shards written by `fill` into a local folder: the run's own when it is local, else a temporary one
        whose files are then uploaded. Whatever an earlier, killed finalise left there is replaced."""
        target = self._at(name)
        self._remove_own(target, _SHARD_NAME)
        if isinstance(self.fs, LocalFileSystem):
            folder = Path(target)
            folder.mkdir(parents=True)
            entries = fill(folder)
        else:
            with tempfile.TemporaryDirectory(prefix="curate-shards-") as tmp:
                entries = fill(Path(tmp))
                for entry in entries:
                    self.fs.put_file(str(Path(tmp) / entry["path"]), f"{target}/{entry['path']}")
        return [{**e, "path": f"{name}/{e['path']}"} for e in entries]

    def _write_kept_shards(self, state: RunState, folder: Path, output_kind: str,
                           shard_rows: int) -> list[dict[str, Any]]:
        writer = get_format(OUTPUT_FORMAT[output_kind])
        entries = []
        for index, chunk in enumerate(_chunks(self.iter_kept(state), shard_rows)):
            path = folder / shard_name(index)
            rows = writer.write(chunk, path)
            entries.append({"path": path.name, "rows": rows, "sha256": file_sha256(path)})
        return entries

    def _write_rejected_shards(self, state: RunState, folder: Path, shard_rows: int) -> list[dict[str, Any]]:
        parts = [f"{self.rejected_parts}/{name}" for name in state.parts]
        ds.write_dataset(
            ds.dataset(parts, schema=REJECTED_SCHEMA, format="parquet", filesystem=self.arrow_filesystem()),
            folder,
            format="parquet",
            basename_template="shard-{i}.parquet",
            max_rows_per_file=shard_rows,
            max_rows_per_group=min(shard_rows, 1024),
            preserve_order=True,
            existing_data_behavior="overwrite_or_ignore",
        )
        # pyarrow numbers its files unpadded (shard-0): named as the kept ones are, so both sort alike.
        written = sorted(folder.glob("shard-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
        shards = [p.rename(folder / shard_name(index)) for index, p in enumerate(written)]
        return [
            {"path": p.name, "rows": pq.ParquetFile(p).metadata.num_rows, "sha256": file_sha256(p)}
            for p in shards
        ]

    def path_of(self, relative: str) -> str:
        """A file of the run directory as its filesystem names it (what `fs` and `arrow_filesystem` take)."""
        return self._at(relative)

    def arrow_filesystem(self) -> Any:
        """pyarrow's view of this run's store (None: pyarrow's own local filesystem)."""
        if isinstance(self.fs, LocalFileSystem):
            return None
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def iter_kept(self, state: RunState) -> Iterator[Sample]:
        for name in state.parts:
            with self.fs.open(f"{self.kept_parts}/{name}", "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=256):
                    for row in batch.to_pylist():
                        yield Sample.from_row(row)


_STATE_NAME = re.compile(r"state-\d{6}\.pkl")
_PART_NAME = re.compile(r"part-\d{6}-[0-9a-f]{8}\.parquet")
_SHARD_NAME = re.compile(r"shard-\d+\.parquet")

# Every file curate writes into a run directory (relative paths); `--force` deletes these and nothing else.
_OWN_FILE = re.compile(
    r"recipe\.yaml|manifest\.json|state/state-\d{6}\.pkl|state/(kept|rejected)/part-\d{6}-[0-9a-f]{8}\.parquet"
    r"|(kept|rejected)/shard-\d+\.parquet|logs/curate(\.\d+)?\.log|scratch/.+"
)
# Its folders, deepest first; scratch/ is the stages' own working folder (storage.local_scratch).
_OWN_FOLDERS = ("state/kept", "state/rejected", "state", "kept", "rejected", "logs", "scratch")


def shard_name(index: int) -> str:
    """The file name of a kept or rejected shard: shard-00000.parquet, shard-00001.parquet, ..."""
    return f"shard-{index:05d}.parquet"


def refuse_protected(location: str, fs: Any, root: str) -> None:
    """`--force` never deletes `/`, the home or working directory or a folder above them, or a bucket's root."""
    if isinstance(fs, LocalFileSystem):
        target = Path(root).resolve()
        protected = ((Path.cwd().resolve(), "the working directory"), (Path.home().resolve(), "the home directory"))
        for place, what in protected:
            if target == place or target in place.parents:
                raise UserError(f"{location} is {what} or a folder above it; --force never deletes it:"
                                " choose another -o RUN_DIR")
        if target == Path(target.anchor):
            raise UserError(f"{location} is the filesystem's root; --force never deletes it: choose another -o RUN_DIR")
        return
    if "/" not in root.strip("/"):
        raise UserError(f"{location} is a bucket's root; --force never deletes one: name a folder inside it"
                        " as -o RUN_DIR")


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
