"""image_integrity: every image decodes fully and has a sane size."""

from __future__ import annotations

import io

from PIL import Image as PILImage
from pydantic import Field

from curate.images import missing_image, strict_decoding
from curate.sample import Sample
from curate.stage import KEEP, Stage, StageOptions, Verdict, reject


class ImageIntegrity(Stage):
    """Rejects samples with an image that is empty, unreadable, truncated, a decompression bomb, or of absurd size.

    Reasons (the detail starts with `image N (format):` and gives the defect, with Pillow's message):
    `empty_image` (0 bytes), `unreadable_image` (no format Pillow reads, or a decoder error),
    `truncated_image` (the data ends before the pixels do), `decompression_bomb` (Pillow's bomb guard),
    `image_too_large` (> `max_pixels`), `image_too_small` (a side < `min_side`), `bad_aspect_ratio`
    (> `max_aspect_ratio`), and `missing_image` (a message shows an image index the sample lacks).
    The size comes from the header before any pixel is decoded, so a bomb is never decompressed; then the
    image is fully loaded, whatever the process set `ImageFile.LOAD_TRUNCATED_IMAGES` to. Samples without
    images are kept.
    """

    name = "image_integrity"
    reasons = {
        "empty_image": "an image of 0 bytes",
        "unreadable_image": "no format Pillow reads, or a decoder error",
        "truncated_image": "the data ends before the pixels do",
        "decompression_bomb": "Pillow's decompression-bomb guard tripped (read from the header, never decoded)",
        "image_too_large": "more than `max_pixels` pixels",
        "image_too_small": "a side shorter than `min_side`",
        "bad_aspect_ratio": "long side / short side above `max_aspect_ratio`",
        "missing_image": "a message shows an image index the sample lacks",
    }
    batch_size = 64

    class Options(StageOptions):
        max_pixels: int = Field(default=50_000_000, gt=0, description="most pixels (width x height) an image may have")
        min_side: int = Field(default=8, gt=0, description="smallest width or height allowed, in pixels")
        max_aspect_ratio: float = Field(default=50.0, ge=1, description="largest long side / short side")

    def check(self, sample: Sample) -> Verdict:
        missing = missing_image(sample)
        if missing is not None:
            return missing
        for index, image in enumerate(sample.images):
            verdict = self.check_image(image.data)
            if not verdict.keep:
                return reject(verdict.reason, f"image {index} ({image.format}): {verdict.detail}")
        return KEEP

    def check_image(self, data: bytes) -> Verdict:
        if not data:
            return reject("empty_image", "0 bytes")
        try:
            with strict_decoding(), PILImage.open(io.BytesIO(data)) as image:
                size = self._check_size(*image.size)
                if not size.keep:
                    return size
                image.load()
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
            return reject("decompression_bomb", str(exc))
        except PILImage.UnidentifiedImageError:
            # Pillow's message names the buffer's address; the first bytes say more and are reproducible.
            return reject("unreadable_image", f"cannot identify image file (starts with {data[:8]!r})")
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, EOFError, ...
            # A cut-off file reads "image file is truncated (...)" or "Truncated File Read" depending on the plugin.
            reason = "truncated_image" if "truncated" in str(exc).lower() else "unreadable_image"
            return reject(reason, f"{type(exc).__name__}: {exc}")
        return KEEP

    def _check_size(self, width: int, height: int) -> Verdict:
        options = self.options
        if width * height > options.max_pixels:
            return reject("image_too_large", f"{width}x{height} exceeds {options.max_pixels} pixels")
        if min(width, height) < options.min_side:
            return reject("image_too_small", f"{width}x{height} has a side under {options.min_side} px")
        if max(width, height) / min(width, height) > options.max_aspect_ratio:
            return reject("bad_aspect_ratio", f"{width}x{height} is more than {options.max_aspect_ratio}:1")
        return KEEP
