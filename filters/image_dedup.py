"""image_dedup: near-duplicate images across the whole dataset, first occurrence kept."""

from __future__ import annotations

import io
from typing import Any, Literal

import imagehash
from PIL import Image as PILImage
from pydantic import Field

from curate.hashindex import HashIndex
from curate.sample import Sample
from curate.stage import KEEP, Stage, StageContext, StageOptions, Verdict, reject

_HASHES = {"phash": imagehash.phash, "dhash": imagehash.dhash, "ahash": imagehash.average_hash, "whash": imagehash.whash}


class ImageDedup(Stage):
    """Rejects a sample with an image within `max_distance` bits (perceptual hash) of an earlier kept sample's image.

    Reason `duplicate_image`; the detail names the earlier sample, image and distance. The hashes go to
    `meta.image_dedup.hashes`. Stateful: the index sees every row in input order and is saved with each batch.
    """

    name = "image_dedup"
    stateful = True
    batch_size = 256

    class Options(StageOptions):
        hash: Literal["phash", "dhash", "ahash", "whash"] = Field(default="phash", description="imagehash function")
        hash_size: int = Field(default=8, ge=4, le=16, description="hash side; the hash has hash_size^2 bits")
        max_distance: int = Field(default=4, ge=0, le=32, description="largest Hamming distance counted as duplicate")

    def setup(self, context: StageContext) -> None:
        self.index = HashIndex(self.options.max_distance, bits=self.options.hash_size**2)

    def prepare(self, batch: list[Sample]) -> None:
        """Hash in the worker processes; the index, which needs every row in order, stays in the driver."""
        for sample in batch:
            sample.meta[self.name] = {"hash": self._hash_kind, "hashes": self._hex_hashes(sample)}

    def process(self, batch: list[Sample]) -> list[Verdict]:
        hashes = [self._prepared(sample) for sample in batch]
        # Images that do not decode are left to image_integrity; their index stays in the detail.
        decodable = [[(k, h) for k, h in enumerate(values) if h is not None] for values in hashes]
        matches = self.index.dedup_batch(
            [[h for _, h in pairs] for pairs in decodable],
            [[f"{k} of {sample.id}" for k, _ in pairs] for sample, pairs in zip(batch, decodable)],
        )
        verdicts: list[Verdict] = []
        for sample, values, pairs, match in zip(batch, hashes, decodable, matches):
            sample.meta[self.name] = {"hash": self._hash_kind, "hashes": [None if h is None else f"{h:x}" for h in values]}
            if match is None:
                verdicts.append(KEEP)
            else:
                member, earlier, distance = match
                verdicts.append(reject("duplicate_image", f"image {pairs[member][0]} is {distance} bits from image {earlier}"))
        return verdicts

    @property
    def _hash_kind(self) -> str:
        return f"{self.options.hash}-{self.options.hash_size}"

    def _hex_hashes(self, sample: Sample) -> list[str | None]:
        return [None if h is None else f"{h:x}" for h in (self._hash(image.data) for image in sample.images)]

    def _prepared(self, sample: Sample) -> list[int | None]:
        """The sample's hashes: from `prepare` when it ran with these options, else computed now."""
        annotation = sample.meta.get(self.name)
        if isinstance(annotation, dict) and annotation.get("hash") == self._hash_kind:
            hexes = annotation["hashes"]
        else:
            hexes = self._hex_hashes(sample)
        return [None if h is None else int(h, 16) for h in hexes]

    def _hash(self, data: bytes) -> int | None:
        """The perceptual hash as an int; None for an image that does not decode (image_integrity's job)."""
        try:
            with PILImage.open(io.BytesIO(data)) as image:
                bits = _HASHES[self.options.hash](image, hash_size=self.options.hash_size).hash.flatten()
        except Exception:  # any decoding failure: this stage only compares images that decode
            return None
        return int("".join("1" if bit else "0" for bit in bits), 2)

    def state_dict(self) -> dict[str, Any]:
        return self.index.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = HashIndex.from_state_dict(state)
