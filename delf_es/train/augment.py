"""DELF-style training views: a square crop around the centre, randomly rescaled.

DELF trains attention on centre-cropped images rescaled by a random factor so the scores
work at every pyramid scale.  Here each view is a square crop whose side is a random
fraction of the image's short side (jittered around the centre), resized to one of a few
square sizes (multiples of 32, so views of one size batch together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view.

    Attributes:
        crop: (left, top, side) px of the square crop in the original image.
        size: side of the resized view, px (multiple of 32).
    """

    crop: tuple[int, int, int]
    size: int


def sample_views(
    width: int, height: int, count: int, sizes: tuple[int, ...], crop_range: tuple[float, float], rng: np.random.Generator
) -> list[ViewSpec]:
    """``count`` random views of a (width, height) image."""
    short = min(width, height)
    views = []
    for _ in range(count):
        side = max(8, int(round(short * rng.uniform(*crop_range))))
        # jitter up to half of the free margin on each axis: crops stay around the centre
        max_dx, max_dy = (width - side) / 2, (height - side) / 2
        left = int(round(max_dx + rng.uniform(-0.5, 0.5) * max_dx))
        top = int(round(max_dy + rng.uniform(-0.5, 0.5) * max_dy))
        views.append(ViewSpec((left, top, side), int(rng.choice(sizes))))
    return views


def render_view(pixels: np.ndarray, view: ViewSpec) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 crop (antialiased resize)."""
    left, top, side = view.crop
    crop = Image.fromarray(pixels[top : top + side, left : left + side])
    return np.asarray(crop.resize((view.size, view.size), Image.Resampling.BICUBIC, reducing_gap=None))
