"""Descriptor matching and geometric verification (RANSAC) of two images.

Usage::

    matches = match_descriptors(feats_a.descriptors, feats_b.descriptors, max_distance=0.9, mutual=True)
    model, inliers = estimate_model(pts_a, pts_b, "homography", px_threshold=12.0,
                                    confidence=0.999, max_iters=2000, seed=0)
    corr = verify(feats_a, feats_b, settings)          # function form
    corr = Verifier.from_settings(settings)(feats_a, feats_b)  # module form, same result

Conventions:
    * Points are (x, y) px in each image's ORIGINAL pixel frame (as in :class:`Features`).
    * Models map image A to image B: ``x_b ~ H @ x_a`` (homography, affine), and
      ``x_b^T F x_a = 0`` (fundamental matrix), in homogeneous coordinates.
    * "No match" is an empty ``(0, 2)`` int64 array and "no model" is ``None`` with an
      all-False inlier mask; nothing here returns ``None`` in place of an array.

Determinism (pydegensac 0.3.0, OpenCV 5.0, measured):
    * pydegensac's ``seed=-1`` (its default) seeds from the clock: results change from
      one second to the next.  Any ``seed >= 0`` gives identical inliers and model run to
      run and across processes, and different seeds give different samples.  We pass
      ``seed`` through (negative seed = pydegensac's clock seed, i.e. NOT reproducible).
    * ``cv2.estimateAffine2D(method=cv2.RANSAC)`` draws its samples from an RNG it seeds
      with a constant on every call, so it is deterministic whatever
      ``cv2.setRNGSeed`` says; we still call ``cv2.setRNGSeed(seed)`` (for ``seed >= 0``)
      so a future OpenCV that uses the global RNG stays reproducible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pydegensac

from delf_es.degenerate import degenerate_inliers
from delf_es.errors import FeatureShapeError, InvalidRequest
from delf_es.types import Correspondences, Features

if TYPE_CHECKING:  # pragma: no cover
    from delf_es.settings import Settings

__all__ = [
    "MIN_CORRESPONDENCES",
    "MODEL_KINDS",
    "Verifier",
    "estimate_model",
    "match_descriptors",
    "reprojection_errors",
    "scale_consistent",
    "verify",
]

logger = logging.getLogger(__name__)

#: Minimal sample size of each model kind; fewer correspondences -> no model.
MIN_CORRESPONDENCES: dict[str, int] = {"homography": 4, "fundamental": 8, "affine": 3, "homography-magsac": 4}
MODEL_KINDS: tuple[str, ...] = tuple(MIN_CORRESPONDENCES)

# Distance-matrix entries computed per block (float32: 64 MB).  1000 x 1000 is one block.
_BLOCK_ELEMENTS = 1 << 24
# pydegensac's seed is a C int.
_MAX_SEED = 2**31 - 1


def _no_match() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def _as_descriptors(name: str, desc: np.ndarray) -> np.ndarray:
    array = np.asarray(desc)
    if array.ndim != 2 or (array.size and not np.issubdtype(array.dtype, np.floating)):
        raise FeatureShapeError(name, "(N, D) float array", f"{array.dtype} {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise FeatureShapeError(name, "finite values", "NaN or inf")
    return array


def _as_points(name: str, points: np.ndarray) -> np.ndarray:
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] != 2:
        raise FeatureShapeError(name, "(K, 2) px", str(array.shape))
    return np.ascontiguousarray(array, dtype=np.float64)


def match_descriptors(desc_a: np.ndarray, desc_b: np.ndarray, max_distance: float, mutual: bool) -> np.ndarray:
    """Nearest-neighbour matching of local descriptors by L2 distance.

    Each row of A is paired with its nearest row of B (ties: lowest index) and kept when
    their L2 distance is strictly below ``max_distance`` (the rule of DELF's cKDTree
    ``distance_upper_bound``).  With ``mutual``, the pair is also kept only when A's row
    is in turn B's row's nearest neighbour in A; without it several rows of A may match
    the same row of B.

    Distances are exact L2 (``|a|^2 + |b|^2 - 2 a.b``, float32), so non-unit descriptors
    are matched correctly too; for unit descriptors ``d^2 = 2 - 2 cos``.  Computed as
    a blocked matrix product: for N = M = 1000 it is 3-30x faster than two cKDTrees
    (D = 40: ~6 ms vs ~15 ms; D = 128: ~6 ms vs ~45 ms; D = 1024: ~12 ms vs ~370 ms).

    Args:
        desc_a: (N, D) float descriptors of image A (float32 unit vectors normally).
        desc_b: (M, D) float descriptors of image B.
        max_distance: L2 distance threshold (unitless, 0..2 for unit vectors).
        mutual: keep only mutual nearest neighbours.

    Returns:
        (K, 2) int64 ``[index into A, index into B]`` sorted by A's index; (0, 2) when
        either side is empty or nothing is close enough.

    Raises:
        FeatureShapeError: an input is not 2-D, has non-finite values, or the two
            descriptor dimensions differ.
    """
    a = _as_descriptors("desc_a", desc_a)
    b = _as_descriptors("desc_b", desc_b)
    if len(a) == 0 or len(b) == 0:
        return _no_match()
    if a.shape[1] != b.shape[1]:
        raise FeatureShapeError("desc_b", f"(M, {a.shape[1]}) like desc_a", str(b.shape))

    n, m = len(a), len(b)
    sq_a = np.einsum("ij,ij->i", a, a)
    sq_b = np.einsum("ij,ij->i", b, b)
    nn_ab = np.empty(n, dtype=np.int64)
    d2_ab = np.empty(n, dtype=np.float32)
    best_ba = np.full(m, np.inf, dtype=np.float32)
    nn_ba = np.zeros(m, dtype=np.int64)
    cols = np.arange(m)
    rows_per_block = max(1, _BLOCK_ELEMENTS // m)
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        d2 = a[start:stop] @ b.T  # (r, m) dot products, overwritten in place
        d2 *= -2.0
        d2 += sq_b[None, :]
        d2 += sq_a[start:stop, None]
        j = d2.argmin(axis=1)
        nn_ab[start:stop] = j
        d2_ab[start:stop] = d2[np.arange(stop - start), j]
        if mutual:
            i = d2.argmin(axis=0)
            value = d2[i, cols]
            better = value < best_ba  # strict: earlier blocks win ties, like argmin
            best_ba[better] = value[better]
            nn_ba[better] = i[better] + start

    keep = np.sqrt(np.maximum(d2_ab, 0.0)) < max_distance
    if mutual:
        keep &= nn_ba[nn_ab] == np.arange(n)
    idx_a = np.flatnonzero(keep)
    return np.stack([idx_a, nn_ab[idx_a]], axis=1).astype(np.int64, copy=False)


def _check_params(kind: str, px_threshold: float, confidence: float, max_iters: int) -> None:
    if kind not in MIN_CORRESPONDENCES:
        raise InvalidRequest(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not px_threshold > 0:
        raise InvalidRequest(f"px_threshold must be > 0 px, got {px_threshold}")
    if not 0 < confidence < 1:
        raise InvalidRequest(f"confidence must be in (0, 1), got {confidence}")
    if int(max_iters) < 1:
        raise InvalidRequest(f"max_iters must be >= 1, got {max_iters}")


def _degensac_seed(seed: int) -> int:
    return -1 if seed < 0 else int(seed) % (_MAX_SEED + 1)


def _fit(kind: str, pa: np.ndarray, pb: np.ndarray, px: float, conf: float, iters: int, seed: int):
    """Run one estimator on finite points; returns (model or None, mask)."""
    if kind == "homography":
        model, mask = pydegensac.findHomography(pa, pb, px, conf, iters, seed=_degensac_seed(seed))
    elif kind == "fundamental":
        model, mask = pydegensac.findFundamentalMatrix(pa, pb, px, conf, iters, seed=_degensac_seed(seed))
    elif kind == "homography-magsac":
        # OpenCV's USAC draws from its own generator seeded by UsacParams.randomGeneratorState
        # (0 unless set), so the same points give the same inliers whatever ``seed`` says.
        model, mask = cv2.findHomography(
            pa, pb, cv2.USAC_MAGSAC, px, maxIters=iters, confidence=conf
        )
    else:
        if seed >= 0:
            cv2.setRNGSeed(int(seed) % (_MAX_SEED + 1))
        affine, mask = cv2.estimateAffine2D(
            pa, pb, method=cv2.RANSAC, ransacReprojThreshold=px, maxIters=iters, confidence=conf
        )
        if affine is None or mask is None:
            return None, None
        model = np.vstack([affine, [0.0, 0.0, 1.0]])
    return model, mask


def estimate_model(
    points_a: np.ndarray,
    points_b: np.ndarray,
    kind: str,
    px_threshold: float,
    confidence: float,
    max_iters: int,
    seed: int,
    min_spread_px: float = 0.0,
    *,
    min_spread_fraction: float = 0.0,
    image_sizes: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None),
) -> tuple[np.ndarray | None, np.ndarray]:
    """Robustly fit a model mapping ``points_a`` to ``points_b``.

    ``"homography"`` and ``"fundamental"`` use pydegensac (DEGENSAC with local
    optimisation, Sampson-type error); ``"homography-magsac"`` uses OpenCV's
    ``cv2.findHomography(method=cv2.USAC_MAGSAC)`` (MAGSAC++, ``px_threshold`` as its
    maximum sigma; deterministic); ``"affine"`` uses
    ``cv2.estimateAffine2D(method=cv2.RANSAC)`` (reprojection error) with its default
    Levenberg-Marquardt refinement.  Rows with non-finite coordinates are never inliers; the
    result does not depend on the order of the rows (they are fitted in coordinate order).

    Args:
        points_a: (K, 2) px (x, y) in image A.
        points_b: (K, 2) px (x, y) in image B; row k corresponds to row k of A.
        kind: "homography", "fundamental", "affine" or "homography-magsac".
        px_threshold: inlier threshold, px.
        confidence: RANSAC confidence in (0, 1) (early stop).
        max_iters: maximum RANSAC iterations.
        seed: >= 0 for reproducible sampling; < 0 lets pydegensac seed from the clock.
        min_spread_px: a model whose inliers spread less than this (minor-axis std, px) in
            either image is degenerate (a line, a spot) and reported as no model
            (:func:`delf_es.degenerate.inlier_spread`); 0 = no check.
        min_spread_fraction: the same, as a fraction of each image's short side (the larger of
            the two thresholds applies; :func:`delf_es.degenerate.spread_threshold`); 0 = none.
        image_sizes: (A's, B's) (width, height) px for ``min_spread_fraction``; None where
            unknown (that image then needs only ``min_spread_px``).

    Returns:
        ``(model, inlier_mask)``: model is (3, 3) float64 (homography normalised to
        ``H[2, 2] = 1``, affine with last row ``[0, 0, 1]``, fundamental with unit
        Frobenius norm) or None when fewer than ``MIN_CORRESPONDENCES[kind]`` usable
        correspondences exist or no model was found (degenerate points); inlier_mask is
        (K,) bool, all False when the model is None.

    Raises:
        FeatureShapeError: points are not (K, 2) or their K differ.
        ValueError: unknown kind or out-of-range parameter.
    """
    _check_params(kind, px_threshold, confidence, max_iters)
    pa = _as_points("points_a", points_a)
    pb = _as_points("points_b", points_b)
    if len(pa) != len(pb):
        raise FeatureShapeError("points_b", f"({len(pa)}, 2) like points_a", str(pb.shape))
    k = len(pa)
    inliers = np.zeros(k, dtype=bool)
    finite = np.isfinite(pa).all(axis=1) & np.isfinite(pb).all(axis=1)
    if int(finite.sum()) < MIN_CORRESPONDENCES[kind]:
        return None, inliers

    # RANSAC's samples are drawn by row index, so the same correspondences in another order give
    # other inliers: fit them in one canonical order (by coordinates) so that equal keypoint sets
    # give equal results whatever order extraction stored them in (near-tied scores swap places
    # between runtimes; benchmarks/results/checks/openvino-vs-torch.json).
    rows = np.flatnonzero(finite)
    rows = rows[np.lexsort((pb[rows, 1], pb[rows, 0], pa[rows, 1], pa[rows, 0]))]
    try:
        model, mask = _fit(
            kind, pa[rows], pb[rows], float(px_threshold), float(confidence), int(max_iters), int(seed)
        )
    except (cv2.error, np.linalg.LinAlgError, ValueError) as exc:  # degenerate sample sets
        logger.debug("%s estimation failed on %d points: %s", kind, k, exc)
        return None, inliers
    if model is None or mask is None:
        return None, inliers
    model = np.asarray(model, dtype=np.float64)
    mask = np.asarray(mask).reshape(-1).astype(bool)
    if model.shape != (3, 3) or not np.isfinite(model).all() or not np.abs(model).sum() > 0 or not mask.any():
        return None, inliers
    if kind == "fundamental":
        model = model / np.linalg.norm(model)
    elif abs(model[2, 2]) > 1e-12:
        model = model / model[2, 2]
    inliers[rows] = mask
    if degenerate_inliers(pa[inliers], pb[inliers], min_spread_px, min_spread_fraction, image_sizes):
        logger.debug("%s model on %d inliers rejected: inliers on a line or in a spot", kind, int(inliers.sum()))
        return None, np.zeros(k, dtype=bool)
    return model, inliers


def reprojection_errors(model: np.ndarray, points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """Distance between ``model`` applied to ``points_a`` and ``points_b``.

    Args:
        model: (3, 3) homography or affine (A -> B, homogeneous).
        points_a: (K, 2) px in image A.
        points_b: (K, 2) px in image B.

    Returns:
        (K,) float64 px; ``inf`` where A's point maps to infinity.
    """
    h = np.asarray(model, dtype=np.float64)
    if h.shape != (3, 3):
        raise FeatureShapeError("model", "(3, 3)", str(h.shape))
    pa = _as_points("points_a", points_a)
    pb = _as_points("points_b", points_b)
    if len(pa) != len(pb):
        raise FeatureShapeError("points_b", f"({len(pa)}, 2) like points_a", str(pb.shape))
    projected = pa @ h[:, :2].T + h[:, 2]
    w = projected[:, 2]
    errors = np.full(len(pa), np.inf)
    ok = np.abs(w) > 1e-12
    errors[ok] = np.linalg.norm(projected[ok, :2] / w[ok, None] - pb[ok], axis=1)
    return errors


def local_log2_zoom(model: np.ndarray, kind: str, points_a: np.ndarray) -> np.ndarray | None:
    """log2 of the area zoom ``sqrt(|det J|)`` of ``model`` at each of (K, 2) ``points_a`` px.

    For a homography the Jacobian's determinant at ``x`` is ``det(H) / w(x)^3`` with
    ``w(x) = h31 x + h32 y + h33``; for an affine it is constant.  A fundamental matrix has
    no local zoom: None.  Points mapped to or behind infinity get ``nan``.
    """
    if kind == "fundamental":
        return None
    h = np.asarray(model, dtype=np.float64)
    pa = _as_points("points_a", points_a)
    w = pa @ h[2, :2] + h[2, 2]
    det = np.linalg.det(h)
    with np.errstate(divide="ignore", invalid="ignore"):
        area = np.abs(det / w**3)
        out = 0.5 * np.log2(area)
    out[~np.isfinite(out)] = np.nan
    return out


def scale_consistent(
    model: np.ndarray | None,
    kind: str,
    points_a: np.ndarray,
    scales_a: np.ndarray,
    scales_b: np.ndarray,
    inliers: np.ndarray,
    tolerance: float,
) -> np.ndarray:
    """Inliers whose keypoints' pyramid scales agree with the model's zoom (chance matches rarely do).

    A keypoint found at pyramid scale ``s`` describes a patch of ``R / s`` original px, so a true
    correspondence between a keypoint of A at ``s_a`` and one of B at ``s_b`` implies that B shows
    A's content zoomed by ``s_a / s_b``.  The model says what the zoom is at A's point
    (:func:`local_log2_zoom`); for the fundamental matrix, which has none, the dominant zoom
    (median over the inliers) stands in.  An inlier is kept when the two agree within
    ``tolerance`` in log2 units (the default pyramid's levels are 0.5 apart).

    Args:
        model: (3, 3) A -> B model, or None (then nothing is kept).
        kind: the model kind (see :data:`MODEL_KINDS`).
        points_a: (K, 2) px in A.
        scales_a, scales_b: (K,) pyramid scale of each correspondence's keypoint in A and in B.
        inliers: (K,) bool RANSAC inlier mask.
        tolerance: allowed |log2 difference| (> 0).

    Returns:
        (K,) bool: ``inliers`` and scale-consistent.
    """
    if not tolerance > 0:
        raise InvalidRequest(f"scale tolerance must be > 0 (log2 units), got {tolerance}")
    mask = np.asarray(inliers, dtype=bool).copy()
    sa = np.asarray(scales_a, dtype=np.float64).reshape(-1)
    sb = np.asarray(scales_b, dtype=np.float64).reshape(-1)
    if len(sa) != len(mask) or len(sb) != len(mask):
        raise FeatureShapeError("scales", f"({len(mask)},) like the inlier mask", f"{sa.shape}, {sb.shape}")
    if model is None or not mask.any():
        return np.zeros_like(mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        implied = np.log2(sa / sb)
    expected = local_log2_zoom(model, kind, points_a)
    if expected is None:
        expected = np.full(len(mask), np.median(implied[mask]))
    agree = np.abs(implied - expected) <= tolerance  # nan compares False: rejected
    return mask & agree


@dataclass(frozen=True)
class Verifier:
    """Module form of :func:`verify`: holds the matching and RANSAC configuration.

    Attributes:
        max_distance: descriptor L2 threshold (see :func:`match_descriptors`).
        mutual: mutual nearest-neighbour check.
        kind: "homography", "fundamental" or "affine".
        px_threshold: RANSAC inlier threshold, px.
        confidence: RANSAC confidence in (0, 1).
        max_iters: maximum RANSAC iterations.
        seed: RANSAC seed (>= 0 reproducible).
        scale_tolerance: when set, inliers must also be scale-consistent within this many log2
            units (:func:`scale_consistent`); None = off.
        min_spread_px: degenerate-inlier threshold, px (see :func:`estimate_model`).
        min_spread_fraction: degenerate-inlier threshold, fraction of each image's short side.
    """

    max_distance: float
    mutual: bool
    kind: str
    px_threshold: float
    confidence: float
    max_iters: int
    seed: int
    scale_tolerance: float | None = None
    min_spread_px: float = 0.0
    min_spread_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check_params(self.kind, self.px_threshold, self.confidence, self.max_iters)
        if not self.max_distance > 0:
            raise InvalidRequest(f"max_distance must be > 0, got {self.max_distance}")
        if self.scale_tolerance is not None and not self.scale_tolerance > 0:
            raise InvalidRequest(f"scale_tolerance must be > 0 or None, got {self.scale_tolerance}")

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Verifier":
        return cls(
            max_distance=settings.match_max_distance,
            mutual=settings.match_mutual,
            kind=settings.ransac_model,
            px_threshold=settings.ransac_px,
            confidence=settings.ransac_confidence,
            max_iters=settings.ransac_max_iters,
            seed=settings.ransac_seed,
            scale_tolerance=settings.ransac_scale_tolerance,
            min_spread_px=settings.min_inlier_spread,
            min_spread_fraction=settings.min_inlier_spread_fraction,
        )

    def __call__(self, a: Features, b: Features) -> Correspondences:
        """Match ``a`` against ``b`` and verify; see :func:`verify`."""
        matches = match_descriptors(a.descriptors, b.descriptors, self.max_distance, self.mutual)
        model, inliers = estimate_model(
            a.keypoints[matches[:, 0]],
            b.keypoints[matches[:, 1]],
            self.kind,
            self.px_threshold,
            self.confidence,
            self.max_iters,
            self.seed,
            self.min_spread_px,
            min_spread_fraction=self.min_spread_fraction,
            image_sizes=(a.image_size, b.image_size),
        )
        if self.scale_tolerance is not None:
            inliers = scale_consistent(model, self.kind, a.keypoints[matches[:, 0]], a.scales[matches[:, 0]],
                                       b.scales[matches[:, 1]], inliers, self.scale_tolerance)
            if not inliers.any():
                model = None
        logger.debug(
            "verify %s -> %s: %d matches, %d inliers (%s)",
            a.image_id, b.image_id, len(matches), int(inliers.sum()), self.kind,
        )
        return Correspondences(matches=matches, inlier_mask=inliers, model=model, model_kind=self.kind)


def verify(a: Features, b: Features, settings: "Settings") -> Correspondences:
    """Match the local descriptors of ``a`` and ``b`` and fit ``settings.ransac_model``.

    Uses ``match_max_distance``, ``match_mutual``, ``ransac_model``, ``ransac_px``,
    ``ransac_confidence``, ``ransac_max_iters``, ``ransac_seed`` and ``ransac_scale_tolerance``.  An image without
    keypoints gives 0 matches, 0 inliers and ``model=None``.

    Returns:
        :class:`Correspondences` with (K, 2) int64 matches (A index, B index), (K,) bool
        inlier mask, the (3, 3) A -> B model or None, and the model kind.
    """
    return Verifier.from_settings(settings)(a, b)
