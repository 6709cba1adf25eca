"""Figures for debugging matches and keypoints (Pillow only, no GUI).

Usage::

    corr = verify(feats_a, feats_b, settings)
    draw_matches(img_a, img_b, feats_a.keypoints, feats_b.keypoints, corr, "pair.png")
    draw_keypoints(img_a, feats_a.keypoints, feats_a.scores, "kp.png")

Layout of :func:`draw_matches`: image A at the left and image B at its right, both
resized to the same height ``min(max_height, max(height_a, height_b))``, separated by a
``GAP_PX`` white column, above a ``CAPTION_PX`` white band with the caption.  Keypoints
are (x, y) px in each ORIGINAL image (as in :class:`~delf_es.types.Features`) and are
scaled with their image.
"""

from __future__ import annotations

import colorsys
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from delf_es.errors import FeatureShapeError, InvalidRequest
from delf_es.types import Correspondences

__all__ = ["CAPTION_PX", "GAP_PX", "draw_keypoints", "draw_matches", "match_caption", "side_by_side"]

logger = logging.getLogger(__name__)

GAP_PX = 8  #: white separator between the two images, px
CAPTION_PX = 28  #: height of the caption band under the images, px
_BACKGROUND = (255, 255, 255)


def _as_rgb(name: str, image: np.ndarray) -> Image.Image:
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 3 and array.shape[2] in (3, 4) or array.ndim == 2):
        raise FeatureShapeError(name, "(H, W, 3) uint8", f"{array.dtype} {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise FeatureShapeError(name, "(H > 0, W > 0, 3) uint8", str(array.shape))
    return Image.fromarray(array).convert("RGB")


def _as_keypoints(name: str, keypoints: np.ndarray) -> np.ndarray:
    array = np.asarray(keypoints, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise FeatureShapeError(name, "(N, 2) px", str(array.shape))
    return array


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _save(image: Image.Image, out_path: str | Path) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    image.save(path, format="PNG" if suffix in ("", ".png") else None)
    return path


def _colours(count: int) -> list[tuple[int, int, int]]:
    """``count`` saturated colours spread around the hue circle."""
    return [
        tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.9, 1.0))
        for k in range(count)
    ]


def side_by_side(
    image_a: np.ndarray, image_b: np.ndarray, max_height: int = 600
) -> tuple[Image.Image, float, float, int]:
    """Place both images at the same height, A left, B right, ``GAP_PX`` apart.

    Args:
        image_a: (H, W, 3) uint8 RGB (also (H, W) grey or (H, W, 4) RGBA).
        image_b: same for image B.
        max_height: px; the common height is ``min(max_height, max(H_a, H_b))``.

    Returns:
        ``(canvas, scale_a, scale_b, offset_b)``: the RGB canvas (caption band
        excluded), the factors from each original image's px to canvas px, and the x
        offset of image B on the canvas, px.
    """
    if max_height < 1:
        raise InvalidRequest(f"max_height must be >= 1 px, got {max_height}")
    pil_a, pil_b = _as_rgb("image_a", image_a), _as_rgb("image_b", image_b)
    height = min(max_height, max(pil_a.height, pil_b.height))
    scale_a, scale_b = height / pil_a.height, height / pil_b.height
    size_a = (max(1, round(pil_a.width * scale_a)), height)
    size_b = (max(1, round(pil_b.width * scale_b)), height)
    offset_b = size_a[0] + GAP_PX
    canvas = Image.new("RGB", (offset_b + size_b[0], height), _BACKGROUND)
    canvas.paste(pil_a.resize(size_a, Image.Resampling.LANCZOS), (0, 0))
    canvas.paste(pil_b.resize(size_b, Image.Resampling.LANCZOS), (offset_b, 0))
    return canvas, scale_a, scale_b, offset_b


def match_caption(correspondences: Correspondences) -> str:
    """Caption of a match figure, e.g. ``"42 inliers / 310 matches (homography)"``."""
    return (
        f"{correspondences.num_inliers} inliers / {len(correspondences.matches)} matches"
        f" ({correspondences.model_kind})"
    )


def draw_matches(
    image_a: np.ndarray,
    image_b: np.ndarray,
    keypoints_a: np.ndarray,
    keypoints_b: np.ndarray,
    correspondences: Correspondences,
    out_path: str | Path,
    max_lines: int = 300,
    max_height: int = 600,
) -> Path:
    """Draw the inlier correspondences of two images as coloured lines and save a PNG.

    Each inlier is a line from its keypoint in A to its keypoint in B with a small
    circle at both ends; outliers are not drawn.  When there are more than
    ``max_lines`` inliers, an evenly spaced subset of ``max_lines`` is drawn (the
    caption still counts all of them).

    Args:
        image_a: (H_a, W_a, 3) uint8 RGB.
        image_b: (H_b, W_b, 3) uint8 RGB.
        keypoints_a: (N, 2) px (x, y) in image A's original frame.
        keypoints_b: (M, 2) px (x, y) in image B's original frame.
        correspondences: matches indexing ``keypoints_a`` / ``keypoints_b`` and their
            inlier mask, as returned by :func:`delf_es.verify.verify`.
        out_path: file to write (PNG unless another image suffix is given); parent
            folders are created.
        max_lines: maximum number of lines drawn (>= 0).
        max_height: px, cap of the common image height.

    Returns:
        ``out_path`` as a Path.  The figure is ``W_a' + GAP_PX + W_b'`` wide and
        ``H' + CAPTION_PX`` tall, where ``H' = min(max_height, max(H_a, H_b))``.

    Raises:
        FeatureShapeError: bad image or keypoint shapes, or a match index out of range.
    """
    kp_a = _as_keypoints("keypoints_a", keypoints_a)
    kp_b = _as_keypoints("keypoints_b", keypoints_b)
    matches = np.asarray(correspondences.matches, dtype=np.int64).reshape(-1, 2)
    mask = np.asarray(correspondences.inlier_mask, dtype=bool).reshape(-1)
    if len(mask) != len(matches):
        raise FeatureShapeError("inlier_mask", f"({len(matches)},) like matches", str(mask.shape))
    if len(matches) and (
        matches.min() < 0 or matches[:, 0].max() >= len(kp_a) or matches[:, 1].max() >= len(kp_b)
    ):
        raise FeatureShapeError(
            "matches", f"indices < ({len(kp_a)}, {len(kp_b)}) keypoints", f"max {matches.max(axis=0).tolist()}"
        )

    canvas, scale_a, scale_b, offset_b = side_by_side(image_a, image_b, max_height)
    figure = Image.new("RGB", (canvas.width, canvas.height + CAPTION_PX), _BACKGROUND)
    figure.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(figure)

    inliers = matches[mask]
    if len(inliers) > max(0, max_lines):
        inliers = inliers[np.linspace(0, len(inliers) - 1, max(0, max_lines)).round().astype(int)]
    width = max(1, round(canvas.height / 400))
    radius = max(2, 2 * width)
    for (i, j), colour in zip(inliers, _colours(len(inliers))):
        xa, ya = kp_a[i] * scale_a
        xb, yb = kp_b[j] * scale_b
        xb += offset_b
        draw.line([(xa, ya), (xb, yb)], fill=colour, width=width)
        for x, y in ((xa, ya), (xb, yb)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=width)

    font_size = max(10, CAPTION_PX - 12)
    draw.text((6, canvas.height + (CAPTION_PX - font_size) // 2), match_caption(correspondences),
              fill=(0, 0, 0), font=_font(font_size))
    path = _save(figure, out_path)
    logger.debug("drew %d of %d inliers to %s", len(inliers), correspondences.num_inliers, path)
    return path


def _score_colour(value: float) -> tuple[int, int, int]:
    """Blue (low, 0) through green to red (high, 1)."""
    r, g, b = colorsys.hsv_to_rgb((1.0 - value) * 2.0 / 3.0, 1.0, 1.0)
    return int(round(255 * r)), int(round(255 * g)), int(round(255 * b))


def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray,
    out_path: str | Path,
    radius: int = 3,
) -> Path:
    """Draw keypoints as circles coloured by score and save the image (same size).

    Scores are min-max normalised to blue (lowest) .. red (highest); equal scores are
    all red.  Higher scores are drawn last, i.e. on top.

    Args:
        image: (H, W, 3) uint8 RGB.
        keypoints: (N, 2) px (x, y) in ``image``.
        scores: (N,) keypoint scores (any range).
        out_path: file to write (PNG unless another image suffix is given).
        radius: circle radius, px.

    Returns:
        ``out_path`` as a Path.
    """
    kp = _as_keypoints("keypoints", keypoints)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(values) != len(kp):
        raise FeatureShapeError("scores", f"({len(kp)},) like keypoints", str(np.shape(scores)))
    figure = _as_rgb("image", image)
    draw = ImageDraw.Draw(figure)
    if len(values):
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        normalised = (values - low) / (high - low) if high > low else np.ones_like(values)
        for k in np.argsort(normalised, kind="stable"):
            x, y = kp[k]
            colour = _score_colour(float(np.clip(np.nan_to_num(normalised[k]), 0.0, 1.0)))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=2)
    return _save(figure, out_path)


def stack_vertically(panels: list[Image.Image], out_path: str | Path) -> Path:
    """Panels one under the other on white, left-aligned, saved as one figure."""
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height
    return _save(sheet, out_path)
