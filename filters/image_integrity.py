"""image_integrity: every image decodes fully and has a sane size."""

from __future__ import annotations

import io
import warnings

from PIL import Image as PILImage
from pydantic import Field

from curate.sample import Sample
from curate.stage import KEEP, Stage, StageOptions, Verdict, reject


class ImageIntegrity(Stage):
    """Rejects samples with an image that is empty, unreadable, truncated, a decompression bomb, or of absurd size.

    Reasons: `empty_image`, `unreadable_image`, `truncated_image`, `decompression_bomb`, `image_too_large`,
    `image_too_small`, `bad_aspect_ratio`, `missing_image` (a message shows an image the sample lacks).
    The size is read from the header before anything is decoded, so a bomb is never decompressed.
    """

    name = "image_integrity"
    batch_size = 64

    class Options(StageOptions):
        max_pixels: int = Field(default=50_000_000, gt=0, description="most pixels (width x height) an image may have")
        min_side: int = Field(default=8, gt=0, description="smallest width or height allowed")
        max_aspect_ratio: float = Field(default=50.0, gt=1, description="largest long side / short side")

    def check(self, sample: Sample) -> bool | Verdict:
        for message_index, message in enumerate(sample.messages):
            for index in message.image_indices:
                if not 0 <= index < len(sample.images):
                    return reject("missing_image", f"message {message_index} shows image {index}; the sample has {len(sample.images)}")
        for index, image in enumerate(sample.images):
            verdict = self.check_image(image.data)
            if not verdict.keep:
                return reject(verdict.reason, f"image {index} ({image.format}): {verdict.detail}")
        return KEEP

    def check_image(self, data: bytes) -> Verdict:
        if not data:
            return reject("empty_image", "0 bytes")
        options = self.options
        try:
            with warnings.catch_warnings():
                # Pillow warns before it errors on bombs; a warning-sized image is a bomb here too.
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                with PILImage.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    if width * height > options.max_pixels:
                        return reject("image_too_large", f"{width}x{height} exceeds {options.max_pixels} pixels")
                    if min(width, height) < options.min_side:
                        return reject("image_too_small", f"{width}x{height} has a side under {options.min_side} px")
                    if max(width, height) / min(width, height) > options.max_aspect_ratio:
                        return reject("bad_aspect_ratio", f"{width}x{height} exceeds {options.max_aspect_ratio}:1")
                    image.load()
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
            return reject("decompression_bomb", str(exc))
        except PILImage.UnidentifiedImageError:
            # Pillow's message names the BytesIO object's address; keep details reproducible across runs.
            return reject("unreadable_image", "cannot identify image file: no format Pillow reads")
        except (OSError, SyntaxError, ValueError) as exc:
            # Pillow reports a cut-off file as OSError "image file is truncated" or "... broken data stream".
            reason = "truncated_image" if "truncated" in str(exc) or "broken" in str(exc) else "unreadable_image"
            return reject(reason, str(exc))
        return KEEP
