from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFile

from curate.sample import Image, ImagePart, Message, Sample, TextPart
from curate.filters.image_integrity import ImageIntegrity


def encode(image: PILImage.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def chart() -> PILImage.Image:
    image = PILImage.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    for k, height in enumerate([30, 80, 55, 100]):
        draw.rectangle([15 + 35 * k, 110 - height, 40 + 35 * k, 110], fill=(40 * k, 90, 200 - 40 * k))
    draw.line([10, 110, 150, 110], fill="black", width=2)
    return image


def text_image() -> PILImage.Image:
    image = PILImage.new("L", (200, 60), 255)
    ImageDraw.Draw(image).text((8, 20), "Total: 42.50 EUR", fill=0)
    return image


def noise(height: int = 64, width: int = 64) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG with a valid header that claims width x height, and almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PNG, JPEG = encode(noise(), "PNG"), encode(noise(), "JPEG")


def sample_with(*images: bytes) -> Sample:
    return Sample("s", "t", [Message("user", [ImagePart(i) for i in range(len(images))] + [TextPart("q")])],
                  [Image(data) for data in images])


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (b"", "empty_image", "image 1 (png): 0 bytes"),
        (np.random.default_rng(1).bytes(3000), "unreadable_image", "cannot identify image file (starts with b'"),
        (PNG[: len(PNG) // 2], "truncated_image", "image 1 (png): OSError: image file is truncated"),
        (JPEG[: len(JPEG) // 2], "truncated_image", "image 1 (png): OSError: image file is truncated ("),
        (JPEG[:300], "truncated_image", "Truncated File Read"),
        # Flipped bytes inside the compressed pixel data: the file is complete but does not decode.
        (PNG[:200] + bytes(b ^ 0xFF for b in PNG[200:260]) + PNG[260:], "unreadable_image",
         "OSError: unrecognized data stream contents"),
        # Over 2x Pillow's pixel limit: its DecompressionBombError, raised from the header alone.
        (png_claiming(100_000, 100_000), "decompression_bomb", "10000000000 pixels) exceeds limit"),
        # Between 1x and 2x the limit Pillow only warns; the warning counts as a bomb too.
        (png_claiming(10_000, 10_000), "decompression_bomb", "100000000 pixels) exceeds limit of 89478485"),
        # Too large for max_pixels: rejected from the header (decoding it would report truncation instead).
        (png_claiming(8_000, 8_000), "image_too_large", "8000x8000 exceeds 50000000 pixels"),
        (encode(noise(4, 64), "PNG"), "image_too_small", "64x4 has a side under 8 px"),
        (encode(noise(10, 600), "PNG"), "bad_aspect_ratio", "600x10 is more than 50.0:1"),
    ],
    ids=["empty", "random", "png-half", "jpeg-half", "jpeg-header-cut", "png-corrupt", "bomb-error", "bomb-warning",
         "large", "small", "aspect"],
)
def test_each_defect_is_rejected_with_its_reason_and_the_image_index(data: bytes, reason: str, detail: str) -> None:
    verdict = ImageIntegrity().check(sample_with(PNG, data))
    assert (verdict.keep, verdict.reason) == (False, reason)
    assert verdict.detail.startswith("image 1 (png): ") and detail in verdict.detail


def test_bombs_are_caught_even_when_max_pixels_allows_them() -> None:
    # With a huge max_pixels only Pillow's guard stands between the check and decoding 10^8 pixels.
    stage = ImageIntegrity(ImageIntegrity.Options(max_pixels=10**12))
    assert stage.check(sample_with(png_claiming(10_000, 10_000))).reason == "decompression_bomb"


def test_truncation_is_caught_even_if_the_process_tolerates_truncated_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it, process-wide
    with PILImage.open(io.BytesIO(JPEG[: len(JPEG) // 2])) as image:
        image.load()  # Pillow itself now accepts the cut-off file, padding it with grey
    assert ImageIntegrity().check(sample_with(JPEG[: len(JPEG) // 2])).reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's setting is left as it was


def test_pillow_global_state_is_left_alone() -> None:
    filters_before = list(warnings.filters)
    ImageIntegrity().check(sample_with(png_claiming(10_000, 10_000), PNG[:100]))
    assert warnings.filters == filters_before and ImageFile.LOAD_TRUNCATED_IMAGES is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PILImage.open(io.BytesIO(png_claiming(10_000, 10_000)))  # outside the check Pillow only warns, as before
    assert [w.category for w in caught] == [PILImage.DecompressionBombWarning]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_sound_images_are_kept(fmt: str) -> None:
    pictures = [chart(), text_image(), noise()]
    images = [encode(picture.convert("RGB") if fmt == "JPEG" else picture, fmt) for picture in pictures]
    assert ImageIntegrity().check(sample_with(*images)).keep


def test_sample_without_images_is_kept() -> None:
    assert ImageIntegrity().check(Sample("s", "t", [Message("user", [TextPart("no image here")])])).keep


def test_size_options_are_honoured() -> None:
    tall_receipt = encode(noise(1200, 40), "PNG")  # 30:1
    assert ImageIntegrity().check(sample_with(tall_receipt)).keep
    verdict = ImageIntegrity(ImageIntegrity.Options(max_aspect_ratio=20)).check(sample_with(tall_receipt))
    assert (verdict.reason, verdict.detail) == ("bad_aspect_ratio", "image 0 (png): 40x1200 is more than 20.0:1")
    assert ImageIntegrity(ImageIntegrity.Options(max_pixels=4000)).check(sample_with(PNG)).reason == "image_too_large"
    assert ImageIntegrity(ImageIntegrity.Options(min_side=65)).check(sample_with(PNG)).reason == "image_too_small"


def test_reference_to_an_image_the_sample_lacks() -> None:
    sample = Sample("s", "t", [Message("user", [TextPart("q")]), Message("assistant", [ImagePart(3), TextPart("a")])],
                    [Image(PNG)])
    verdict = ImageIntegrity().check(sample)
    assert (verdict.keep, verdict.reason) == (False, "missing_image")
    assert verdict.detail == "message 1 shows image 3; the sample has 1"
