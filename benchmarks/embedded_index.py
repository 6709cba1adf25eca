"""Embedded index: upsert rate and keypoint-kNN latency, exact flat vs IVF.

Synthetic, model-free: each image has 1000 unit 40-d descriptors drawn around shared
cluster centres (DELF-like: many images share visual words), a 64-d global descriptor
and metadata ``{"group": i % 10}``.  Queries: 1000 descriptors, half noisy copies of one
stored image's descriptors (a true match), half from other clusters; k = 10.

Structures (``EmbeddedBackend(exact_limit=...)``):
  flat    exact_limit=None : IndexIDMap(IndexFlatIP), always exact
  ivf     exact_limit=0    : IndexIVFFlat from the first write (nlist 4 sqrt(n), nprobe 16)
  default exact_limit=200k : flat up to 200k keypoints, IVF above (the shipped default;
                             identical to flat at 100 images, so only run at 1000)

Reports medians over runs, recall@10 of the approximate structures against flat, filtered
kNN latency, and reopen time from the snapshot vs rebuilt from SQLite.  Runs single-threaded
by default (``faiss.omp_set_num_threads``) so results do not depend on a shared machine's load.

Usage::

    python benchmarks/embedded_index.py [--threads 1] [--runs 3] [--out benchmarks/results/embedded_index.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from delf_es.index.base import ImageRecord
from delf_es.index.embedded import EmbeddedBackend
from delf_es.types import Features

logger = logging.getLogger("benchmarks.embedded_index")

DIM = 40
GLOBAL_DIM = 64
KEYPOINTS = 1000
CENTRES = 4096
NOISE = 0.35  # norm of the noise added to a centre, before re-normalising
QUERIES = 1000
K = 10
BATCH = 50
MODEL_ID = "benchmark-synthetic@0"


def _normalise(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class Corpus:
    """Deterministic clustered descriptors for ``images`` images."""

    def __init__(self, images: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.centres = _normalise(rng.standard_normal((CENTRES, DIM)))
        self.images = images
        self.seed = seed

    def descriptors(self, image: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, image))
        picks = self.centres[rng.integers(0, CENTRES, KEYPOINTS)]
        return _normalise(picks + NOISE / np.sqrt(DIM) * rng.standard_normal((KEYPOINTS, DIM)))

    def record(self, image: int) -> ImageRecord:
        rng = np.random.default_rng((self.seed, image, 1))
        features = Features(
            image_id=f"img-{image:05d}",
            model_id=MODEL_ID,
            image_size=(1024, 768),
            keypoints=(rng.random((KEYPOINTS, 2)) * [1024, 768]).astype(np.float32),
            scales=np.ones(KEYPOINTS, np.float32),
            scores=rng.random(KEYPOINTS).astype(np.float32),
            descriptors=self.descriptors(image),
            global_desc=_normalise(rng.standard_normal((1, GLOBAL_DIM)))[0],
        )
        return ImageRecord(features.image_id, f"/photos/{image}.jpg", {"group": image % 10}, features, "2026-11-22T00:00:00Z")

    def queries(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, 424242))
        half = QUERIES // 2
        matching = self.descriptors(self.images // 2)[:half]
        matching = _normalise(matching + 0.1 / np.sqrt(DIM) * rng.standard_normal(matching.shape))
        other = _normalise(
            self.centres[rng.integers(0, CENTRES, QUERIES - half)]
            + NOISE / np.sqrt(DIM) * rng.standard_normal((QUERIES - half, DIM))
        )
        return np.concatenate([matching, other])


def _ingest(directory: Path, corpus: Corpus, exact_limit: int | None) -> tuple[EmbeddedBackend, float]:
    """Upsert every image in batches of BATCH; returns the open backend and the seconds spent in upsert."""
    backend = EmbeddedBackend(directory, exact_limit=exact_limit)
    spent = 0.0
    for start in range(0, corpus.images, BATCH):
        records = [corpus.record(i) for i in range(start, min(start + BATCH, corpus.images))]
        began = time.perf_counter()
        report = backend.upsert(records)
        spent += time.perf_counter() - began
        if not report.ok:
            raise RuntimeError(f"upsert failed: {report.failed[:3]}")
    return backend, spent


def _timed(function, runs: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(runs):
        began = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - began)
    return statistics.median(times), times, result


def _pairs(neighbours) -> set[tuple[int, str, int]]:
    return set(zip(neighbours.query_index.tolist(), neighbours.image_ids.tolist(), neighbours.keypoint_index.tolist()))


def run(threads: int, runs: int, sizes: list[int], out: Path) -> dict:
    faiss.omp_set_num_threads(threads)
    results = []
    reopen = {}
    total_began = time.perf_counter()
    for images in sizes:
        corpus = Corpus(images)
        queries = corpus.queries()
        structures = {"flat": None, "ivf": 0} if images <= 200 else {"flat": None, "default": 200_000}
        exact_pairs = None
        for name, exact_limit in structures.items():
            upsert_runs = runs if images <= 200 else max(1, runs - 1)
            upsert_times: list[float] = []
            for attempt in range(upsert_runs):
                with tempfile.TemporaryDirectory(prefix="delf-es-bench-") as tmp:
                    backend, spent = _ingest(Path(tmp) / "index", corpus, exact_limit)
                    upsert_times.append(spent)
                    if attempt == upsert_runs - 1:  # search on the last ingested copy
                        structure = type(backend._index).__name__
                        knn_median, knn_times, neighbours = _timed(lambda: backend.knn(queries, K), runs)
                        filt = {"term": {"metadata.group": 3}}
                        f10_median, _, f10 = _timed(lambda: backend.knn(queries, K, filt), runs)
                        half = {"range": {"metadata.group": {"lt": 5}}}
                        f50_median, _, f50 = _timed(lambda: backend.knn(queries, K, half), runs)
                        pairs = _pairs(neighbours)
                        if exact_pairs is None:
                            exact_pairs = pairs
                        recall = len(pairs & exact_pairs) / len(exact_pairs)
                        true_image = f"img-{images // 2:05d}"
                        entry = {
                            "images": images,
                            "keypoints_per_image": KEYPOINTS,
                            "vectors": images * KEYPOINTS,
                            "structure": name,
                            "faiss_index": structure,
                            "exact_limit": exact_limit,
                            "nprobe": backend.nprobe,
                            "nlist": getattr(backend._index, "nlist", None),
                            "upsert_images_per_s": round(images / statistics.median(upsert_times), 1),
                            "upsert_s_runs": [round(t, 3) for t in upsert_times],
                            "knn_s": round(knn_median, 4),
                            "knn_s_runs": [round(t, 4) for t in knn_times],
                            "knn_filtered_10pct_images_s": round(f10_median, 4),
                            "knn_filtered_50pct_images_s": round(f50_median, 4),
                            "recall_at_10_vs_flat": round(recall, 4),
                            "matching_queries_top1_on_true_image": round(
                                float(np.mean(backend.knn(queries[: QUERIES // 2], 1).image_ids == true_image)), 4
                            ),
                            "filtered_results_all_allowed": bool(
                                all(int(i[-5:]) % 10 == 3 for i in f10.image_ids)
                                and all(int(i[-5:]) % 10 < 5 for i in f50.image_ids)
                            ),
                        }
                        if images == max(sizes) and name != "flat":
                            began = time.perf_counter()
                            backend.close()
                            reopen["close_with_snapshot_s"] = round(time.perf_counter() - began, 3)
                            began = time.perf_counter()
                            EmbeddedBackend(Path(tmp) / "index", exact_limit=exact_limit).close()
                            reopen["open_from_snapshot_s"] = round(time.perf_counter() - began, 3)
                            for snapshot in (Path(tmp) / "index").glob("keypoints.*.faiss"):
                                snapshot.unlink()
                            began = time.perf_counter()
                            rebuilt = EmbeddedBackend(Path(tmp) / "index", exact_limit=exact_limit)
                            reopen["open_rebuilding_from_sqlite_s"] = round(time.perf_counter() - began, 3)
                            reopen["structure"] = f"{name} ({type(rebuilt._index).__name__}), {images} images"
                            rebuilt.close()
                        results.append(entry)
                        logger.info("%s", json.dumps(entry))
                    backend.close()
    report = {
        "benchmark": "embedded index: upsert rate and keypoint kNN latency",
        "machine": {
            "cpu_count": os.cpu_count(),
            "faiss_omp_threads": threads,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "workload": {
            "descriptor_dim": DIM,
            "cluster_centres": CENTRES,
            "noise_norm": NOISE,
            "queries": QUERIES,
            "k": K,
            "upsert_batch": BATCH,
            "runs": runs,
            "timing": "median over runs; upsert = seconds inside upsert(), SQLite (synchronous=FULL) + faiss",
        },
        "results": results,
        "reopen": reopen,
        "total_s": round(time.perf_counter() - total_began, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="numbers of images")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embedded_index.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.threads, args.runs, args.sizes, args.out)
    logger.info("wrote %s in %.0f s", args.out, report["total_s"])


if __name__ == "__main__":
    main()
