"""Anchor ``anchor-sift-magsac``: the classic pre-deep pipeline, brute force over all pairs.

1. Frame: every image is resized (``cv2.INTER_AREA`` down, ``INTER_LINEAR`` up) so the
   longer side of the FULL image is 1024 px.  A bbox query is cropped with
   ``delf_es.eval.gt.query_pixels`` and the crop is resized by the factor of its full
   image, so query and database keypoints live in the same kind of frame (the px a
   database copy of the query photo would have) and the RANSAC threshold means the same px
   everywhere.  Keypoints stay in that resized frame (only inlier counts are used).
2. Features: OpenCV SIFT (``cv2.SIFT_create(nfeatures=2000)``, grey image) -> RootSIFT
   (L1-normalise, square root; Arandjelovic & Zisserman 2012), stored as float16 in an
   on-disk cache (``~/.cache/delf-es/anchors/sift``) keyed by content hash, bbox and
   parameters, so a re-run re-uses them; the float16 values are what every run matches.
3. Matching: nearest neighbour by L2 with Lowe's ratio test (d1 < 0.8 d2) AND mutual
   nearest neighbours (cross-check).
4. Verification: ``cv2.findHomography(q, d, cv2.USAC_MAGSAC, THRESHOLD_PX, maxIters=10000,
   confidence=0.999)`` on every pair with >= 4 matches; score = inlier count.
5. Ranking: every database image by (inliers, matches), exact ties by id hash.

THRESHOLD_PX was chosen on ../shared/data/pairs (EVD + HPatches), never on paris250:
``python benchmarks/anchors/sift_threshold.py`` (results in
``benchmarks/results/eval/anchor-sift-magsac-threshold.json``); see its docstring.

Both cores: per query the database is split into two halves verified by two spawned
worker processes (numpy/OpenCV limited to one thread each); search_ms is the wall time of
that brute-force pass for one query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from common import (ANCHOR_CACHE, QueryOutcome, database_items, load_ground_truth, load_image, parse_args,
                    query_pixels, rank_by_score, write_result)
from delf_es.eval.feature_cache import content_hash
from delf_es.settings import Settings

LABEL = "anchor-sift-magsac"
LONG_SIDE = 1024  # px
NUM_FEATURES = 2000
RATIO = 0.8
MAGSAC_ITERS = 10000
MAGSAC_CONFIDENCE = 0.999
# Chosen on ../shared/data/pairs by sift_threshold.py (see benchmarks/results/eval/anchor-sift-magsac-threshold.json).
THRESHOLD_PX = 10.0
PARAMS = f"sift{NUM_FEATURES}-rootsift-f16-long{LONG_SIDE}"
log = logging.getLogger("anchors.sift")


# --- features -----------------------------------------------------------------------------

def frame_scale(width: int, height: int) -> float:
    """Factor that brings an image of (width, height) px to a longer side of LONG_SIDE px."""
    return LONG_SIDE / max(width, height)


def rootsift(pixels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """RootSIFT of an RGB image resized by ``scale``.

    Args:
        pixels: (H, W, 3) uint8 RGB.
        scale: resize factor (unitless).

    Returns:
        keypoints (N, 2) float32 (x, y) px in the resized frame; descriptors (N, 128) float32,
        unit L2 (float16-rounded); N <= NUM_FEATURES.
    """
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != (width, height):
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    keypoints, desc = cv2.SIFT_create(nfeatures=NUM_FEATURES).detectAndCompute(grey, None)
    if desc is None or not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    # SIFT may return a few more than nfeatures (ties in response); keep the strongest.
    order = np.argsort([-k.response for k in keypoints], kind="stable")[:NUM_FEATURES]
    points = np.array([keypoints[i].pt for i in order], np.float32)
    desc = desc[order].astype(np.float32)
    desc /= desc.sum(axis=1, keepdims=True) + 1e-7
    desc = np.sqrt(desc)
    return points, desc.astype(np.float16).astype(np.float32)


class SiftCache:
    """npz per (content hash, bbox, PARAMS) with keypoints, float16 descriptors and extraction time."""

    def __init__(self, root: Path) -> None:
        self.root = root / "sift" / PARAMS
        self.root.mkdir(parents=True, exist_ok=True)
        self.seconds: list[float] = []  # extraction times (s/img) of every image used, cached or not
        self.extracted = 0

    def get(self, path: Path, pixels_of, full_size_of) -> Path:
        """Cache file of the image's features (extracted on a miss); read it with :func:`load_features`."""
        key = hashlib.sha1(f"{content_hash(path)}:{PARAMS}:{getattr(pixels_of, 'tag', '')}".encode()).hexdigest()
        file = self.root / key[:2] / f"{key}.npz"
        if file.is_file():
            with np.load(file) as data:
                self.seconds.append(float(data["seconds"]))
            return file
        pixels = pixels_of()
        scale = frame_scale(*full_size_of(pixels))
        started = time.perf_counter()
        points, desc = rootsift(pixels, scale)
        seconds = time.perf_counter() - started
        self.seconds.append(seconds)
        self.extracted += 1
        file.parent.mkdir(parents=True, exist_ok=True)
        temp = file.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(temp, keypoints=points, descriptors=desc.astype(np.float16), seconds=seconds)
        os.replace(temp, file)
        return file


def load_features(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (N, 2) float32 px, RootSIFT (N, 128) float32) from a cache file."""
    with np.load(file) as data:
        return data["keypoints"], data["descriptors"].astype(np.float32)


# --- matching and verification --------------------------------------------------------------

def ratio_mutual_matches(a: np.ndarray, b: np.ndarray, ratio: float = RATIO) -> np.ndarray:
    """Ratio-test (d1 < ratio * d2, L2) AND mutual nearest-neighbour matches of unit descriptors.

    Args:
        a: (N, D) float32 unit rows.  b: (M, D) float32 unit rows.

    Returns:
        (K, 2) int64 [index in a, index in b]; (0, 2) if N == 0 or M < 2.
    """
    if len(a) == 0 or len(b) < 2:
        return np.zeros((0, 2), np.int64)
    sim = a @ b.T  # cosine; d^2 = 2 - 2 cos
    best_for_b = sim.argmax(axis=0)
    rows = np.arange(len(a))
    j1 = sim.argmax(axis=1)
    s1 = sim[rows, j1].copy()
    sim[rows, j1] = -np.inf
    s2 = sim.max(axis=1)
    d1 = np.maximum(2.0 - 2.0 * s1, 0.0)
    d2 = np.maximum(2.0 - 2.0 * s2, 0.0)
    keep = (d1 < ratio * ratio * d2) & (best_for_b[j1] == rows)
    idx = np.flatnonzero(keep)
    return np.stack([idx, j1[idx]], axis=1).astype(np.int64)


def magsac_inliers(pa: np.ndarray, pb: np.ndarray, threshold: float = THRESHOLD_PX) -> tuple[int, np.ndarray | None]:
    """Inlier count and homography (A -> B) by ``cv2.USAC_MAGSAC``; (0, None) below 4 points."""
    if len(pa) < 4:
        return 0, None
    try:
        model, mask = cv2.findHomography(pa.astype(np.float32), pb.astype(np.float32), cv2.USAC_MAGSAC, threshold,
                                         maxIters=MAGSAC_ITERS, confidence=MAGSAC_CONFIDENCE)
    except cv2.error:
        return 0, None
    if model is None or mask is None:
        return 0, None
    return int(mask.sum()), model


def verify_pair(qk, qd, dk, dd, threshold: float = THRESHOLD_PX) -> tuple[int, int]:
    """(inliers, tentative matches) of a query/database pair."""
    matches = ratio_mutual_matches(qd, dd)
    inliers, _ = magsac_inliers(qk[matches[:, 0]], dk[matches[:, 1]], threshold)
    return inliers, len(matches)


# --- brute-force search with two worker processes ---------------------------------------------

_DB: list[tuple[np.ndarray, np.ndarray]] = []
_QUERIES: list[tuple[np.ndarray, np.ndarray]] = []


def _init_worker(db_files: list[Path], query_files: list[Path]) -> None:
    """Spawned worker: one thread for OpenCV and BLAS, features read from the cache files.
    (Forked workers deadlocked: the parent had already started OpenCV/BLAS thread pools.)"""
    cv2.setNumThreads(1)
    threadpool_limits(1)
    _DB[:] = [load_features(f) for f in db_files]
    _QUERIES[:] = [load_features(f) for f in query_files]


def _worker_pid(_: int) -> int:
    time.sleep(0.2)
    return os.getpid()


def _verify_chunk(task: tuple[int, int, int]) -> list[tuple[int, int]]:
    qi, start, stop = task
    qk, qd = _QUERIES[qi]
    return [verify_pair(qk, qd, *_DB[i]) for i in range(start, stop)]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=lambda p: p.add_argument("--workers", type=int, default=2))
    settings = Settings()
    gt = load_ground_truth(args.gt)
    items = database_items(gt, args.distractors)
    cache = SiftCache(ANCHOR_CACHE)
    size_of = lambda pixels: (pixels.shape[1], pixels.shape[0])  # noqa: E731

    db_files, query_files = [], []
    for image_id, path in tqdm(items, desc="database", unit="img"):
        db_files.append(cache.get(path, lambda p=path: load_image(p, settings).pixels, size_of))
    db_seconds = list(cache.seconds)
    for q in tqdm(gt.queries, desc="queries", unit="img"):
        def crop(q=q):
            return query_pixels(gt, q, settings)
        crop.tag = json.dumps(q.bbox)  # bbox is part of the cache key
        full = gt.resolve(q.image)
        query_files.append(cache.get(full, crop, lambda _p, f=full: load_image(f, settings).size))
    log.info("features: %d extracted this run, %d from cache", cache.extracted, len(cache.seconds) - cache.extracted)

    n = len(items)
    bounds = np.linspace(0, n, args.workers + 1).astype(int)
    outcomes = []
    _DB[:] = [load_features(f) for f in db_files]  # for the summary below
    _QUERIES[:] = [load_features(f) for f in query_files]
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(db_files, query_files)) as pool:
        while len(set(pool.map(_worker_pid, range(4 * args.workers), chunksize=1))) < args.workers:
            pass  # warm-up: every worker has loaded the features before any query is timed
        for qi, q in enumerate(tqdm(gt.queries, desc="search", unit="q")):
            started = time.perf_counter()
            parts = pool.map(_verify_chunk, [(qi, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])], chunksize=1)
            results = [r for part in parts for r in part]
            scores = {image_id: (float(inl), float(m)) for (image_id, _), (inl, m) in zip(items, results)}
            ranking = rank_by_score(scores)
            search_ms = 1000 * (time.perf_counter() - started)
            outcomes.append(QueryOutcome(q, ranking, scores, search_ms, {"query_keypoints": len(_QUERIES[qi][0])}))

    description = (
        f"Classic pre-deep pipeline: OpenCV {cv2.__version__} SIFT (nfeatures={NUM_FEATURES}) -> RootSIFT, every "
        f"image resized so the longer side of the full image is {LONG_SIDE} px (bbox crops by their full image's "
        f"factor), ratio test {RATIO} + mutual NN, cv2.findHomography USAC_MAGSAC threshold {THRESHOLD_PX} px "
        f"(chosen on ../shared/data/pairs by sift_threshold.py, not on paris250), maxIters {MAGSAC_ITERS}, conf "
        f"{MAGSAC_CONFIDENCE}; brute force over every query/database pair, {args.workers} worker processes; "
        "every database image ranked by (inliers, matches), exact ties by id hash."
    )
    write_result(args, LABEL, description, gt, n, outcomes, db_seconds, extra={
        "extracted_this_run": cache.extracted,
        "extract_timing": "database images' SIFT time (grey + resize + detect + describe + RootSIFT; decoding "
                          "excluded, as in delf-es eval), stored in the cache when first extracted",
        "threshold_px": THRESHOLD_PX,
        "threshold_source": "benchmarks/results/eval/anchor-sift-magsac-threshold.json",
        "workers": args.workers,
        "opencv": cv2.__version__,
        "query_keypoints_median": statistics.median(len(k) for k, _ in _QUERIES),
        "database_keypoints_median": statistics.median(len(k) for k, _ in _DB),
    })


if __name__ == "__main__":
    main()
