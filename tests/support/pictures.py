"""Small distinct pictures for the tests and the benchmarks."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A small distinct picture: a grid of shaded cells whose pattern depends on the seed."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cell = size // 4
    for k in range(16):
        if (seed >> k) & 1 or (seed * 7 + k) % 5 == 0:
            x, y = (k % 4) * cell, (k // 4) * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=((seed * 37) % 256, (k * 53) % 256, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
