"""Embedded index at scale (issue 13 item 6): keypoint kNN recall@10 and latency against ``nprobe``.

    python benchmarks/embedded_recall.py --sizes 1000 3000 10000 [--nprobes 16 32 64 128 256]

Data: real features (the default model's cache: paris250 photos + distractors, 1000 keypoints
each, and the query crops), the database replicated with perturbations beyond the real photos
(cached_features.py).  One directory grows through the sizes: the images are written with an exact
(flat) keypoint index, then the directory is reopened with the shipped ``exact_limit``, which
rebuilds the IVF index from SQLite at that size (nlist = 4 sqrt(vectors), the production rule; as
an index that grew past 4x its training would be retrained).  At each size and ``nprobe``:
recall@10 of ``backend.knn`` against exact float search over every stored descriptor (8 queries x
100 descriptors, as search_speed.py), the same within 0.01 cosine, and the kNN time of one
1000-descriptor query; then the end-to-end search p50/p95 (default embedded plan: hybrid
shortlist + kNN pairs) at the nprobe the backend now chooses.  Single faiss thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cached_features  # noqa: E402
from search_speed import exact_top_k  # noqa: E402

from delf_es.cache import MemoryLocationCache  # noqa: E402
from delf_es.index.embedded import EmbeddedBackend  # noqa: E402
from delf_es.search import Searcher  # noqa: E402
from delf_es.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
RECALL_QUERIES = 8
RECALL_DESCRIPTORS = 100


def recall(backend: EmbeddedBackend, data: cached_features.CachedData, size: int) -> dict:
    """recall@10 of backend.knn against exact search over the ``size`` images' descriptors."""
    images = [cached_features.replica(data.database, i) for i in range(size)]
    stored = np.concatenate([f.descriptors for f in images])
    owner = np.repeat(np.arange(size), [f.num_keypoints for f in images])
    first = np.concatenate([[0], np.cumsum([f.num_keypoints for f in images])[:-1]])
    position = {f.image_id: i for i, f in enumerate(images)}
    exact = []
    for query in data.queries[:RECALL_QUERIES]:
        q = query.descriptors[:RECALL_DESCRIPTORS]
        rows, sims = exact_top_k(stored, q, K)
        exact.append((q, rows, sims))

    def measure() -> dict:
        recalls, tolerant = [], []
        for q, rows, sims in exact:
            found = backend.knn(q, K)
            got: dict[int, set[tuple[str, int]]] = {}
            for qi, image_id, kp in zip(found.query_index, found.image_ids, found.keypoint_index):
                got.setdefault(int(qi), set()).add((str(image_id), int(kp)))
            for qi in range(len(q)):
                truth = {(images[owner[r]].image_id, int(r - first[owner[r]])) for r in rows[qi]}
                hits = got.get(qi, set())
                recalls.append(len(truth & hits) / K)
                kth = sims[qi, -1] - 0.01
                good = sum(1 for image_id, kp in hits
                           if float(stored[first[position[image_id]] + kp] @ q[qi]) >= kth)
                tolerant.append(min(good, K) / K)
        return {"recall_at_10": round(statistics.fmean(recalls), 4),
                "recall_at_10_within_0.01_cosine": round(statistics.fmean(tolerant), 4)}

    return measure


def knn_ms(backend: EmbeddedBackend, data: cached_features.CachedData, repeats: int = 3) -> float:
    times = []
    for query in data.queries[:repeats]:
        started = time.perf_counter()
        backend.knn(query.descriptors[:1000], K)
        times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 1)


def search_latency(backend: EmbeddedBackend, data: cached_features.CachedData) -> dict:
    settings = Settings(verify_threads=1)  # the default embedded plan, one thread (faiss has one too)
    searcher = Searcher(backend, MemoryLocationCache(), settings, data.model_id)
    for query in data.queries[:2]:
        searcher.search(query)
    times = []
    load = [os.getloadavg()[0]]
    for query in data.queries:
        started = time.perf_counter()
        searcher.search(query)
        times.append(1000 * (time.perf_counter() - started))
    load.append(os.getloadavg()[0])
    return {"plan": list(settings.search_plan()), "p50_ms": round(float(np.percentile(times, 50)), 1),
            "p95_ms": round(float(np.percentile(times, 95)), 1), "queries": len(times), "loadavg_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--features", type=Path, default=cached_features.DEFAULT_CACHE)
    parser.add_argument("--directory", type=Path, default=Path("/work/cache/scale/embedded-recall"))
    parser.add_argument("--out", type=Path, default=RESULTS / "embedded_recall.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    data = cached_features.load(args.features)
    shutil.rmtree(args.directory, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "embedded_recall.py",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_id": data.model_id,
        "data": {"photos": len(data.database), "queries": len(data.queries), "features": data.source,
                 "replication": cached_features.REPLICATION, "recall_queries": RECALL_QUERIES,
                 "recall_descriptors_per_query": RECALL_DESCRIPTORS},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "faiss_threads": 1},
        "rows": [],
    }
    indexed = 0
    for size in sorted(args.sizes):
        started = time.perf_counter()
        with EmbeddedBackend(args.directory, exact_limit=None) as writer:  # flat while writing: cheap adds
            for batch in cached_features.record_batches(data, indexed, size, 250):
                writer.upsert(batch)
            indexed = writer.count()
            # drop the flat snapshot: the next open builds the IVF from SQLite
            writer._snapshot_generation = writer._generation
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        backend = EmbeddedBackend(args.directory, exact_limit=Settings().embedded_exact_limit,
                                  nprobe=Settings().embedded_nprobe)
        build_s = time.perf_counter() - started
        index = backend._index
        row: dict[str, Any] = {"images": size, "vectors": int(index.ntotal), "faiss_index": type(index).__name__,
                               "nlist": int(getattr(index, "nlist", 0)), "write_s": round(write_s, 1),
                               "ivf_build_s": round(build_s, 1), "sweep": []}
        measure = recall(backend, data, size)
        for nprobe in args.nprobes:
            if isinstance(index, faiss.IndexIVF):
                index.nprobe = nprobe
            load = os.getloadavg()[0]
            row["sweep"].append({"nprobe": nprobe, **measure(), "knn_1000_descriptors_ms": knn_ms(backend, data),
                                 "loadavg_1min": load})
            print(size, row["sweep"][-1], flush=True)
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = backend._nprobe_for(index.nlist, isinstance(index, faiss.IndexIVFScalarQuantizer))
        row["default_nprobe"] = int(getattr(index, "nprobe", 0))
        row["search_default_plan"] = search_latency(backend, data)
        backend._snapshot_generation = backend._generation  # no multi-GB snapshot: the next open rebuilds
        backend.close()
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(row, indent=1), flush=True)
    plot(result, args.out.with_suffix(".png"))
    shutil.rmtree(args.directory, ignore_errors=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in result["rows"]:
        nprobes = [s["nprobe"] for s in row["sweep"]]
        label = f"{row['images']} images (nlist {row['nlist']})"
        axes[0].plot(nprobes, [s["recall_at_10"] for s in row["sweep"]], marker="o", label=label)
        axes[1].plot(nprobes, [s["knn_1000_descriptors_ms"] for s in row["sweep"]], marker="o", label=label)
    axes[0].axhline(0.95, color="k", linestyle="--", linewidth=1, label="target 0.95")
    axes[0].set_ylabel("keypoint kNN recall@10 vs exact")
    axes[1].set_ylabel("kNN ms, 1000 query descriptors, 1 thread")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nprobe")
        ax.legend(fontsize=8)
    fig.suptitle("embedded_recall.py: real features replicated with perturbations; IVF rebuilt at each size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
