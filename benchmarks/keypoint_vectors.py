"""Elasticsearch with and without keypoint vectors (issue 13 item 1): bytes per image and ingest rate.

    python benchmarks/keypoint_vectors.py --images 1000 [--out benchmarks/results/keypoint_vectors.json]

For each of ``keypoint_vectors`` True and False (same run, one after the other, on the same node):
a fresh index grows to ``--images`` images (real features of the paris250 photos + distractors
from the default feature cache, replicated with perturbations beyond the real ones, see
cached_features.py) through ``DelfEs.add_features_bulk`` (features given, batches of 32, the
location cache in Redis), then is refreshed and force-merged to one segment (what a loaded index
converges to); measured: ingest images/s (adds + final refresh), store bytes per image (``_stats``)
and by field (``_disk_usage``), and search p50/p95 with the default plan (global shortlist +
matching, which never reads the keypoint vectors) over the real queries.  The load average is
recorded at each measurement (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cached_features  # noqa: E402
from search_speed import StageTimer, cache_flush, es_bytes, measure_search  # noqa: E402

from delf_es.cache import RedisLocationCache  # noqa: E402
from delf_es.eval.run import drop_indices  # noqa: E402
from delf_es.sdk import DelfEs  # noqa: E402
from delf_es.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(data: cached_features.CachedData, images: int, keypoint_vectors: bool, args: argparse.Namespace) -> dict:
    from delf_es.index.es.transport import connect

    alias = f"bench-kpv-{uuid.uuid4().hex[:8]}"
    settings = Settings(es_url=args.es_url, redis_url=args.redis_url, index_alias=alias,
                        keypoint_vectors=keypoint_vectors)
    cache = RedisLocationCache(settings.redis_url, prefix=f"bench:{alias}")
    client = connect(settings, request_timeout=1800)
    engine = DelfEs(settings, cache=cache)
    row: dict[str, Any] = {"keypoint_vectors": keypoint_vectors, "images": images}
    try:
        items = ((f, f.image_id, {"copy": i // len(data.database)})
                 for i in range(images) for f in [cached_features.replica(data.database, i)])
        load = [os.getloadavg()[0]]
        started = time.perf_counter()
        report = engine.add_features_bulk(items, batch_size=32)
        seconds = time.perf_counter() - started
        load.append(os.getloadavg()[0])
        if not report.ok or engine.count() != images:
            raise RuntimeError(f"ingest failed: {report.failed[:3]}, {engine.count()} indexed")
        row["ingest"] = {"seconds": round(seconds, 1), "images_per_s": round(images / seconds, 2),
                         "loadavg_1min": load}
        started = time.perf_counter()
        client.indices.forcemerge(index=f"{alias},{alias}-keypoints", max_num_segments=1)
        engine.backend.refresh()
        row["force_merge_s"] = round(time.perf_counter() - started, 1)
        row["keypoint_documents"] = client.count(index=f"{alias}-keypoints")["count"]
        row["bytes"] = es_bytes(client, alias, images)
        timer = StageTimer()
        timer.wrap(engine.backend, "global_knn", "global_knn")
        timer.wrap(engine.backend, "descriptor_codes", "codes_from_index")
        row["search_default_plan"] = measure_search(engine, timer, data.queries)
        row["search_default_plan"]["plan"] = list(settings.search_plan(keypoint_vectors))
    finally:
        engine.close()
        drop_indices(client, f"{alias}*")
        cache_flush(cache)
        client.close()
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = ["with keypoint vectors" if r["keypoint_vectors"] else "without" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    axes[0].bar(labels, [r["bytes"]["store_bytes_per_image"] / 1000 for r in rows], color="tab:purple")
    axes[0].axhline(100, color="k", linestyle="--", linewidth=1, label="target 100 KB")
    axes[0].set_ylabel("KB per image on disk (merged)")
    axes[0].legend()
    axes[1].bar(labels, [r["ingest"]["images_per_s"] for r in rows], color="tab:blue")
    axes[1].axhline(20, color="k", linestyle="--", linewidth=1, label="target 20 images/s")
    axes[1].set_ylabel("ingest images/s (features given)")
    axes[1].legend()
    axes[2].bar([f"{l}\np50" for l in labels], [r["search_default_plan"]["p50_ms"] for r in rows], color="tab:green")
    axes[2].set_ylabel("search ms, default plan (global + matching)")
    fig.suptitle(f"keypoint_vectors.py: 1 Elasticsearch node, {rows[0]['images']} images (real features replicated), "
                 f"load avg {result['machine']['loadavg_at_start'][0]:.1f} at start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--es-url", default=os.environ.get("DELF_ES_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--redis-url", default=os.environ.get("DELF_ES_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--features", type=Path, default=cached_features.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "keypoint_vectors.json")
    args = parser.parse_args()
    data = cached_features.load(args.features)
    result: dict[str, Any] = {
        "benchmark": "keypoint_vectors.py",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_id": data.model_id,
        "data": {"photos": len(data.database), "queries": len(data.queries), "features": data.source,
                 "replication": cached_features.REPLICATION},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "rows": [],
    }
    for flag in (True, False):
        result["rows"].append(run_one(data, args.images, flag, args))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["rows"][-1], indent=1), flush=True)
    with_, without = result["rows"]
    result["ratios"] = {
        "bytes_without_over_with": round(without["bytes"]["store_bytes_per_image"] / with_["bytes"]["store_bytes_per_image"], 3),
        "ingest_without_over_with": round(without["ingest"]["images_per_s"] / with_["ingest"]["images_per_s"], 2),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
