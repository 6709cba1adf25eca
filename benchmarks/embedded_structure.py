"""Choosing the embedded keypoint index's structure (issue 13 item 6): recall@10 against exact
search, kNN time, train/add time and bytes per vector, by faiss layout and nprobe.

    python benchmarks/embedded_structure.py --sizes 1000 10000 [--layouts IVF,Flat IVF_HNSW,SQ8 ...]
        [--sq8-range minmax] [--faiss-quantizer-ef]     # the variants production does not use

Data: real features (the default model's cache, 1000 keypoints per photo), replicated with
perturbations beyond the real photos (cached_features.py); the index is built in faiss directly
(no SQLite) with the production helpers (delf_es/index/embedded/structure.py: nlist = 4 sqrt(n),
spherical k-means on the production training picks, HNSW k-means assignment with an HNSW
quantizer).  Recall: 8 real query crops x 100 descriptors (800 query descriptors) against exact
inner-product search over every vector (faiss.knn).  kNN time: those 800 queries in one call,
scaled to 1000 (a search's query descriptors), one faiss thread.  Recall is measured against
exact kNN, not on any evaluation set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cached_features  # noqa: E402
from results_io import RESULTS, kept_rows, loadavg, machine, write_json  # noqa: E402

from delf_es.index.embedded.structure import (TRAIN_POINTS_PER_LIST, KeypointStructure, ivf_nlist,  # noqa: E402
                                              new_index, search_parameters, training_picks)

K = 10
QUERIES, DESCRIPTORS = 8, 100
LAYOUTS = {"IVF,Flat": (False, False), "IVF,SQ8": (False, True), "IVF_HNSW,Flat": (True, False),
           "IVF_HNSW,SQ8": (True, True)}


def database(data: cached_features.CachedData, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` images' descriptors stacked (vectors x D float32) and each image's count."""
    blocks = [cached_features.replica(data.database, i).descriptors for i in range(size)]
    return np.ascontiguousarray(np.concatenate(blocks), np.float32), np.array([len(b) for b in blocks])


def measure(layout: str, vectors: np.ndarray, counts: np.ndarray, queries: np.ndarray, exact: np.ndarray,
            args: argparse.Namespace) -> dict[str, Any]:
    hnsw, sq8 = LAYOUTS[layout]
    nlist = max(1, int(ivf_nlist(len(vectors)) * args.nlist_factor))
    structure = KeypointStructure(nlist, hnsw, sq8)
    index = new_index(structure, vectors.shape[1])
    if sq8 and args.sq8_range != "meanstd":  # the production default is RS_meanstd (structure.py)
        index.sq.rangestat = getattr(faiss.ScalarQuantizer, f"RS_{args.sq8_range}")
        index.sq.rangestat_arg = 0.001 if args.sq8_range == "quantiles" else 0.0
    images, picks = training_picks(counts, TRAIN_POINTS_PER_LIST * nlist)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sample = vectors[np.concatenate([starts[i] + p for i, p in zip(images, picks)])]
    started = time.perf_counter()
    index.train(sample)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    for first in range(0, len(vectors), 1_000_000):
        chunk = vectors[first:first + 1_000_000]
        index.add_with_ids(chunk, np.arange(first, first + len(chunk), dtype=np.int64))
    add_s = time.perf_counter() - started
    row: dict[str, Any] = {"layout": layout, "variant": variant(args, hnsw, sq8), "factory": structure.factory, "vectors": len(vectors), "nlist": nlist,
                           "train_points": len(sample), "train_s": round(train_s, 1), "add_s": round(add_s, 1),
                           "add_vectors_per_s": round(len(vectors) / add_s),
                           "bytes_per_vector": index.code_size + 8, "sweep": []}
    for nprobe in args.nprobes:
        if nprobe > nlist:
            continue
        index.nprobe = nprobe
        # --faiss-quantizer-ef: the HNSW quantizer left at faiss's own efSearch (16) at search
        params = faiss.SearchParametersIVF(nprobe=nprobe) if args.faiss_quantizer_ef else search_parameters(index)
        started = time.perf_counter()
        _, labels = index.search(queries, K, params=params)
        seconds = time.perf_counter() - started
        hits = [len(set(labels[q]) & set(exact[q])) / K for q in range(len(queries))]
        row["sweep"].append({"nprobe": nprobe, "recall_at_10": round(float(np.mean(hits)), 4),
                             "knn_1000_descriptors_ms": round(1000 * seconds * 1000 / len(queries), 1),
                             "loadavg_1min": loadavg()})
        print(layout, len(vectors), row["sweep"][-1], flush=True)
    return row


def variant(args: argparse.Namespace, hnsw: bool, sq8: bool) -> str:
    """What differs from the production helpers in this row ("production" when nothing)."""
    parts = ([f"sq8 range {args.sq8_range}"] if sq8 and args.sq8_range != "meanstd" else []) + \
        (["quantizer efSearch 16 at search"] if hnsw and args.faiss_quantizer_ef else [])
    return ", ".join(parts) or "production"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--nlist-factor", type=float, default=1.0, help="nlist = factor x 4 sqrt(n)")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--sq8-range", default="meanstd", choices=["meanstd", "minmax", "quantiles", "optim"],
                        help="SQ8 per-dimension range (faiss rangestat; production: meanstd, 3 std)")
    parser.add_argument("--faiss-quantizer-ef", action="store_true",
                        help="search the HNSW quantizer with faiss's own efSearch 16, not 2 x nprobe")
    parser.add_argument("--features", type=Path, default=cached_features.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "embedded_structure.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    data = cached_features.load(args.features)
    queries = np.ascontiguousarray(np.concatenate([q.descriptors[:DESCRIPTORS] for q in data.queries[:QUERIES]]))
    keep = kept_rows(args.out, lambda r: not (r["images"] in args.sizes and r["layout"] in args.layouts
                                              and r.get("nlist_factor", 1.0) == args.nlist_factor
                                              and r.get("variant") == variant(args, *LAYOUTS[r["layout"]])))
    result = {"benchmark": "embedded_structure.py", "model_id": data.model_id, "machine": machine(),
              "data": {"photos": len(data.database), "features": data.source,
                       "replication": cached_features.REPLICATION, "query_descriptors": len(queries)},
              "rows": keep}
    for size in sorted(args.sizes):
        vectors, counts = database(data, size)
        started = time.perf_counter()
        _, exact = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
        exact_s = time.perf_counter() - started
        for layout in args.layouts:
            row = {"images": size, "nlist_factor": args.nlist_factor, "exact_knn_s": round(exact_s, 1),
                   **measure(layout, vectors, counts, queries, exact, args)}
            result["rows"].append(row)
            write_json(args.out, result)
        del vectors


if __name__ == "__main__":
    main()
