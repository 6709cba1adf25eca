"""The small JPEG stored with each image, so a page can show hits without the original files.

Longer side at most :data:`MAX_SIDE` px and at most :data:`MAX_BYTES` bytes: the quality steps
down until it fits (a detailed 256 px photo is ~8-14 KB at quality 80).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_SIDE = 256
MAX_BYTES = 16 * 1024
_QUALITIES = (80, 70, 60, 50, 40, 30)


def make_thumbnail(pixels: np.ndarray) -> bytes:
    """JPEG bytes of (H, W, 3) uint8 RGB ``pixels``, longer side <= 256 px, <= 16 KB."""
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    data = b""
    for side in (MAX_SIDE, 192, 128):  # a pathological (noise) image may need a smaller side too
        if max(image.size) > side:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
        for quality in _QUALITIES:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality, optimize=True)
            data = buffer.getvalue()
            if len(data) <= MAX_BYTES:
                return data
    return data
