"""Image helpers the stages share: strict decoding, perceptual hashes and the options that choose them, and the
check that every image a message shows exists."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import imagehash
from PIL import Image as PILImage
from PIL import ImageFile
from pydantic import Field, ValidationInfo, field_validator

from curate.sample import Sample
from curate.stage import StageOptions, Verdict, reject


@contextmanager
def strict_decoding() -> Iterator[None]:
    """Decode strictly whatever the process has set: a cut-off file raises instead of being padded with grey
    (`ImageFile.LOAD_TRUNCATED_IMAGES`, which some libraries switch on), and Pillow's decompression-bomb
    warning raises like its error. Both are restored on exit."""
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


def missing_image(sample: Sample) -> Verdict | None:
    """A `missing_image` rejection when a message shows an image index the sample does not have."""
    for message_index, message in enumerate(sample.messages):
        for index in message.image_indices:
            if not 0 <= index < len(sample.images):
                return reject("missing_image", f"message {message_index} shows image {index}; "
                                               f"the sample has {len(sample.images)}")
    return None


HASHES = {"phash": imagehash.phash, "dhash": imagehash.dhash, "ahash": imagehash.average_hash, "whash": imagehash.whash}


class PerceptualHashOptions(StageOptions):
    """How images are hashed and compared: image_dedup's options, shared by decontaminate's image check."""

    hash: Literal["phash", "dhash", "ahash", "whash"] = Field(default="phash", description="imagehash function")
    hash_size: int = Field(default=8, ge=2, le=8, description="hash grid side: hash_size^2 bits, at most 64")
    max_distance: int = Field(default=4, ge=0, description="largest Hamming distance counted as a duplicate")

    @field_validator("hash_size")
    @classmethod
    def _whash_needs_power_of_two(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("hash") == "whash" and value & (value - 1):
            raise ValueError("whash needs a power of two")
        return value

    @field_validator("max_distance")
    @classmethod
    def _below_hash_bits(cls, value: int, info: ValidationInfo) -> int:
        bits = info.data.get("hash_size", 8) ** 2
        if value >= bits:
            raise ValueError(f"must be below the hash's {bits} bits")
        return value


def perceptual_hash(data: bytes, kind: str, hash_size: int) -> str | None:
    """The perceptual hash in hex; None for an image that does not decode (image_integrity's concern)."""
    try:
        with strict_decoding(), PILImage.open(io.BytesIO(data)) as image:
            return str(HASHES[kind](image, hash_size=hash_size))
    except Exception:  # noqa: BLE001 - Pillow raises a zoo of types on broken files; only images that decode count
        return None


def image_hash(data: bytes) -> str | None:
    """The default pHash of an observation image (recorded or produced by re-executed code), decoded leniently."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            return str(imagehash.phash(image))
    except Exception:  # an image the code wrote that does not decode compares as different from anything
        return None
