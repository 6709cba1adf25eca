"""Bulk loading on Elasticsearch (issue 13 item 3): ingest images/s with features given, plain
writes against a bulk load (refresh off, no replicas, N concurrent write rounds), same data, one run.

    python benchmarks/bulk_load.py --images 3000 --variants plain bulk:1 bulk:2 bulk:4 [--nodes 3 --replicas 1]

Data: real features (cached_features.py: paris250 photos + distractors through the default model),
replicated with perturbations to ``--images``; generated before the timing.  Each variant loads
them into a fresh index (the shipped template, ``--shards`` / ``--replicas``) with
``DelfEs.add_features_bulk`` (batches of 64, the location cache in Redis, final refresh included):
``plain`` = ``es_bulk_load_images`` 0; ``bulk:W`` = bulk load from the first batch on with W
writers (``delf_es/index/es/bulk_load.py``).  Variants run in turns, ``--repeats`` times each, so
a drift of the shared machine's load spreads over all of them; the median rate is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cached_features  # noqa: E402
from results_io import RESULTS, loadavg, machine, write_json  # noqa: E402
from search_speed import cache_flush  # noqa: E402

from delf_es.cache import RedisLocationCache  # noqa: E402
from delf_es.eval.run import drop_indices  # noqa: E402
from delf_es.index.es.transport import connect  # noqa: E402
from delf_es.sdk import DelfEs  # noqa: E402
from delf_es.settings import Settings  # noqa: E402

BATCH = 64


def load_once(variant: str, images: list, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``images`` into a fresh index as ``variant``; the rate and the load around it."""
    alias = f"bench-bulk-{uuid.uuid4().hex[:8]}"
    bulk = variant.startswith("bulk:")
    settings = Settings(es_url=args.es_url, redis_url=args.redis_url, index_alias=alias,
                        es_number_of_shards=args.shards, es_number_of_replicas=args.replicas,
                        es_bulk_load_images=1 if bulk else 0, es_bulk_writers=int(variant.split(":")[1]) if bulk else 1)
    cache = RedisLocationCache(settings.redis_url, prefix=f"bench:{alias}")
    engine = DelfEs(settings, cache=cache)
    client = connect(settings, request_timeout=600)
    try:
        load = [loadavg()]
        started = time.perf_counter()
        report = engine.add_features_bulk(((f, f.image_id, None) for f in images), batch_size=BATCH)
        seconds = time.perf_counter() - started
        load.append(loadavg())
        if not report.ok or engine.count() != len(images):
            raise RuntimeError(f"{variant}: {len(report.failed)} failed, {engine.count()} indexed")
        if args.replicas:  # the replicas a bulk load skipped are rebuilt after it: wait for them (timed apart)
            waited = time.perf_counter()
            client.cluster.health(index=f"{alias}*", wait_for_status="green", timeout="600s")
            green_s = round(time.perf_counter() - waited, 1)
        else:
            green_s = 0.0
        return {"variant": variant, "images": len(images), "seconds": round(seconds, 1),
                "images_per_s": round(len(images) / seconds, 1), "green_after_s": green_s,
                "images_per_s_until_green": round(len(images) / (seconds + green_s), 1), "loadavg_1min": load}
    finally:
        engine.close()
        cache_flush(cache)
        drop_indices(client, f"{alias}*")
        client.close()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(summary)
    ax.bar(names, [summary[n]["images_per_s_median"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.plot([i] * len(summary[n]["images_per_s"]), summary[n]["images_per_s"], "k.", markersize=6)
    ax.set_ylabel("ingest images/s (features given)")
    ax.set_title(f"bulk_load.py: {result['images']} images, {result['nodes']} node(s), {result['replicas']} replica(s); "
                 f"load {result['machine']['loadavg_at_start'][0]:.1f} at start", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--variants", nargs="+", default=["plain", "bulk:1", "bulk:2", "bulk:4"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1, help="Elasticsearch nodes behind --es-url (recorded)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--es-url", default=os.environ.get("DELF_ES_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--redis-url", default=os.environ.get("DELF_ES_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--out", type=Path, default=RESULTS / "bulk_load.json")
    args = parser.parse_args()
    data = cached_features.load()
    images = [cached_features.replica(data.database, i) for i in range(args.images)]
    result: dict[str, Any] = {
        "benchmark": "bulk_load.py", "images": args.images, "nodes": args.nodes, "shards": args.shards,
        "replicas": args.replicas, "batch_size": BATCH, "model_id": data.model_id,
        "data": {"photos": len(data.database), "replication": cached_features.REPLICATION},
        "machine": machine(), "runs": [],
    }
    for turn in range(args.repeats):
        for variant in args.variants:
            run = load_once(variant, images, args) | {"turn": turn}
            result["runs"].append(run)
            print(run, flush=True)
            write_json(args.out, result)
    result["summary"] = {
        v: {"images_per_s": [r["images_per_s"] for r in result["runs"] if r["variant"] == v],
            "images_per_s_median": statistics.median(r["images_per_s"] for r in result["runs"] if r["variant"] == v),
            "images_per_s_until_green_median": statistics.median(
                r["images_per_s_until_green"] for r in result["runs"] if r["variant"] == v)}
        for v in args.variants
    }
    plain = result["summary"].get("plain", {}).get("images_per_s_median")
    for v, s in result["summary"].items():
        if plain:
            s["speedup_vs_plain"] = round(s["images_per_s_median"] / plain, 2)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(result["summary"])


if __name__ == "__main__":
    main()
