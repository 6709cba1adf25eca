"""Verification of the shortlist (issue 13 item 2): where the time goes and what makes it faster.

    python benchmarks/verify_speed.py [--images 3110] [--out benchmarks/results/verify_speed.json]

Data: real features (the default model's feature cache: paris250 photos + distractors, and the 38
query crops), the database replicated with perturbations to ``--images`` (cached_features.py), in
an embedded index without keypoint vectors; every search is the default Elasticsearch plan
(global shortlist of 100 + mutual matching against the stored int8 codes + RANSAC), through the
real :class:`~delf_es.search.Searcher`.  One run measures, interleaved query by query so the load
of the shared machine hits every variant alike:

* end-to-end search p50/p95 with ``verify_threads`` 1 (the old default), 2 and 0 (auto), and with
  2 threads matching on the whole (Q, N) product as before session 7 (the Searcher's
  ``mutual_matches`` swapped for ``whole_product_mutual``), and that all four return the same hits
  in the same order with the same inliers;
* the blocked product (``search.MATCH_BLOCK_ROWS`` query rows at a time) against the whole one per
  shortlisted image: same pairs, thread CPU time of each;
* per shortlisted image, thread CPU time of the matching product + reductions and of RANSAC;
* the product batched over several shortlisted images at once (one BLAS call per block, into one
  buffer) against one product per image: same pairs, thread CPU time of each;
* the mutual-match counts of the shortlisted images against ``min_inliers`` (an early exit for
  images that cannot reach it fires only below it);
* cheaper estimators (pydegensac with fewer iterations, OpenCV's USAC) on the same correspondences:
  CPU per image and the inliers they keep on true matches;
* whether pydegensac and numpy's product release the GIL: a pure-Python thread counts while the
  other runs them (a held GIL stops the counter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydegensac
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cached_features  # noqa: E402

from delf_es.cache import MemoryLocationCache  # noqa: E402
from delf_es.index.codes import decode_codes  # noqa: E402
from delf_es.index.embedded import EmbeddedBackend  # noqa: E402
import delf_es.search as search_module  # noqa: E402
from delf_es.search import MATCH_BLOCK_ROWS, Searcher, mutual_matches, verify_thread_count  # noqa: E402
from delf_es.settings import Settings  # noqa: E402
from delf_es.verify import estimate_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"1 thread (old default)": 1, "2 threads": 2, "auto": 0, "2 threads, whole product (session 6)": 2}
#: variants that match with the whole (Q, N) product at once instead of search.MATCH_BLOCK_ROWS blocks
WHOLE_PRODUCT = {"2 threads, whole product (session 6)"}


def whole_product_mutual(query: np.ndarray, codes: np.ndarray | None, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual matching as before session 7: the whole (Q, N) product at once (4 MB for 1000 x 1000),
    then its row argmax and column max (the blocked ``mutual_matches`` reads each block from cache)."""
    if codes is None or not len(codes) or not len(query):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return mutual_of(query @ decode_codes(codes).T, t)


def mutual_of(similarity: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours above ``t`` of one whole (Q, N) cosine matrix (exact ties: the
    lowest query row, as argmax)."""
    q = np.arange(len(similarity))
    best_keypoint = similarity.argmax(axis=1)
    best = similarity[q, best_keypoint]
    keep = (best >= similarity.max(axis=0)[best_keypoint]) & (best >= t)
    q, keypoint = q[keep], best_keypoint[keep]
    _, first = np.unique(keypoint, return_index=True)
    first.sort()
    return q[first], keypoint[first]


def ransac_alternatives(correspondences: list[tuple[np.ndarray, np.ndarray]], base: Settings) -> dict:
    """Cheaper estimators on the shortlist's real correspondences, against the default (pydegensac,
    ``ransac_max_iters``): thread CPU per image, and the inliers they find on the images the default
    gives >= ``qe_min_inliers`` (true matches, nearly all) and on the rest (chance matches)."""
    import cv2

    def degensac(iters: int) -> Callable:
        return lambda a, b: estimate_model(a, b, "homography", base.ransac_px, base.ransac_confidence, iters,
                                           base.ransac_seed)[1]

    def usac(method: int) -> Callable:
        def fit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            if len(a) < 4:
                return np.zeros(len(a), bool)
            _, mask = cv2.findHomography(np.float64(a), np.float64(b), method, base.ransac_px,
                                         maxIters=base.ransac_max_iters, confidence=base.ransac_confidence)
            return np.zeros(len(a), bool) if mask is None else mask.ravel().astype(bool)
        return fit

    variants = {f"pydegensac {base.ransac_max_iters} iterations (default)": degensac(base.ransac_max_iters),
                "pydegensac 1000 iterations": degensac(1000), "pydegensac 500 iterations": degensac(500),
                "OpenCV USAC_DEFAULT": usac(cv2.USAC_DEFAULT), "OpenCV USAC_FAST": usac(cv2.USAC_FAST),
                "OpenCV USAC_ACCURATE": usac(cv2.USAC_ACCURATE)}
    cv2.setNumThreads(1)
    out: dict[str, Any] = {}
    default = None
    for name, fit in variants.items():
        started = time.thread_time()
        inliers = np.array([int(np.asarray(fit(a, b)).sum()) for a, b in correspondences])
        ms = 1000 * (time.thread_time() - started) / max(1, len(correspondences))
        default = inliers if default is None else default
        true = default >= base.qe_min_inliers
        ratio = inliers[true] / default[true]
        out[name] = {"cpu_ms_per_image": round(ms, 2), "images": len(inliers),
                     "true_matches": int(true.sum()),
                     "inlier_ratio_to_default_on_true_median": round(float(np.median(ratio)), 3) if true.any() else None,
                     "inlier_ratio_to_default_on_true_min": round(float(ratio.min()), 3) if true.any() else None,
                     "inliers_on_the_rest_max": int(inliers[~true].max()) if (~true).any() else None}
    return out


def batched_mutual(query: np.ndarray, codes: list[np.ndarray], t: float, block_images: int) -> list[tuple]:
    """The batched alternative: decode ``block_images`` images' codes, one product into one reused
    buffer, then each image's reductions on its columns (same pairs as ``mutual_matches``)."""
    out: list[tuple] = []
    buffer = np.empty((len(query), block_images * max(len(c) for c in codes)), np.float32)
    for start in range(0, len(codes), block_images):
        chunk = codes[start : start + block_images]
        rows = decode_codes(np.concatenate(chunk))
        similarity = buffer[:, : len(rows)]
        np.matmul(query, rows.T, out=similarity)
        column = 0
        for image_codes in chunk:
            out.append(mutual_of(similarity[:, column : column + len(image_codes)], t))
            column += len(image_codes)
    return out


def gil_released(work: Callable[[], None], seconds: float = 0.5) -> dict:
    """Counts of a pure-Python loop in another thread, alone and while ``work`` runs (per second)."""
    state = {"stop": False, "count": 0}

    def spin() -> None:
        while not state["stop"]:
            state["count"] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.1)
    start = state["count"]
    time.sleep(seconds)
    alone = (state["count"] - start) / seconds
    start, started = state["count"], time.perf_counter()
    work()
    elapsed = time.perf_counter() - started
    during = (state["count"] - start) / elapsed
    state["stop"] = True
    thread.join()
    return {"spin_per_s_alone": round(alone), "spin_per_s_during": round(during), "work_s": round(elapsed, 3),
            "released": bool(during > 0.25 * alone)}


def hit_key(hits) -> list:
    return [(h.image_id, h.inliers, h.votes, round(float(h.score), 6)) for h in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3110)
    parser.add_argument("--features", type=Path, default=cached_features.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "verify_speed.json")
    args = parser.parse_args()
    data = cached_features.load(args.features)
    base = Settings(shortlist_mode="global", correspondences="matching", keypoint_vectors=False)
    result: dict[str, Any] = {
        "benchmark": "verify_speed.py",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_id": data.model_id,
        "data": {"photos": len(data.database), "queries": len(data.queries), "images": args.images,
                 "features": data.source, "replication": cached_features.REPLICATION},
        "plan": {"shortlist_mode": "global", "correspondences": "matching", "shortlist_size": base.shortlist_size,
                 "query_max_descriptors": base.query_max_descriptors, "min_inliers": base.min_inliers,
                 "ransac_max_iters": base.ransac_max_iters, "query_expansion": base.query_expansion},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    with tempfile.TemporaryDirectory(prefix="verify-speed-") as scratch:
        backend = EmbeddedBackend(Path(scratch) / "index", keypoint_vectors=False)
        for batch in cached_features.record_batches(data, 0, args.images, 200):
            backend.upsert(batch)
        cache = MemoryLocationCache()
        searchers = {name: Searcher(backend, cache, base.model_copy(update={"verify_threads": threads}), data.model_id)
                     for name, threads in VARIANTS.items()}
        for query in data.queries[:3]:  # warm the cache (codes and locations) and the code paths
            searchers["auto"].search(query)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        auto_threads, same = [], True
        load = [os.getloadavg()[0]]
        for query in data.queries:
            reference = None
            for name, searcher in searchers.items():
                if name == "auto":
                    auto_threads.append(verify_thread_count(0))
                if name in WHOLE_PRODUCT:
                    search_module.mutual_matches = whole_product_mutual
                try:
                    started = time.perf_counter()
                    hits = searcher.search(query)
                    times[name].append(1000 * (time.perf_counter() - started))
                finally:
                    search_module.mutual_matches = mutual_matches
                key = hit_key(hits)
                reference = reference or key
                same &= key == reference
        load.append(os.getloadavg()[0])
        result["search"] = {
            name: {"p50_ms": round(float(np.percentile(v, 50)), 1), "p95_ms": round(float(np.percentile(v, 95)), 1),
                   "mean_ms": round(statistics.fmean(v), 1), "queries": len(v)}
            for name, v in times.items()
        }
        result["search"]["auto"]["threads_chosen"] = dict(zip(*np.unique(auto_threads, return_counts=True)))
        result["search"]["auto"]["threads_chosen"] = {str(k): int(v) for k, v in result["search"]["auto"]["threads_chosen"].items()}
        result["search_same_hits_order_inliers"] = bool(same)
        result["search_loadavg_1min"] = load
        ratio = result["search"]["1 thread (old default)"]["p50_ms"] / result["search"]["2 threads"]["p50_ms"]
        result["search_p50_speedup_2_threads"] = round(ratio, 2)
        ratio = result["search"]["2 threads, whole product (session 6)"]["p50_ms"] / result["search"]["2 threads"]["p50_ms"]
        result["search_p50_speedup_blocked_product"] = round(ratio, 2)

        # per image: matching vs RANSAC (thread CPU time), batched products, match counts
        match_ms, ransac_ms, counts = [], [], []
        per_image_ms, batched_ms, whole_ms = [], [], []
        same_pairs = same_as_whole = True
        correspondences: list[tuple[np.ndarray, np.ndarray]] = []
        with threadpool_limits(limits=1, user_api="blas"):
            for query in data.queries:
                shortlist = [i for i, _ in backend.global_knn(query.global_desc, base.shortlist_size)]
                codes = backend.descriptor_codes(shortlist)
                locations = backend.keypoints(shortlist)
                q = query.descriptors[: base.query_max_descriptors]
                started = time.thread_time()
                pairs = [mutual_matches(q, codes[i], base.knn_min_similarity) for i in shortlist]
                per_image_ms.append(1000 * (time.thread_time() - started))
                started = time.thread_time()
                whole = [whole_product_mutual(q, codes[i], base.knn_min_similarity) for i in shortlist]
                whole_ms.append(1000 * (time.thread_time() - started))
                same_as_whole &= all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(pairs, whole))
                started = time.thread_time()
                batched = batched_mutual(q, [codes[i] for i in shortlist], base.knn_min_similarity, 4)
                batched_ms.append(1000 * (time.thread_time() - started))
                same_pairs &= all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(pairs, batched))
                for image_id, (qi, di) in zip(shortlist, pairs):
                    counts.append(len(qi))
                    correspondences.append((query.keypoints[qi], locations[image_id][di]))
                    started = time.thread_time()
                    estimate_model(query.keypoints[qi], locations[image_id][di], base.ransac_model, base.ransac_px,
                                   base.ransac_confidence, base.ransac_max_iters, base.ransac_seed, base.min_inlier_spread)
                    ransac_ms.append(1000 * (time.thread_time() - started))
                match_ms.append(per_image_ms[-1] / len(shortlist))
        result["per_image_cpu_ms"] = {"matching_median": round(statistics.median(match_ms), 2),
                                      "ransac_median": round(statistics.median(ransac_ms), 2),
                                      "ransac_mean": round(statistics.fmean(ransac_ms), 2)}
        result["batched_product"] = {
            "per_image_products_ms_per_query_median": round(statistics.median(per_image_ms), 1),
            "batched_4_images_ms_per_query_median": round(statistics.median(batched_ms), 1),
            "same_pairs": bool(same_pairs),
            "batched_over_per_image": round(statistics.median(batched_ms) / statistics.median(per_image_ms), 2),
        }
        result["blocked_product"] = {
            "block_rows": MATCH_BLOCK_ROWS,
            "blocked_ms_per_query_median": round(statistics.median(per_image_ms), 1),
            "whole_product_ms_per_query_median": round(statistics.median(whole_ms), 1),
            "blocked_over_whole": round(statistics.median(per_image_ms) / statistics.median(whole_ms), 2),
            "same_pairs": bool(same_as_whole),
        }
        result["mutual_matches_per_shortlisted_image"] = {
            "min": int(min(counts)), "p5": float(np.percentile(counts, 5)), "median": float(np.median(counts)),
            "max": int(max(counts)), "images": len(counts),
            "below_min_inliers": int(sum(c < base.min_inliers for c in counts)),
            "histogram": np.histogram(counts, bins=20)[0].tolist(),
            "histogram_edges": [round(float(e), 1) for e in np.histogram(counts, bins=20)[1]],
        }
        result["ransac_alternatives"] = ransac_alternatives(correspondences, base)
        backend.close()

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1000, (300, 2))
    b = a + rng.normal(0, 3, a.shape)
    b[100:] = rng.uniform(0, 1000, (200, 2))
    x = rng.standard_normal((1000, 40)).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        result["gil"] = {
            "pydegensac_findHomography": gil_released(
                lambda: [pydegensac.findHomography(a, b, 12.0, 0.999, 2000, seed=0) for _ in range(40)]),
            "numpy_matmul_1000x40x1000": gil_released(lambda: [x @ x.T for _ in range(100)]),
        }
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=1, default=str))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(result["search"])
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [result["search"][n]["p50_ms"] for n in names], 0.4, label="p50")
    axes[0].bar(x + 0.2, [result["search"][n]["p95_ms"] for n in names], 0.4, label="p95")
    axes[0].set_xticks(x, [n.replace(", ", ",\n") for n in names], fontsize=7)
    axes[0].set_ylabel("search ms (global + matching, 100 verified)")
    axes[0].set_title(f"load avg {result['search_loadavg_1min'][0]:.1f}-{result['search_loadavg_1min'][1]:.1f}, "
                      f"{result['machine']['cpu_count']} cores", fontsize=9)
    axes[0].legend()
    b = result["batched_product"]
    w = result["blocked_product"]
    axes[1].bar(["whole product\nper image", f"blocks of {w['block_rows']}\nrows (default)", "batched,\n4 images"],
                [w["whole_product_ms_per_query_median"], w["blocked_ms_per_query_median"],
                 b["batched_4_images_ms_per_query_median"]], color="tab:orange")
    axes[1].set_ylabel("matching CPU ms per query (100 images)")
    m = result["mutual_matches_per_shortlisted_image"]
    edges = m["histogram_edges"]
    axes[2].bar(edges[:-1], m["histogram"], width=np.diff(edges), align="edge", color="tab:green")
    axes[2].axvline(result["plan"]["min_inliers"], color="k", linestyle="--", label="min_inliers")
    axes[2].set_xlabel("mutual matches per shortlisted image")
    axes[2].legend()
    fig.suptitle(f"verify_speed.py: {result['data']['images']} images (real features replicated), "
                 f"{result['data']['queries']} real queries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
