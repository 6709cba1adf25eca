"""Which images may form a different-scene pair, and the statistics that choose verification
thresholds from true and different-scene pairs (``benchmarks/chance_inliers.py``).

A different-scene ("false") pair must be two images of different scenes for certain, or its
inliers are not chance: consecutive frames of one camera sequence, or two views of one photo,
share a scene.  So two images form a false pair only when they come from different sources
(a Debian/npm/PyPI package of the training photos, one EVD scene, the HPatches sequence) and
their global descriptors are not near-duplicates (cosine below ``max_cosine``), which catches
a photo shipped by two packages.  Pure numpy: no model here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_es.types import Features

__all__ = ["PairImage", "different_scene_pairs", "distribution", "smallest_count_above", "source_of"]


@dataclass(frozen=True)
class PairImage:
    """One image of the check.

    Attributes:
        name: shown in the results (e.g. "evd/1/adam", "view-b opencv-doc__aloeR.jpg").
        source: where the scene comes from: the training photo's package (:func:`source_of`),
            "evd/<scene>" or "hpatches/<sequence>"; images of one source never form a false pair.
        features: its features, as added or searched.
    """

    name: str
    source: str
    features: Features


def source_of(file_name: str) -> str:
    """The package a training photo came from: ``scripts/training_photos.py`` names each file
    ``<source>__<name>`` (e.g. ``visp-images-data__cube-image.0000.jpg`` -> ``visp-images-data``);
    a name without ``__`` is its own source."""
    base = file_name.rsplit("/", 1)[-1]
    return base.split("__", 1)[0] if "__" in base else base


def different_scene_pairs(
    images: list[PairImage], max_cosine: float
) -> tuple[list[tuple[int, int]], list[tuple[int, int, float]]]:
    """Every unordered pair (i, j), i < j, of ``images`` from different sources whose global
    descriptors' cosine is below ``max_cosine``.

    Returns:
        ``(pairs, near_duplicates)``: pairs in (i, j) order; near_duplicates the cross-source
        pairs left out for their cosine, as (i, j, cosine).
    """
    if not images:
        return [], []
    vectors = np.stack([np.asarray(image.features.global_desc, np.float64) for image in images])
    cosine = vectors @ vectors.T
    pairs: list[tuple[int, int]] = []
    near: list[tuple[int, int, float]] = []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            if images[i].source == images[j].source:
                continue
            if cosine[i, j] >= max_cosine:
                near.append((i, j, float(cosine[i, j])))
            else:
                pairs.append((i, j))
    return pairs, near


def distribution(values: list[int] | list[float] | np.ndarray) -> dict[str, float]:
    """n, median, mean, 95th and 99th percentile (linear interpolation) and max of ``values``;
    n = 0 and NaNs for none."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not array.size:
        return {"n": 0, "median": float("nan"), "mean": float("nan"), "p95": float("nan"),
                "p99": float("nan"), "max": float("nan")}
    return {"n": int(array.size), "median": float(np.median(array)), "mean": round(float(array.mean()), 3),
            "p95": float(np.percentile(array, 95)), "p99": float(np.percentile(array, 99)),
            "max": float(array.max())}


def smallest_count_above(counts: list[int] | np.ndarray, quantile: float) -> int:
    """The smallest integer count strictly above the ``quantile`` (0-1) of ``counts``: a
    threshold that at most a ``1 - quantile`` share of them reaches (quantile 1: none does)."""
    array = np.asarray(counts, dtype=np.float64).reshape(-1)
    if not array.size:
        return 0
    return int(np.floor(np.quantile(array, quantile))) + 1
