"""Growing an index (issue 13 item 5): search latency, global kNN recall, bytes and ingest rate by size.

    python benchmarks/scale.py --sizes 10000 30000 [--backends elasticsearch embedded] [--nodes 1]

Data: real features (the default model's cache: paris250 photos + distractors and the 38 query
crops), the database replicated with perturbations beyond the real photos (cached_features.py).
One index per backend grows through the sizes with the shipped defaults (Elasticsearch: no keypoint
vectors, int8_hnsw global vectors; embedded: keypoint vectors in faiss, whose structure follows the
size, delf_es/index/embedded/structure.py), added with ``DelfEs.add_features_bulk`` (features given;
the embedded ingest includes the keypoint index's adds and its retrains as it grows).
At each size: search p50/p95 over the real queries with each backend's default plan (Elasticsearch:
global shortlist of 100 + matching + RANSAC; embedded: hybrid shortlist (keypoint kNN votes + global
kNN) + kNN correspondences; the location/code cache warm in Redis or in memory),
global kNN recall@10 against exact search over every stored global descriptor, bytes per image
(Elasticsearch ``_stats`` + ``_disk_usage`` by field; embedded: files), the ingest rate of the
increment (a bulk load past ``es_bulk_load_images``: refresh off, no replicas, then the replicas
rebuilt: the wait for green is timed apart), and Elasticsearch's heap.  Embedded rows also carry the
keypoint kNN recall@10 against exact inner-product search over every stored descriptor (read back
from SQLite in chunks, faiss.knn; 8 real query crops x 100 descriptors), at the shipped nprobe and a
sweep of others, the faiss structure, the snapshot write, and the process RSS.  ``--nodes`` is recorded as
given: the cluster behind ``--es-url`` (several node URLs, comma-separated), with ``--shards`` /
``--replicas``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cached_features  # noqa: E402
from results_io import RESULTS, kept_rows, machine, write_json  # noqa: E402
from search_speed import StageTimer, cache_flush, embedded_bytes, es_bytes, measure_search  # noqa: E402

from delf_es.cache import LocationCache, MemoryLocationCache, RedisLocationCache  # noqa: E402
from delf_es.eval.run import drop_indices  # noqa: E402
from delf_es.index.embedded.keypoint_index import KEYPOINT_BITS, MAX_KEYPOINTS, keypoint_ids  # noqa: E402
from delf_es.index.embedded.storage import DATABASE_NAME, descriptor_chunks  # noqa: E402
from delf_es.index.embedded.structure import structure_of  # noqa: E402
from delf_es.sdk import DelfEs  # noqa: E402
from delf_es.settings import Settings  # noqa: E402

K = 10
RECALL_QUERIES, RECALL_DESCRIPTORS = 8, 100  # as benchmarks/embedded_recall.py: 800 query descriptors
EXACT_CHUNK = 2_000_000  # stored vectors per exact-search chunk (320 MB of float32)


def global_recall(engine: DelfEs, data: cached_features.CachedData, vectors: np.ndarray, ids: list[str]) -> float:
    """recall@10 of the backend's global kNN against exact search over the stored global
    descriptors ``vectors`` (images x G float32, kept from the ingest: the images' whole features
    would not fit in memory at 100k) of images ``ids``."""
    recalls = []
    for query in data.queries:
        exact = {ids[i] for i in np.argsort(-(vectors @ query.global_desc), kind="stable")[:K]}
        found = {hit.image_id for hit in engine.backend.global_knn(query.global_desc, K)}
        recalls.append(len(exact & found) / K)
    return round(statistics.fmean(recalls), 4)


def knn_at_shortlist(engine: DelfEs, data: cached_features.CachedData, vectors: np.ndarray, ids: list[str]) -> dict:
    """The global kNN as the search calls it (k = shortlist_size): its median latency, and the
    recall@10 of its top 10 against exact search (k sets how many int8 candidates are re-scored
    with the float vectors, so this is the recall the shortlist sees; ``global_recall`` asks for
    k = 10)."""
    k = engine.settings.shortlist_size
    recalls, latencies = [], []
    for query in data.queries:
        exact = {ids[i] for i in np.argsort(-(vectors @ query.global_desc), kind="stable")[:K]}
        started = time.perf_counter()
        found = [hit.image_id for hit in engine.backend.global_knn(query.global_desc, k)]
        latencies.append(1000 * (time.perf_counter() - started))
        recalls.append(len(exact & set(found[:K])) / K)
    return {"k": k, "recall_at_10": round(statistics.fmean(recalls), 4),
            "p50_ms": round(statistics.median(latencies), 1)}


def settle(client: Any, alias: str, timeout_s: float = 300.0) -> dict:
    """Wait until the index is at rest before its searches are timed: Elasticsearch's merges after a
    load (they ran for minutes beside the first measured searches of session 6 and 7's first run)
    finished, and the 1-minute load average under 1.5 (this process is idle meanwhile), up to
    ``timeout_s``; returns what was waited for, to be recorded with the row."""
    started = time.perf_counter()
    merges = None
    while time.perf_counter() - started < timeout_s:
        if client is not None:
            stats = client.indices.stats(index=f"{alias}*", metric="merge")["_all"]["total"]["merges"]
            merges = stats["current"]
        if not merges and os.getloadavg()[0] < 1.5:
            break
        time.sleep(5)
    return {"waited_s": round(time.perf_counter() - started, 1), "merges_running": merges,
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def exact_keypoints(directory: Path, queries: np.ndarray) -> tuple[np.ndarray, dict[int, str], float]:
    """The exact ``K`` nearest stored keypoints of each query (Q, D) by inner product, over every
    descriptor in the embedded index's SQLite file, read in chunks: faiss ids (Q, K), the image id
    of each SQLite row and the seconds it took."""
    started = time.perf_counter()
    db = sqlite3.connect(f"file:{directory / DATABASE_NAME}?mode=ro", uri=True)
    best_sims = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    names: dict[int, str] = {}
    for chunk in descriptor_chunks(db, queries.shape[1], EXACT_CHUNK):
        names.update(zip(chunk.rows.tolist(), chunk.image_ids))
        sims, positions = faiss.knn(queries, chunk.vectors, min(K, len(chunk.vectors)),
                                    metric=faiss.METRIC_INNER_PRODUCT)
        sims = np.concatenate([best_sims, sims], axis=1)
        ids = np.concatenate([best_ids, keypoint_ids(chunk.rows, chunk.counts)[positions]], axis=1)
        keep = np.argsort(-sims, axis=1, kind="stable")[:, :K]
        best_sims, best_ids = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
    db.close()
    return best_ids, names, time.perf_counter() - started


def keypoint_recall(backend: Any, data: cached_features.CachedData, nprobes: list[int]) -> dict:
    """recall@10 of the embedded ``backend.knn`` against exact search (:func:`exact_keypoints`), at
    the backend's own nprobe and at each of ``nprobes`` (IVF only), with the kNN time of the 800
    query descriptors."""
    queries = np.ascontiguousarray(np.concatenate(
        [q.descriptors[:RECALL_DESCRIPTORS] for q in data.queries[:RECALL_QUERIES]]), np.float32)
    exact, names, exact_s = exact_keypoints(backend.directory, queries)
    truth = [{(names[int(i) >> KEYPOINT_BITS], int(i) & (MAX_KEYPOINTS - 1)) for i in exact[q]}
             for q in range(len(queries))]

    def measure() -> dict:
        started = time.perf_counter()
        found = backend.knn(queries, K)
        seconds = time.perf_counter() - started
        got: dict[int, set] = {}
        for q, image_id, kp in zip(found.query_index, found.image_ids, found.keypoint_index):
            got.setdefault(int(q), set()).add((str(image_id), int(kp)))
        recall = statistics.fmean(len(truth[q] & got.get(q, set())) / K for q in range(len(queries)))
        return {"recall_at_10": round(recall, 4), "knn_ms_per_1000_descriptors": round(1e6 * seconds / len(queries), 1)}

    index = backend._index  # the benchmark sets nprobe on the live index (put back after)
    structure = structure_of(index)
    out: dict[str, Any] = {"faiss_factory": structure.factory, "nlist": structure.nlist,
                           "nprobe": int(getattr(index, "nprobe", 0)), "vectors": int(index.ntotal),
                           "query_descriptors": len(queries), "exact_s": round(exact_s, 1), **measure()}
    if structure.nlist:
        default = index.nprobe
        out["by_nprobe"] = {}
        for nprobe in sorted(set(nprobes) - {default}):
            if nprobe <= structure.nlist:
                index.nprobe = nprobe
                out["by_nprobe"][str(nprobe)] = measure()
        index.nprobe = default
    return out


def rss_mb() -> dict:
    """The process's resident memory now and its peak, MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def es_heap(client: Any) -> dict:
    stats = client.nodes.stats(metric="jvm")["nodes"]
    used = [node["jvm"]["mem"]["heap_used_in_bytes"] for node in stats.values()]
    limit = [node["jvm"]["mem"]["heap_max_in_bytes"] for node in stats.values()]
    return {"heap_used_mb": [round(u / 2**20) for u in used], "heap_max_mb": [round(m / 2**20) for m in limit]}


def run(kind: str, data: cached_features.CachedData, args: argparse.Namespace, save) -> list[dict]:
    alias = f"bench-scale-{uuid.uuid4().hex[:8]}"
    scratch = args.scratch / alias
    client = None
    if kind == "elasticsearch":
        from delf_es.index.es.transport import connect

        settings = Settings(es_url=args.es_url, redis_url=args.redis_url, index_alias=alias,
                            es_number_of_shards=args.shards, es_number_of_replicas=args.replicas)
        cache: LocationCache = RedisLocationCache(settings.redis_url, prefix=f"bench:{alias}")
        client = connect(settings, request_timeout=1800)
    else:
        settings = Settings(backend="embedded", data_dir=scratch.parent, index_alias=alias)  # the shipped defaults
        cache = MemoryLocationCache()
    engine = DelfEs(settings, cache=cache)
    timer = StageTimer()
    timer.wrap(engine.backend, "global_knn", "global_knn")
    timer.wrap(cache, "read_many", "codes_and_locations_from_cache")
    if client is None:
        timer.wrap(engine.backend, "knn", "keypoint_knn")
        rebuilds = StageTimer()  # the keypoint index's retrains during the ingest (inside upsert)
        rebuilds.wrap(engine.backend, "_rebuild_index", "rebuild")
    rows, indexed = [], 0
    stored_globals: list[np.ndarray] = []
    stored_ids: list[str] = []

    def kept(features):  # the global descriptor of each ingested image, for the exact recall
        stored_globals.append(features.global_desc)
        stored_ids.append(features.image_id)
        return features

    try:
        for size in sorted(args.sizes):
            load = [os.getloadavg()[0]]
            started = time.perf_counter()
            items = ((f, f.image_id, {"copy": i // len(data.database)})
                     for i in range(indexed, size) for f in [kept(cached_features.replica(data.database, i))])
            report = engine.add_features_bulk(items, batch_size=64)
            seconds = time.perf_counter() - started
            load.append(os.getloadavg()[0])
            if not report.ok or engine.count() != size:
                raise RuntimeError(f"ingest failed: {report.failed[:3]}, {engine.count()} indexed")
            added, indexed = size - indexed, size
            green_s = 0.0
            if client is not None and args.replicas:  # a bulk load leaves the replicas to rebuild after it
                waited = time.perf_counter()
                client.cluster.health(index=f"{alias}*", wait_for_status="green", timeout="1800s")
                green_s = time.perf_counter() - waited
            row: dict[str, Any] = {"backend": kind, "nodes": args.nodes if client is not None else 1, "images": size,
                                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "ingest_images_per_s": round(added / seconds, 2),
                                   "ingest": {"images": added, "seconds": round(seconds, 1), "loadavg_1min": load,
                                              "replicas_green_after_s": round(green_s, 1),
                                              "images_per_s_until_green": round(added / (seconds + green_s), 2)}}
            if client is not None:  # the embedded index has no background merges to wait for
                row["settle"] = settle(client, alias)
            search = measure_search(engine, timer, data.queries)
            row.update({"p50_ms": search["p50_ms"], "p95_ms": search["p95_ms"], "search": search,
                        "plan": list(settings.search_plan(engine.backend.has_keypoint_vectors()))})
            stored = np.stack(stored_globals)  # (images, D): the exact recall's database, once per size
            row["recall_at_10"] = global_recall(engine, data, stored, stored_ids)
            if client is not None and args.candidates:
                # the recall knob: the same queries at other num_candidates (the backend's kNN
                # reads it from its Queries part; put back after)
                default = engine.backend._queries.global_num_candidates
                row["recall_at_10_by_num_candidates"] = {}
                row["global_knn_by_num_candidates"] = {}
                for candidates in args.candidates:
                    engine.backend._queries.global_num_candidates = candidates
                    row["recall_at_10_by_num_candidates"][str(candidates)] = global_recall(
                        engine, data, stored, stored_ids)
                    row["global_knn_by_num_candidates"][str(candidates)] = knn_at_shortlist(
                        engine, data, stored, stored_ids)
                engine.backend._queries.global_num_candidates = default
            if args.shortlists:
                # the latency knob: the same index and queries verifying fewer images (the
                # default stays settings.shortlist_size; this only measures what a smaller one buys)
                row["search_by_shortlist_size"] = {
                    str(shortlist): search_with(engine, timer, data.queries, shortlist_size=shortlist)
                    for shortlist in args.shortlists}
            if args.plans:
                # other search plans on the same index and queries (the default stays
                # settings.search_plan; this measures what another one costs at this size)
                row["search_by_plan"] = {
                    plan: search_with(engine, timer, data.queries,
                                      **dict(zip(("shortlist_mode", "correspondences"), plan.split(":"))))
                    for plan in args.plans}
            if client is not None:
                row["bytes"] = es_bytes(client, alias, size)
                row.update(es_heap(client))
                row["shards"], row["replicas"] = args.shards, args.replicas
                total = client.indices.stats(index=f"{alias}*", metric="store")["_all"]["total"]["store"]["size_in_bytes"]
                row["disk_mb_all_copies"] = round(total / 2**20, 1)
            else:
                started = time.perf_counter()
                engine.backend.refresh()  # the faiss snapshot, as a close would write it
                row["ingest"]["rebuild_s"] = round(rebuilds.take().get("rebuild", 0.0), 1)
                row["snapshot_write_s"] = round(time.perf_counter() - started, 1)
                row["bytes"] = embedded_bytes(scratch, size)
                recall = keypoint_recall(engine.backend, data, args.nprobes)
                row["keypoint_recall_at_10"] = recall["recall_at_10"]
                row["keypoint_knn"] = recall
                row.update(rss_mb())
            row["bytes_per_image"] = row["bytes"]["store_bytes_per_image"]
            row["disk_mb"] = round(row["bytes_per_image"] * size / 2**20, 1)
            rows.append(row)
            save(rows)
            print(json.dumps({k: v for k, v in row.items() if k not in ("bytes", "search")}), flush=True)
    finally:
        engine.close()
        cache_flush(cache)
        if client is not None:
            drop_indices(client, f"{alias}*")
            client.close()
        if args.keep:
            print(f"kept {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return rows


def search_with(engine: DelfEs, timer: StageTimer, queries: list, **update: Any) -> dict:
    """``measure_search`` with ``update`` applied to the engine's settings, which are put back after."""
    default_settings = engine.settings
    engine.settings = default_settings.model_copy(update=update)
    try:
        return measure_search(engine, timer, queries)
    finally:
        engine.settings = default_settings


def search_plan_argument(text: str) -> str:
    """``shortlist:correspondences`` (e.g. ``global:matching``), checked against the settings' choices."""
    mode, _, correspondences = text.partition(":")
    try:
        Settings(shortlist_mode=mode, correspondences=correspondences)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return f"{mode}:{correspondences}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keypoints = [r for r in result["rows"] if "keypoint_knn" in r]
    fig, axes = plt.subplots(1, 5 if keypoints else 4, figsize=(22 if keypoints else 18, 4.5))
    for kind in sorted({r["backend"] for r in result["rows"]}):
        for nodes in sorted({r["nodes"] for r in result["rows"] if r["backend"] == kind}):
            rows = [r for r in result["rows"] if r["backend"] == kind and r["nodes"] == nodes]
            sizes = [r["images"] for r in rows]
            label = f"{kind} ({nodes} node{'s' if nodes > 1 else ''})"
            axes[0].plot(sizes, [r["p50_ms"] for r in rows], marker="o", label=f"{label} p50")
            axes[0].plot(sizes, [r["p95_ms"] for r in rows], marker="x", linestyle="--", label=f"{label} p95")
            axes[1].plot(sizes, [r["recall_at_10"] for r in rows], marker="o", label=label)
            axes[2].plot(sizes, [r["bytes_per_image"] / 1000 for r in rows], marker="o", label=f"{label} store")
            if kind == "elasticsearch":  # the fields' sum does not move with the merges the store waits for
                fields = [sum(sum(v.values()) for part in ("images", "keypoints")
                              for v in r["bytes"][part]["disk_usage_by_field_per_image"].values()) for r in rows]
                axes[2].plot(sizes, [b / 1000 for b in fields], marker=".", linestyle="--", label=f"{label} fields")
            axes[3].plot(sizes, [r["ingest_images_per_s"] for r in rows], marker="o", label=label)
    if keypoints:  # embedded: keypoint kNN recall@10 vs exact, at the shipped nprobe and the sweep
        sizes = [r["images"] for r in keypoints]
        axes[4].plot(sizes, [r["keypoint_recall_at_10"] for r in keypoints], marker="o", color="k",
                     label="shipped nprobe (" + ", ".join(str(r["keypoint_knn"]["nprobe"]) for r in keypoints) + ")")
        for nprobe in sorted({int(p) for r in keypoints for p in r["keypoint_knn"].get("by_nprobe", {})}):
            points = [(r["images"], r["keypoint_knn"]["by_nprobe"][str(nprobe)]["recall_at_10"])
                      for r in keypoints if str(nprobe) in r["keypoint_knn"].get("by_nprobe", {})]
            axes[4].plot(*zip(*points), marker=".", linestyle="--", label=f"nprobe {nprobe}")
        axes[4].set_xscale("log")
        axes[4].set_xlabel("images")
        axes[4].set_ylabel("keypoint kNN recall@10 vs exact")
        axes[4].axhline(0.95, color="k", linestyle=":", linewidth=1)
        axes[4].legend(fontsize=7)
    for ax, ylabel, target in ((axes[0], "search ms (default plan)", 200), (axes[1], "global kNN recall@10", 0.98),
                               (axes[2], "KB per image", 100), (axes[3], "ingest images/s (features given)", 20)):
        ax.set_xscale("log")
        ax.set_xlabel("images")
        ax.set_ylabel(ylabel)
        ax.axhline(target, color="k", linestyle=":", linewidth=1)
        ax.legend(fontsize=7)
    fig.suptitle(f"scale.py: real features replicated with perturbations; load avg at start "
                 f"{result['machine']['loadavg_at_start'][0]:.1f} on {result['machine']['cpu_count']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000])
    parser.add_argument("--backends", nargs="+", default=["elasticsearch", "embedded"], choices=["elasticsearch", "embedded"])
    parser.add_argument("--nodes", type=int, default=1, help="Elasticsearch nodes behind --es-url (recorded)")
    parser.add_argument("--shards", type=int, default=1, help="primary shards of the Elasticsearch indices")
    parser.add_argument("--replicas", type=int, default=0, help="replicas of the Elasticsearch indices")
    parser.add_argument("--candidates", type=int, nargs="*", default=[],
                        help="also measure the global recall@10 at these num_candidates (Elasticsearch)")
    parser.add_argument("--shortlists", type=int, nargs="*", default=[],
                        help="also measure search p50/p95 verifying this many images (shortlist_size)")
    parser.add_argument("--plans", nargs="*", default=[], type=search_plan_argument,
                        help="also measure search p50/p95 with these plans, as shortlist:correspondences "
                        "(e.g. global:matching)")
    parser.add_argument("--nprobes", type=int, nargs="*", default=[32, 64, 128, 256, 512],
                        help="embedded: also measure the keypoint recall@10 at these nprobe")
    parser.add_argument("--scratch", type=Path, default=Path("/work/cache/scale"),
                        help="where the benchmark's indexes live while it runs (deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the embedded index directory after the run")
    parser.add_argument("--note", default="", help="a note on this run's rows (e.g. where it stopped and why)")
    parser.add_argument("--es-url", default=os.environ.get("DELF_ES_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--redis-url", default=os.environ.get("DELF_ES_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--features", type=Path, default=cached_features.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    data = cached_features.load(args.features)
    # rows of other runs (another node count or backend) are kept; this run's replace their own
    kept = kept_rows(args.out, lambda r: not (
        r["backend"] in args.backends and r["nodes"] == (args.nodes if r["backend"] == "elasticsearch" else 1)))
    result: dict[str, Any] = {
        "benchmark": "scale.py",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_id": data.model_id,
        "data": {"photos": len(data.database), "queries": len(data.queries), "features": data.source,
                 "replication": cached_features.REPLICATION},
        "settings": json.loads(Settings().model_dump_json(include={"shortlist_size", "query_max_descriptors",
                                                                   "es_knn_num_candidates", "es_global_knn_num_candidates", "verify_threads",
                                                                   "es_bulk_load_images", "es_bulk_writers"})),
        "machine": machine(),
        "rows": kept,
    }
    notes = json.loads(args.out.read_text()).get("notes", {}) if args.out.exists() else {}
    for kind in args.backends:
        run_key = f"{kind}, {args.nodes if kind == 'elasticsearch' else 1} node(s)"
        notes.pop(run_key, None)
        if args.note:
            notes[run_key] = args.note
    result["notes"] = notes

    def save(rows: list[dict]) -> None:
        result["rows"] = kept + rows
        write_json(args.out, result)

    done: list[dict] = []
    for kind in args.backends:
        done += run(kind, data, args, lambda rows: save(done + rows))
    save(done)
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
