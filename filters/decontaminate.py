"""decontaminate: drop samples whose question or images come from an evaluation set named in the recipe."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from curate import storage
from curate.cache import Cache, cache_key
from curate.errors import UserError
from curate.hashindex import HashIndex
from curate.images import PerceptualHashOptions, perceptual_hash
from curate.sample import Sample
from curate.stage import KEEP, Resources, Stage, StageContext, Verdict, reject
from curate.textnorm import Normaliser

EVAL_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


class EvalSet(BaseModel):
    """One evaluation set: its files (local paths relative to the recipe, globs, or fsspec URLs such as
    `hf://datasets/org/name/file.parquet`) and the columns to read."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    paths: list[str] = Field(min_length=1, description="parquet or JSONL files, globs, or fsspec URLs")
    question: str = Field(default="question", description="column holding the question text")
    image: str | None = Field(default=None, description="column holding the image(s), if any")
    id: str | None = Field(default=None, description="column holding the item id (default: the row number)")

    @field_validator("paths")
    @classmethod
    def _relative_to_the_recipe(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        folder = (info.context or {}).get("recipe_dir")
        if folder is None:
            return paths
        return [p if storage.is_url(p) or Path(p).expanduser().is_absolute() else str(Path(folder) / p) for p in paths]


@dataclass
class EvalIndex:
    """Every evaluation item's word n-grams (by digest) and image hashes, with who they belong to."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (benchmark, item id)
    ngrams: dict[int, int] = field(default_factory=dict)  # n-gram digest -> item, the first item that has it
    lengths: set[int] = field(default_factory=set)  # n-gram lengths in words (short questions are whole)


class Decontaminate(Stage):
    """Rejects a sample whose question shares a word n-gram with an evaluation item's question, or whose image
    is within `max_distance` bits (perceptual hash) of an evaluation item's image.

    Text: both sides normalised as in text_dedup (curate/textnorm.py); an evaluation question of at least
    `ngram` words contributes its `ngram`-word n-grams, a shorter one of at least `min_words` words counts
    whole (as a contiguous run of words in the sample), a shorter one still is checked by its image only.
    Images: hashed as image_dedup hashes them (same options), looked up in a HashIndex of the evaluation images.

    Reason `contaminated`; the detail names the benchmark, the item id and what matched (the n-gram, or the
    image and its distance), also in `meta.decontaminate`. Evaluation sets are read in `setup` and their index
    is cached by the sha256 of their files' content (and the options it depends on) in the run's cache, so a
    set is parsed and hashed once across runs; a missing or unreadable set stops the run before any row.
    Runs as one instance in the driver (the index is held once); the samples' images are hashed in the workers.
    """

    name = "decontaminate"
    resources = Resources(heavy=True)
    batch_size = 256
    reasons: ClassVar[dict[str, str]] = {
        "contaminated": "the question or an image matches an evaluation item (benchmark, item id, what matched)",
    }

    class Options(PerceptualHashOptions):
        benchmarks: dict[str, EvalSet] = Field(min_length=1, description="evaluation sets by name")
        text: Literal["question", "trajectory"] = Field(default="question", description="which text to check")
        ngram: int = Field(default=13, ge=1, le=64, description="words per n-gram")
        min_words: int = Field(default=8, ge=1, description="shorter evaluation questions are checked by image only")
        check_images: bool = Field(default=True, description="compare images by perceptual hash")
        ignore_case: bool = True
        ignore_punctuation: bool = True
        ignore_numbers: bool = False

    # --- evaluation sets -------------------------------------------------------------------------

    def preflight(self) -> None:
        """Every file is there and has the named columns: the run stops here, before any row, if not."""
        for benchmark, spec in self.options.benchmarks.items():
            for location in self._files(benchmark, spec):
                self._columns_present(benchmark, spec, location)

    def setup(self, context: StageContext) -> None:
        self.normalise = Normaliser(self.options.ignore_case, self.options.ignore_punctuation,
                                    self.options.ignore_numbers)
        self.index = EvalIndex()
        self.images = HashIndex(self.options.max_distance, bits=self.options.hash_size**2)
        with Cache(context.cache_path) as cache:
            for benchmark, spec in self.options.benchmarks.items():
                self._add(benchmark, self._load(benchmark, spec, cache))

    def _files(self, benchmark: str, spec: EvalSet) -> list[str]:
        found: list[str] = []
        for pattern in spec.paths:
            try:
                found += storage.expand(pattern, Path.cwd())
            except UserError as exc:
                raise UserError(f"decontaminate: benchmark {benchmark!r}: {exc}") from None
        for location in found:
            if storage.suffix(location) not in EVAL_FORMATS:
                raise UserError(f"decontaminate: benchmark {benchmark!r}: {location} is neither parquet nor JSONL")
        return found

    def _columns_present(self, benchmark: str, spec: EvalSet, location: str) -> None:
        wanted = [c for c in (spec.question, spec.image, spec.id) if c]
        try:
            if EVAL_FORMATS[storage.suffix(location)] == "parquet":
                with storage.open_file(location) as handle:
                    columns = pq.read_schema(handle).names
            else:
                with storage.open_file(location, "rt", encoding="utf-8") as handle:
                    columns = list(json.loads(handle.readline() or "{}"))
        except UserError as exc:
            raise UserError(f"decontaminate: benchmark {benchmark!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any reader error means the set cannot be used: say which file
            raise UserError(f"decontaminate: benchmark {benchmark!r}: cannot read {location}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise UserError(f"decontaminate: benchmark {benchmark!r}: {location} has no column {missing[0]!r}"
                            f" (it has: {', '.join(columns[:12])})")

    def _load(self, benchmark: str, spec: EvalSet, cache: Cache) -> dict[str, Any]:
        """The benchmark's items, n-grams and image hashes: from the cache when its files' content is known."""
        contents = []
        for location in self._files(benchmark, spec):
            self._columns_present(benchmark, spec, location)
            contents.append((location, storage.read_bytes(location)))
        parameters = self.options.model_dump(include={"ngram", "min_words", "check_images", "hash", "hash_size",
                                                      "ignore_case", "ignore_punctuation", "ignore_numbers"})
        key = cache_key("decontaminate", "eval-set", {"files": [hashlib.sha256(data).hexdigest()
                                                                for _, data in contents],
                                                      "columns": [spec.question, spec.image, spec.id]}, parameters)
        cached = cache.get(key)
        if cached is not None:
            return cached
        built: dict[str, Any] = {"ids": [], "ngrams": [], "images": []}
        for location, data in contents:
            for row in self._rows(benchmark, location, data, spec):
                item = len(built["ids"])
                built["ids"].append(str(row[spec.id]) if spec.id else str(item))
                built["ngrams"] += [[digest, length, item] for digest, length in self._eval_ngrams(row[spec.question])]
                if spec.image and self.options.check_images:
                    for image in _images_of(row.get(spec.image)):
                        value = perceptual_hash(image, self.options.hash, self.options.hash_size)
                        if value is not None:
                            built["images"].append([value, item])
        cache.put(key, built)
        return built

    @staticmethod
    def _rows(benchmark: str, location: str, data: bytes, spec: EvalSet) -> list[dict[str, Any]]:
        columns = [c for c in dict.fromkeys((spec.question, spec.image, spec.id)) if c]
        try:
            if EVAL_FORMATS[storage.suffix(location)] == "parquet":
                return pq.read_table(io.BytesIO(data), columns=columns).to_pylist()
            return [{c: row.get(c) for c in columns}
                    for row in map(json.loads, data.decode("utf-8").splitlines()) if row]
        except Exception as exc:  # noqa: BLE001 - a broken set stops the run, naming the file
            raise UserError(f"decontaminate: benchmark {benchmark!r}: cannot read {location}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def _eval_ngrams(self, question: Any) -> list[tuple[int, int]]:
        words = self.normalise(str(question or "")).split()
        n = self.options.ngram
        if len(words) < n:
            return [(_digest(" ".join(words)), len(words))] if len(words) >= self.options.min_words else []
        return [(_digest(" ".join(words[i : i + n])), n) for i in range(len(words) - n + 1)]

    def _add(self, benchmark: str, built: dict[str, Any]) -> None:
        base = len(self.index.items)
        self.index.items += [(benchmark, item_id) for item_id in built["ids"]]
        for digest, length, item in built["ngrams"]:
            self.index.ngrams.setdefault(digest, base + item)
            self.index.lengths.add(length)
        if built["images"]:
            self.images.add_many([int(value, 16) for value, _ in built["images"]],
                                 [str(base + item) for _, item in built["images"]])

    # --- samples ---------------------------------------------------------------------------------

    def prepare(self, batch: list[Sample]) -> None:
        """Hash the samples' images in the worker processes."""
        if self.options.check_images:
            for sample in batch:
                sample.meta[self.name] = {"hash": self._hash_kind, "hashes": self._hashes(sample)}

    def process(self, batch: list[Sample]) -> list[Verdict]:
        return [self._check(sample) for sample in batch]

    def _check(self, sample: Sample) -> Verdict:
        prepared = sample.meta.pop(self.name, None)
        text = sample.question if self.options.text == "question" else "\n".join(m.text for m in sample.messages)
        words = self.normalise(text).split()
        for length in sorted(self.index.lengths, reverse=True):
            for start in range(len(words) - length + 1):
                ngram = " ".join(words[start : start + length])
                item = self.index.ngrams.get(_digest(ngram))
                if item is not None:
                    return self._contaminated(sample, item, {"match": "text", "ngram": ngram},
                                              f'{self.options.text} shares "{ngram}"')
        if self.options.check_images and len(self.images):
            hashes = (prepared["hashes"] if isinstance(prepared, dict) and prepared.get("hash") == self._hash_kind
                      else self._hashes(sample))
            for position, value in enumerate(hashes):
                found = None if value is None else self.images.nearest(int(value, 16))
                if found is not None:
                    item, distance = int(found[0]), found[1]
                    return self._contaminated(sample, item, {"match": "image", "image": position, "distance": distance},
                                              f"image {position} is {distance} bits from its image")
        return KEEP

    def _contaminated(self, sample: Sample, item: int, evidence: dict[str, Any], what: str) -> Verdict:
        benchmark, item_id = self.index.items[item]
        sample.meta[self.name] = {"benchmark": benchmark, "item": item_id, **evidence}
        return reject("contaminated", f"{benchmark} item {item_id}: {what}")

    @property
    def _hash_kind(self) -> str:
        return f"{self.options.hash}-{self.options.hash_size}"

    def _hashes(self, sample: Sample) -> list[str | None]:
        return [perceptual_hash(image.data, self.options.hash, self.options.hash_size) for image in sample.images]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _images_of(value: Any) -> list[bytes]:
    """Image bytes from a column value: bytes, a Hub `{bytes, path}` struct, base64 or a data URI, or a list."""
    if value is None:
        return []
    if isinstance(value, list):
        return [data for element in value for data in _images_of(element)]
    if isinstance(value, dict):
        return _images_of(value.get("bytes"))
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, str):
        try:
            return [base64.b64decode(value.partition("base64,")[2] or value, validate=True)]
        except ValueError:
            return []
    return []
