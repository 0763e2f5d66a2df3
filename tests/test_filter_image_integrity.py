from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage

from curate.sample import Image, ImagePart, Message, Sample, TextPart
from curate.samples.generate import bomb_png
from filters.image_integrity import ImageIntegrity


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


NOISE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
PNG, JPEG = encoded(NOISE, "PNG"), encoded(NOISE, "JPEG")


def sample_with(*images: bytes) -> Sample:
    return Sample("s", "t", [Message("user", [ImagePart(i) for i in range(len(images))] + [TextPart("q")])],
                  [Image(data) for data in images])


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (b"", "empty_image", "0 bytes"),
        (bytes(range(256)) * 4, "unreadable_image", "cannot identify image file"),
        (PNG[: len(PNG) // 2], "truncated_image", "image 1"),
        (JPEG[: len(JPEG) // 2], "truncated_image", "image 1"),
        (bomb_png().data, "decompression_bomb", "could be decompression bomb DOS attack"),
        (bomb_png(10_000, 8_000).data, "image_too_large", "10000x8000 exceeds 50000000 pixels"),
        (encoded(np.zeros((4, 64, 3), np.uint8), "PNG"), "image_too_small", "64x4"),
        (encoded(np.zeros((10, 600, 3), np.uint8), "PNG"), "bad_aspect_ratio", "600x10"),
    ],
    ids=["empty", "random", "png-cut", "jpeg-cut", "bomb", "large", "small", "aspect"],
)
def test_each_defect_is_rejected_with_its_reason(data: bytes, reason: str, detail: str) -> None:
    stage = ImageIntegrity()
    verdict = stage.check(sample_with(PNG, data))
    assert (verdict.keep, verdict.reason) == (False, reason)
    assert detail in verdict.detail and verdict.detail.startswith("image 1")


def test_decompression_bomb_under_the_pixel_option_is_still_caught_by_pillow() -> None:
    # With a huge max_pixels only Pillow's own bomb guard stands between us and decoding 10^10 pixels.
    stage = ImageIntegrity(ImageIntegrity.Options(max_pixels=10**12))
    verdict = stage.check(sample_with(bomb_png().data))
    assert (verdict.keep, verdict.reason) == (False, "decompression_bomb")


def test_sound_images_and_imageless_samples_are_kept() -> None:
    stage = ImageIntegrity()
    assert stage.check(sample_with(PNG, JPEG)).keep
    assert stage.check(Sample("s", "t", [Message("user", [TextPart("no image")])])).keep


def test_reference_to_an_image_the_sample_lacks() -> None:
    sample = Sample("s", "t", [Message("user", [ImagePart(3), TextPart("q")])], [Image(PNG)])
    verdict = ImageIntegrity().check(sample)
    assert (verdict.keep, verdict.reason) == (False, "missing_image")
