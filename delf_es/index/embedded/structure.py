"""Which faiss index holds the embedded backend's keypoint vectors, chosen by their number, and how
one is trained and filled in chunks (never the whole float32 matrix in memory).

    structure = choose_structure(n_vectors, exact_limit=200_000)
    index = new_index(structure, dim=40)          # untrained; train on training_picks(...) vectors

Up to ``exact_limit`` vectors: exact ``IDMap,Flat``.  Above: IVF with nlist = 4 sqrt(n) lists (faiss's
guideline); the coarse quantizer is an HNSW graph over the centroids from ``HNSW_QUANTIZER_FROM``
lists (assigning a vector costs ~log(nlist) instead of nlist distances: adding 10M vectors to
12,649 lists takes minutes instead of an hour on one core), and the vectors are stored as 8-bit
scalar codes (SQ8: 40 + 8 B per vector instead of 160 + 8) from ``SQ8_FROM`` vectors.  The
choices and the measurements behind them: benchmarks/embedded_structure.py,
benchmarks/results/embedded_structure.json, docs/scale.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

#: IVF lists from which the coarse quantizer is an HNSW graph (M = HNSW_M) instead of a flat scan.
HNSW_QUANTIZER_FROM = 8192
HNSW_M = 32
#: HNSW quantizer's candidate list at search: QUANTIZER_EF_PER_PROBE x nprobe.  faiss's IndexHNSW
#: searches with efSearch (16) even for k = nprobe = 256 lists, and found 74% of the 256 nearest
#: centroids so (recall@10 capped at 0.981 at 1M vectors); 2 x nprobe found all of them.  Adds keep
#: efSearch 16 (the nearest centroid right for 99.2% of vectors; 64: 99.99%, 3x slower adds).
QUANTIZER_EF_PER_PROBE = 2
#: vectors from which IVF stores 8-bit scalar codes instead of float32 (4x less memory).
SQ8_FROM = 4_000_000
#: k-means training points per IVF list (faiss warns below 39).
TRAIN_POINTS_PER_LIST = 40
#: k-means iterations (faiss's IVF default is 10).
TRAIN_ITERATIONS = 10
#: SQ8 range per dimension: mean +- SQ8_RANGE_STD std of the training residuals (faiss RS_meanstd), not
#: their min-max (faiss's default, stretched by outliers): recall@10 0.978 vs 0.969 at 1M vectors,
#: nprobe 512 (benchmarks/results/embedded_structure.json; quantiles 0.001 and RS_optim: 0.977, a probe)
SQ8_RANGE_STD = 3.0
#: most training points taken from one image, so the sample spans many images.
TRAIN_POINTS_PER_IMAGE = 64


@dataclass(frozen=True)
class KeypointStructure:
    """A faiss index layout: ``nlist`` = 0 for exact flat search, else IVF with ``nlist`` lists,
    an HNSW coarse quantizer when ``hnsw_quantizer`` and SQ8 codes when ``sq8``."""

    nlist: int = 0
    hnsw_quantizer: bool = False
    sq8: bool = False

    @property
    def factory(self) -> str:
        """The faiss ``index_factory`` string."""
        if not self.nlist:
            return "IDMap,Flat"
        coarse = f"IVF{self.nlist}_HNSW{HNSW_M}" if self.hnsw_quantizer else f"IVF{self.nlist}"
        return f"{coarse},{'SQ8' if self.sq8 else 'Flat'}"


def ivf_nlist(n: int) -> int:
    """faiss's guideline 4 sqrt(n) lists, with >= 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def choose_structure(
    n: int, exact_limit: int | None, *, sq8_from: int | None = SQ8_FROM, hnsw_from: int = HNSW_QUANTIZER_FROM
) -> KeypointStructure:
    """The layout for ``n`` vectors: exact up to ``exact_limit`` (None = always exact), else IVF
    (nlist = :func:`ivf_nlist`), HNSW-quantized from ``hnsw_from`` lists, SQ8 from ``sq8_from``
    vectors (None = never)."""
    if exact_limit is None or n <= exact_limit:
        return KeypointStructure()
    nlist = ivf_nlist(n)
    return KeypointStructure(nlist, nlist >= hnsw_from, sq8_from is not None and n >= sq8_from)


def structure_of(index: Any) -> KeypointStructure:
    """The layout of an existing faiss index (e.g. one read from a snapshot)."""
    if not isinstance(index, faiss.IndexIVF):
        return KeypointStructure()
    quantizer = faiss.downcast_index(index.quantizer)
    return KeypointStructure(int(index.nlist), isinstance(quantizer, faiss.IndexHNSW),
                             isinstance(index, faiss.IndexIVFScalarQuantizer))


def new_index(structure: KeypointStructure, dim: int) -> Any:
    """An empty faiss index of ``structure`` for ``dim``-d unit vectors, inner product (cosine).

    IVF k-means is spherical (centroids kept unit, so the inner-product quantizer ranks lists by
    cosine); SQ8 ranges are mean +- 3 std per dimension; with an HNSW quantizer the k-means assignment runs on an HNSW graph too (faiss's
    ``clustering_index``), which makes training at 10^4-10^5 lists minutes instead of hours."""
    index = faiss.index_factory(dim, structure.factory, faiss.METRIC_INNER_PRODUCT)
    if structure.nlist:
        index.cp.spherical = True
        index.cp.niter = TRAIN_ITERATIONS
        if structure.sq8:
            index.sq.rangestat = faiss.ScalarQuantizer.RS_meanstd
            index.sq.rangestat_arg = SQ8_RANGE_STD
        if structure.hnsw_quantizer:
            index.clustering_index = faiss.IndexHNSWFlat(dim, HNSW_M)  # L2 = cosine on unit centroids
    return index


def search_parameters(index: Any, nprobe: int | None = None) -> Any:
    """faiss search parameters for ``index`` at ``nprobe`` lists (None = the index's own): the
    HNSW quantizer's efSearch follows nprobe (``QUANTIZER_EF_PER_PROBE``); None for a flat index."""
    if not isinstance(index, faiss.IndexIVF):
        return None
    nprobe = int(index.nprobe if nprobe is None else nprobe)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(faiss.downcast_index(index.quantizer), faiss.IndexHNSW):
        quantizer = faiss.SearchParametersHNSW(efSearch=max(16, QUANTIZER_EF_PER_PROBE * nprobe))
        params.quantizer_params = quantizer
        params.referenced_objects = [quantizer]  # faiss keeps a raw pointer: keep it alive with params
    return params


def training_picks(counts: np.ndarray, wanted: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which stored vectors train an IVF: up to ``TRAIN_POINTS_PER_IMAGE`` random keypoints (more
    when there are few images) from each of enough random images to give ``wanted`` points (all of them when there are fewer).

    Args:
        counts: (images,) keypoints of each image, in storage order.
        wanted: training points asked for.

    Returns:
        The chosen images (ascending positions into ``counts``) and, for each, its chosen keypoint
        positions (ascending).  Deterministic in ``seed``: the same picks whatever reads them.
    """
    counts = np.asarray(counts, np.int64)
    rng = np.random.default_rng(seed)
    if counts.sum() <= wanted:
        images = np.flatnonzero(counts)
        return images, [np.arange(counts[i]) for i in images]
    per_image = max(TRAIN_POINTS_PER_IMAGE, math.ceil(wanted / max(1, np.count_nonzero(counts))))
    order = rng.permutation(len(counts))
    taken = np.minimum(counts[order], per_image)
    enough = int(np.searchsorted(np.cumsum(taken), wanted)) + 1
    images = np.sort(order[:enough])
    images = images[counts[images] > 0]
    picks = [np.sort(rng.choice(counts[i], min(counts[i], per_image), replace=False)) for i in images]
    return images, picks
