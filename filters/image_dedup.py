"""image_dedup: near-duplicate images across the whole dataset, first occurrence kept."""

from __future__ import annotations

from typing import Any

from curate.hashindex import HashIndex
from curate.images import PerceptualHashOptions, perceptual_hash
from curate.sample import Sample
from curate.stage import KEEP, Stage, StageContext, Verdict, reject

class ImageDedup(Stage):
    """Rejects a sample with an image within `max_distance` bits of an image of an earlier kept sample.

    Images are compared by perceptual hash across the whole dataset; the first occurrence is kept.

    Reason `duplicate_image`; the detail names this sample's image, the earlier sample and its image, and the
    distance. Identical images inside one sample do not make it a duplicate of itself. Images that do not
    decode are skipped here (image_integrity rejects them) and listed in `meta.image_dedup.undecodable`.
    `meta.image_dedup.hashes` holds every image's hash in hex (None where undecodable; imagehash's
    `hex_to_hash` reads them back). Stateful: the index (curate/hashindex.py, multi-index hashing) sees every
    row in input order and is saved with each batch; the hashing itself runs in the workers (`prepare`).
    """

    name = "image_dedup"
    reasons = {"duplicate_image": "an image within `max_distance` bits of an image of an earlier kept sample"}
    stateful = True
    batch_size = 256

    class Options(PerceptualHashOptions):
        """The hash and the largest distance counted as a duplicate: decontaminate compares images by them too."""

    def setup(self, context: StageContext) -> None:
        self.index = HashIndex(self.options.max_distance, bits=self.options.hash_size**2)

    def prepare(self, batch: list[Sample]) -> None:
        """Hash in the worker processes; the index, which needs every row in order, stays in the driver."""
        for sample in batch:
            sample.meta[self.name] = {"hash": self._hash_kind, "hashes": self._hashes(sample)}

    def process(self, batch: list[Sample]) -> list[Verdict]:
        hexes = [self._prepared(sample) for sample in batch]
        decodable = [[k for k, value in enumerate(values) if value is not None] for values in hexes]
        matches = self.index.dedup_batch(
            [[int(values[k], 16) for k in indices] for values, indices in zip(hexes, decodable)],
            [[f"image {k} of sample {sample.id}" for k in indices] for sample, indices in zip(batch, decodable)],
        )
        verdicts: list[Verdict] = []
        for sample, values, indices, match in zip(batch, hexes, decodable, matches):
            annotation: dict[str, Any] = {"hash": self._hash_kind, "hashes": values}
            if len(indices) < len(values):
                annotation["undecodable"] = [k for k, value in enumerate(values) if value is None]
            sample.meta[self.name] = annotation
            if match is None:
                verdicts.append(KEEP)
            else:
                member, earlier, distance = match
                verdicts.append(reject("duplicate_image", f"image {indices[member]} is {distance} bits from {earlier}"))
        return verdicts

    @property
    def _hash_kind(self) -> str:
        return f"{self.options.hash}-{self.options.hash_size}"

    def _prepared(self, sample: Sample) -> list[str | None]:
        """The sample's hashes: from `prepare` when it ran with these options, else computed now."""
        annotation = sample.meta.get(self.name)
        if isinstance(annotation, dict) and annotation.get("hash") == self._hash_kind:
            return annotation["hashes"]
        return self._hashes(sample)

    def _hashes(self, sample: Sample) -> list[str | None]:
        return [self._hash(image.data) for image in sample.images]

    def _hash(self, data: bytes) -> str | None:
        return perceptual_hash(data, self.options.hash, self.options.hash_size)

    def state_dict(self) -> dict[str, Any]:
        return self.index.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = HashIndex.from_state_dict(state)
