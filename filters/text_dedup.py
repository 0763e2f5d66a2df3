"""text_dedup: near-duplicate questions (or trajectories, or final answers) across the whole dataset."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, ClassVar, Literal

import numpy as np
import rensa
from pydantic import Field, ValidationInfo, field_validator

from curate.sample import Sample
from curate.stage import KEEP, Stage, StageContext, StageOptions, Verdict, reject
from curate.textnorm import Normaliser, char_shingles, word_ngrams

SEED = 20260  # MinHash permutations: fixed, so signatures from every process and every run agree


class TextDedup(Stage):
    """Rejects a sample whose text is a near-duplicate of an earlier kept sample's; the first occurrence is kept.

    The text (`text`: the first user question, the whole trajectory, or the final answer) is normalised
    (curate/textnorm.py: case, punctuation, optionally numbers, whitespace), cut into shingles (character
    or word n-grams) and summarised by a MinHash signature (rensa). LSH banding (rensa's index: `bands`
    bands of num_perm / bands values) proposes earlier kept samples; a candidate counts when the signatures
    estimate a Jaccard similarity of at least `threshold`, and the earliest such sample is named. Texts equal
    after normalisation are found first by their digest, with similarity 1.

    Reason `near_duplicate_text`; the detail names the kept sample and the estimated Jaccard similarity,
    also in `meta.text_dedup` (`duplicate_of`, `jaccard`). Samples whose text is empty after normalisation
    are kept. Stateful: the index sees every row in input order and is saved with each batch; the
    signatures are computed in the workers (`prepare`).
    """

    name = "text_dedup"
    stateful = True
    batch_size = 256
    reasons: ClassVar[dict[str, str]] = {
        "near_duplicate_text": "the text is a near-duplicate of an earlier kept sample's (named, with the Jaccard)",
    }

    class Options(StageOptions):
        text: Literal["question", "trajectory", "final_answer"] = Field(
            default="question", description="what to compare: first user question, all text, or final answer")
        threshold: float = Field(default=0.7, gt=0.0, le=1.0, description="smallest estimated Jaccard that counts")
        shingle: Literal["char", "word"] = Field(default="char", description="shingles of characters or of words")
        shingle_size: int = Field(default=5, ge=1, le=64, description="characters or words per shingle")
        # 36 bands of 7 values: a pair at Jaccard 0.7 shares a band 95.5% of the time, a pair at 0.45 (two
        # questions of one template) 12.6%; 32 bands of 4 proposed 74% of such pairs, and verifying them made the
        # index quadratic on templated sets (docs/results/dedup.md).
        num_perm: int = Field(default=252, ge=8, le=1024, description="MinHash permutations")
        bands: int = Field(default=36, ge=1, description="LSH bands; num_perm / bands values per band")
        ignore_case: bool = Field(default=True, description="fold case before comparing")
        ignore_punctuation: bool = Field(default=True, description="treat punctuation as space")
        ignore_numbers: bool = Field(default=False, description="treat every number as the same number")

        @field_validator("bands")
        @classmethod
        def _bands_divide_permutations(cls, value: int, info: ValidationInfo) -> int:
            num_perm = info.data.get("num_perm", 252)
            if num_perm % value:
                raise ValueError(f"must divide num_perm ({num_perm})")
            return value

    def setup(self, context: StageContext) -> None:
        self.lsh = rensa.RMinHashLSH(threshold=self.options.threshold, num_perm=self.options.num_perm,
                                     num_bands=self.options.bands)
        # The kept samples' signatures (low 16 bits of each value: the similarity estimate is then off by
        # less than 2^-16, at half the memory), their ids, and the digests of their normalised texts.
        self.signatures = np.zeros((1024, self.options.num_perm), dtype=np.uint16)
        self.ids: list[str] = []
        self.exact: dict[int, int] = {}
        # Equal values a candidate needs: the estimate (equal / num_perm) is at least `threshold` (rounded
        # first: 0.56 × 25 is 14.000000000000002 in floats, and 14 equal values are enough).
        self.values_needed = math.ceil(round(self.options.threshold * self.options.num_perm, 9))

    # --- per row, in the workers -------------------------------------------------------------------

    def prepare(self, batch: list[Sample]) -> None:
        for sample in batch:
            sample.meta[self.name] = self._fingerprint(sample)

    def _fingerprint(self, sample: Sample) -> dict[str, Any]:
        options = self.options
        normalised = Normaliser(options.ignore_case, options.ignore_punctuation, options.ignore_numbers)(
            self._text(sample))
        if not normalised:
            return {"kind": self._kind, "digest": None, "minhash": None}
        shingles = (char_shingles(normalised, options.shingle_size) if options.shingle == "char"
                    else word_ngrams(normalised.split(" "), options.shingle_size))
        minhash = rensa.RMinHash(num_perm=options.num_perm, seed=SEED)
        minhash.update(sorted(shingles))
        digest = int.from_bytes(hashlib.blake2b(normalised.encode(), digest_size=8).digest(), "little")
        return {"kind": self._kind, "digest": digest, "minhash": minhash}  # an RMinHash pickles to the driver

    def _text(self, sample: Sample) -> str:
        if self.options.text == "question":
            return sample.question
        if self.options.text == "final_answer":
            finals = [m.text for m in sample.messages if m.role == "assistant" and m.text.strip()]
            if finals:
                return finals[-1]
            return " ".join(sample.answer) if isinstance(sample.answer, list) else sample.answer or ""
        parts = []
        for message in sample.messages:
            parts.append(message.text)
            parts.extend(json.dumps(call.arguments, sort_keys=True, ensure_ascii=False) for call in message.tool_calls)
        return "\n".join(parts)

    @property
    def _kind(self) -> str:
        """What the prepared fingerprint depends on: prepared with other options, it is computed again."""
        return json.dumps(self.options.model_dump(exclude={"threshold", "bands"}), sort_keys=True)

    # --- the index, in input order -----------------------------------------------------------------

    def process(self, batch: list[Sample]) -> list[Verdict]:
        verdicts = []
        for sample in batch:
            prepared = sample.meta.get(self.name)
            if not (isinstance(prepared, dict) and prepared.get("kind") == self._kind):
                prepared = self._fingerprint(sample)
            sample.meta.pop(self.name, None)  # the signature is bulky; only a verdict's evidence stays
            if prepared["minhash"] is None:
                verdicts.append(KEEP)
                continue
            match = self._earlier(prepared["digest"], prepared["minhash"])
            if match is None:
                self._add(sample.id, prepared["digest"], prepared["minhash"])
                verdicts.append(KEEP)
                continue
            kept_id, jaccard, exact = match
            jaccard = round(jaccard, 2)  # an estimate from num_perm values: two decimals say all it knows
            sample.meta[self.name] = {"duplicate_of": kept_id, "jaccard": jaccard}
            how = "same after normalisation as" if exact else "near-duplicate of"
            verdicts.append(reject("near_duplicate_text",
                                   f"{self.options.text} {how} sample {kept_id} (estimated Jaccard {jaccard:.2f})"))
        return verdicts

    def _earlier(self, digest: int, minhash: rensa.RMinHash) -> tuple[str, float, bool] | None:
        """The kept sample this one duplicates: (id, estimated Jaccard, whether the normalised texts are equal).
        The exact match when there is one, else the earliest candidate at or above the threshold, else None."""
        if digest in self.exact:
            return self.ids[self.exact[digest]], 1.0, True
        # On templated questions the candidates number in the thousands: they are checked in one vectorised
        # comparison, as counts of equal values against the count the threshold needs (no float mean, no sort).
        candidates = np.array(self.lsh.query(minhash), dtype=np.int64)
        if not candidates.size:
            return None
        equal = np.count_nonzero(self.signatures[candidates] == _low_bits(minhash), axis=1)
        above = np.flatnonzero(equal >= self.values_needed)
        if not above.size:
            return None
        earliest = above[candidates[above].argmin()]
        return self.ids[candidates[earliest]], float(equal[earliest]) / self.options.num_perm, False

    def _add(self, sample_id: str, digest: int, minhash: rensa.RMinHash) -> None:
        position = len(self.ids)
        if position == len(self.signatures):
            self.signatures = np.resize(self.signatures, (2 * position, self.options.num_perm))
        self.signatures[position] = _low_bits(minhash)
        self.ids.append(sample_id)
        self.exact[digest] = position
        self.lsh.insert(position, minhash)

    def state_dict(self) -> dict[str, Any]:
        count = len(self.ids)
        return {"lsh": self.lsh, "signatures": self.signatures[:count].copy(), "ids": list(self.ids),
                "digests": np.fromiter(self.exact, dtype=np.uint64, count=len(self.exact))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lsh = state["lsh"]
        self.ids = list(state["ids"])
        self.signatures = np.zeros((max(1024, 2 * len(self.ids)), self.options.num_perm), dtype=np.uint16)
        self.signatures[: len(self.ids)] = state["signatures"]
        self.exact = {int(digest): position for position, digest in enumerate(state["digests"].tolist())}


def _low_bits(minhash: rensa.RMinHash) -> np.ndarray:
    """A signature as stored in the index: the low 16 bits of each value."""
    return np.asarray(minhash.digest(), dtype=np.uint32).astype(np.uint16)
