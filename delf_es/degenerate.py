"""Degenerate input that must not produce matches: flat image regions and degenerate inlier sets.

Two checks, each cheap and each with a threshold chosen on the verification pairs and training
photos (``benchmarks/degenerate_geometry.py`` -> ``benchmarks/results/degenerate_geometry.json``;
never paris250):

* **Flat keypoints** (:func:`drop_flat_keypoints`).  Keypoints are the top-scoring cells of the
  feature map, so a blank image still gets ``max_feature_num`` of them, all with nearly the same
  descriptor; a blank white PNG and a fully transparent PNG (composited onto white) are the same
  picture and "matched" with 177 inliers.  A keypoint is kept only when the grey-level standard
  deviation of the pixels under its feature-map cell (16 px of the resized pyramid level, i.e.
  ``16 / (scale * resize)`` original px square, centred on the keypoint) is at least
  ``min_keypoint_contrast`` grey levels: there is something there to describe.  A textureless
  image then has no keypoints and matches nothing.
* **Degenerate inliers** (:func:`inlier_spread`, used by :func:`delf_es.verify.estimate_model`).
  A homography fitted to points on one line, or in a spot a few pixels wide, is not evidence of
  the same scene: any such set fits within the RANSAC threshold.  The spread of an inlier set is
  the standard deviation along its minor principal axis (px), and a model whose inliers spread
  less than :func:`spread_threshold` in either image is no model: ``min_inlier_spread`` px, or
  ``min_inlier_spread_fraction`` of the image's short side when that is larger, so the rule
  scales with the image (a spot is a spot at 512 px and at 4000 px).
"""

from __future__ import annotations

import numpy as np

from delf_es.errors import FeatureShapeError
from delf_es.types import Features

__all__ = ["CELL_PX", "degenerate_inliers", "drop_flat_keypoints", "inlier_spread", "keypoint_contrast",
           "keypoint_extent", "spread_threshold"]

#: Stride of the local feature map (px of the resized pyramid level): one keypoint per cell.
CELL_PX = 16


def _grey(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise FeatureShapeError("pixels", "(H, W, 3) uint8", str(pixels.shape))
    return pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def keypoint_contrast(pixels: np.ndarray, keypoints: np.ndarray, half_sizes: np.ndarray) -> np.ndarray:
    """Grey-level standard deviation in a square window around each keypoint.

    Args:
        pixels: (H, W, 3) uint8 RGB, the original image.
        keypoints: (N, 2) (x, y) px in ``pixels``.
        half_sizes: (N,) px, half the window side for each keypoint (clipped to >= 1 px).

    Returns:
        (N,) float64 grey levels (0..~128); windows are clipped at the image border.
    """
    grey = _grey(pixels)
    height, width = grey.shape
    # Integral images of the values and their squares: any window's sum in four lookups.
    s1 = np.zeros((height + 1, width + 1))
    s2 = np.zeros((height + 1, width + 1))
    s1[1:, 1:] = grey.cumsum(0).cumsum(1)
    s2[1:, 1:] = (grey * grey).cumsum(0).cumsum(1)
    points = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    half = np.maximum(np.asarray(half_sizes, dtype=np.float64).reshape(-1), 1.0)
    x0 = np.clip(np.floor(points[:, 0] - half), 0, width - 1).astype(np.int64)
    x1 = np.clip(np.ceil(points[:, 0] + half), x0 + 1, width).astype(np.int64)
    y0 = np.clip(np.floor(points[:, 1] - half), 0, height - 1).astype(np.int64)
    y1 = np.clip(np.ceil(points[:, 1] + half), y0 + 1, height).astype(np.int64)
    area = (x1 - x0) * (y1 - y0)

    def window(s: np.ndarray) -> np.ndarray:
        return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]

    mean = window(s1) / area
    variance = np.maximum(window(s2) / area - mean * mean, 0.0)
    return np.sqrt(variance)


def drop_flat_keypoints(features: Features, pixels: np.ndarray, min_contrast: float, max_image_size: int) -> Features:
    """``features`` without the keypoints whose cell is flat (see the module docstring).

    Args:
        features: extracted from ``pixels``.
        pixels: (H, W, 3) uint8, the image the features were extracted from (original px).
        min_contrast: grey levels; 0 keeps everything.
        max_image_size: px, the longer side the image was resized to before the pyramid
            (``settings.max_image_size``), to size each cell in original px.
    """
    if min_contrast <= 0 or features.num_keypoints == 0:
        return features
    width, height = features.image_size
    resize = min(1.0, max_image_size / max(width, height))
    half = CELL_PX / (2.0 * np.maximum(features.scales.astype(np.float64), 1e-6) * resize)
    keep = keypoint_contrast(pixels, features.keypoints, half) >= min_contrast
    if keep.all():
        return features
    return Features(
        image_id=features.image_id,
        model_id=features.model_id,
        image_size=features.image_size,
        keypoints=features.keypoints[keep],
        scales=features.scales[keep],
        scores=features.scores[keep],
        descriptors=features.descriptors[keep],
        global_desc=features.global_desc,
    )


def inlier_spread(points: np.ndarray) -> float:
    """Standard deviation (px) of (K, 2) points along their minor principal axis: 0 for points
    on a line or at one spot; about ``side / sqrt(12)`` for points filling a square.  0 for K < 3."""
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(array) < 3:
        return 0.0
    centred = array - array.mean(axis=0)
    covariance = centred.T @ centred / len(array)
    return float(np.sqrt(max(np.linalg.eigvalsh(covariance)[0], 0.0)))


def spread_threshold(image_size: tuple[int, int] | None, min_px: float, min_fraction: float) -> float:
    """The smallest inlier spread (px, minor-axis std) a model needs in an image of
    ``image_size`` = (width, height) px: ``max(min_px, min_fraction * short side)``; an unknown
    size (None) leaves ``min_px``."""
    if image_size is None or min_fraction <= 0:
        return float(min_px)
    return max(float(min_px), float(min_fraction) * float(min(image_size)))


def keypoint_extent(keypoints: np.ndarray) -> tuple[int, int] | None:
    """(width, height) px that (N, 2) keypoints span from the origin (max x, max y): a lower bound
    of the image's size, which stands in for it where only the stored keypoints are at hand
    (search), so the fraction rule there is never stricter than with the true size.  None if N = 0."""
    array = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    if not len(array):
        return None
    width, height = np.ceil(np.maximum(array.max(axis=0), 1.0))
    return int(width), int(height)


def degenerate_inliers(
    points_a: np.ndarray,
    points_b: np.ndarray,
    min_px: float,
    min_fraction: float = 0.0,
    sizes: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None),
) -> bool:
    """True when the (K, 2) px inliers in image A or in image B spread less than
    :func:`spread_threshold` of that image (``sizes`` = (A's, B's) (width, height) px, None where
    unknown).  False when both thresholds are 0 (no check)."""
    limits = [spread_threshold(size, min_px, min_fraction) for size in sizes]
    if max(limits) <= 0:
        return False
    return inlier_spread(points_a) < limits[0] or inlier_spread(points_b) < limits[1]
