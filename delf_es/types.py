"""Typed records exchanged between stages.  No torch here: everything after
``features.py`` is numpy, so index backends, verification and the SDK never
import the model."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delf_es.errors import FeatureShapeError

FEATURES_FORMAT = "delf-es-features/1"


def _check(name: str, array: np.ndarray, ndim: int, last: int | None = None) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        got = type(array).__name__ if not isinstance(array, np.ndarray) else str(array.dtype)
        raise FeatureShapeError(name, "float32 ndarray", got)
    if array.ndim != ndim or (last is not None and array.shape[-1] != last):
        want = {1: "(N,)", 2: f"(N, {last if last is not None else 'D'})"}[ndim]
        raise FeatureShapeError(name, want, str(array.shape))


@dataclass(frozen=True)
class Features:
    """Local and global descriptors of one image.

    Attributes:
        image_id: caller's id of the image (file name, URL or custom name).
        model_id: identifies backbone, layer, scoring and PCA, e.g.
            ``"efficientnet-lite2/l16x-norm-pca40@1a2b3c4d"``; part of every cache key.
        image_size: (width, height) of the ORIGINAL image in px (after EXIF rotation).
        keypoints: (N, 2) float32, (x, y) px in the original image, the centre of
            each descriptor's receptive field.
        scales: (N,) float32, image-pyramid scale factor the keypoint came from (unitless).
        scores: (N,) float32, >= 0, keypoint-selection score (attention or L2 norm).
        descriptors: (N, D) float32, L2-normalised local descriptors.
        global_desc: (G,) float32, L2-normalised global descriptor (G may be 0 if absent).
    """

    image_id: str
    model_id: str
    image_size: tuple[int, int]
    keypoints: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    global_desc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        _check("keypoints", self.keypoints, 2, 2)
        _check("scales", self.scales, 1)
        _check("scores", self.scores, 1)
        _check("descriptors", self.descriptors, 2)
        _check("global_desc", self.global_desc, 1)
        n = len(self.keypoints)
        for name in ("scales", "scores", "descriptors"):
            if len(getattr(self, name)) != n:
                raise FeatureShapeError(name, f"{n} rows like keypoints", str(getattr(self, name).shape))
        width, height = self.image_size
        if width <= 0 or height <= 0:
            raise FeatureShapeError("image_size", "(width > 0, height > 0)", str(self.image_size))

    @property
    def num_keypoints(self) -> int:
        return int(len(self.keypoints))

    @property
    def descriptor_dim(self) -> int:
        return int(self.descriptors.shape[1])

    def to_bytes(self) -> bytes:
        """Serialise to a compressed ``.npz`` byte string (float32 arrays, JSON header)."""
        header = {
            "format": FEATURES_FORMAT,
            "image_id": self.image_id,
            "model_id": self.model_id,
            "image_size": list(self.image_size),
        }
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            keypoints=self.keypoints,
            scales=self.scales,
            scores=self.scores,
            descriptors=self.descriptors,
            global_desc=self.global_desc,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Features":
        """Inverse of :meth:`to_bytes`; raises :class:`FeatureShapeError` on a foreign file."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                header = json.loads(npz["header"].tobytes().decode())
                arrays = {k: npz[k] for k in ("keypoints", "scales", "scores", "descriptors", "global_desc")}
        except (OSError, ValueError, KeyError) as exc:
            raise FeatureShapeError("file", FEATURES_FORMAT, f"unreadable ({exc})") from exc
        if header.get("format") != FEATURES_FORMAT:
            raise FeatureShapeError("format", FEATURES_FORMAT, str(header.get("format")))
        return cls(
            image_id=header["image_id"],
            model_id=header["model_id"],
            image_size=(int(header["image_size"][0]), int(header["image_size"][1])),
            **arrays,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        return cls.from_bytes(Path(path).read_bytes())


@dataclass(frozen=True)
class Correspondences:
    """Result of matching and geometric verification of two images.

    Attributes:
        matches: (M, 2) int64, indices (into A, into B) of tentative matches.
        inlier_mask: (M,) bool, True where the match fits the estimated model.
        model: (3, 3) float64 transform mapping A's pixels to B's (homography,
            fundamental matrix or affine in homogeneous form), or None when no model was found.
        model_kind: "homography", "fundamental" or "affine".
    """

    matches: np.ndarray
    inlier_mask: np.ndarray
    model: np.ndarray | None
    model_kind: str

    @property
    def num_inliers(self) -> int:
        return int(self.inlier_mask.sum())


@dataclass(frozen=True)
class SearchHit:
    """One ranked result.

    Attributes:
        image_id: id of the database image.
        score: ranking score: inliers when verified, else shortlist similarity.
        inliers: verified inlier count; None means not verified.
        votes: descriptor matches that voted for this image in the shortlist.
        global_similarity: cosine similarity of global descriptors (nan if unknown).
        inlier_pairs: (K, 4) float32 ``[qx, qy, x, y]`` px, the verified correspondences (query
            keypoint in the query image, database keypoint in the database image); None when
            not verified.
    """

    image_id: str
    score: float
    inliers: int | None = None
    votes: int = 0
    global_similarity: float = float("nan")
    inlier_pairs: np.ndarray | None = field(default=None, compare=False, repr=False)
