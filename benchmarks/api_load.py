"""HTTP API under load: a real ``delf-es serve`` (default model, embedded index of 1,000 images)
searched by 1, 4 and 16 concurrent clients with real query photos.

    /work/bin/heavy 2 python benchmarks/api_load.py            # -> benchmarks/results/api_load.json (+ .png)

Data (real features, replicated for scale, as the issue allows; the recipe of
benchmarks/search_speed.py): the database holds the paris250 photos whose default-model
features are in the ``delf-es eval`` feature cache (read only, never extracted here), replicated
to 1,000 images with noise (:func:`search_speed.replica`: descriptor noise sigma 0.15 per
dimension, global noise, 2 px keypoint jitter).  Queries are real photos: the paris250 query
crops, sent as JPEG files, so every request runs the full pipeline (decode, extraction,
shortlist, RANSAC).

Measured, in one run:
- ``DelfEs.search_image`` in process on the same queries (the baseline) on a copy of the index,
  alternating query by query with the same search over HTTP (paired: both see the same load);
- per client count: a fixed number of searches, requests/s, latency p50/p95, errors, server
  RSS before/after;
- HTTP overhead: client latency minus the server's own time for the search (``took_ms``: body
  read, decode, search) -- what HTTP adds -- and, in the paired rounds, client latency minus the
  in-process ``search_image`` time of the same query just before (includes the model's
  run-to-run noise); hits compared with ``search_image``'s (ids and order);
- 100 malformed requests (tests/api_server.py's list, cycled): each a 4xx with the JSON error;
  the server healthy afterwards.
The machine is shared (2 cores): the JSON records the load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from api_server import Server, check_error, malformed_requests  # noqa: E402  (the tests' server helper)
from search_speed import JITTER_PX, NOISE_SIGMA, replica  # noqa: E402

from delf_es.eval.feature_cache import FeatureCache, content_hash  # noqa: E402
from delf_es.eval.gt import load_ground_truth, query_pixels  # noqa: E402
from delf_es.eval.run import database_items  # noqa: E402
from delf_es.sdk import DelfEs  # noqa: E402
from delf_es.settings import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
TOKEN = "bench-token"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cached_database(gt, distractors: list[Path], cache_dir: Path, model_id: str):
    cache = FeatureCache(cache_dir, model_id)
    photos = []
    for image_id, path in database_items(gt, distractors):
        stored = cache._cached(content_hash(path))  # read only: a miss is skipped, never extracted
        if stored is not None:
            photos.append(stored if stored.image_id == image_id else
                          type(stored)(image_id, stored.model_id, stored.image_size, stored.keypoints, stored.scales,
                                       stored.scores, stored.descriptors, stored.global_desc))
    return photos


def build_index(settings: Settings, photos, size: int) -> None:
    with DelfEs(settings) as engine:
        if engine.count() == size:
            return
        batch = []
        for i in range(size):
            features = replica(photos, i)
            batch.append((features, features.image_id, {"copy": i // len(photos)}))
        engine.add_features_bulk(batch, batch_size=64)


def query_files(gt, settings: Settings, count: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    step = max(1, len(gt.queries) // count)
    out = []
    for query in list(gt.queries)[::step][:count]:
        buffer = io.BytesIO()
        Image.fromarray(query_pixels(gt, query, settings)).save(buffer, format="JPEG", quality=95)
        out.append((query.id, buffer.getvalue()))
    return out


def search(client: httpx.Client, query: tuple[str, bytes]) -> dict:
    started = time.perf_counter()
    response = client.post("/v1/search", files={"file": (query[0] + ".jpg", query[1])}, data={"limit": "10"})
    latency = (time.perf_counter() - started) * 1000
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    return {"query": query[0], "status": response.status_code, "latency_ms": latency,
            "took_ms": body.get("took_ms"), "hits": [(h["id"], h["inliers"]) for h in body.get("hits", [])]}


def load_level(server: Server, queries, clients: int, requests: int) -> dict:
    local = threading.local()

    def one(n: int) -> dict:
        if not hasattr(local, "client"):
            local.client = server.client(timeout=600)
        return search(local.client, queries[n % len(queries)])

    before = rss_mb(server.proc.pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = [r["latency_ms"] for r in results if r["status"] == 200]
    return {
        "clients": clients, "requests": requests, "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
        "errors": sum(r["status"] != 200 for r in results),
        "statuses": sorted({r["status"] for r in results}),
        "server_rss_mb_before": before, "server_rss_mb_after": rss_mb(server.proc.pid),
        "loadavg": os.getloadavg(), "_results": results,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    clients = [level["clients"] for level in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].plot(clients, [level["requests_per_s"] for level in levels], "o-")
    axes[0].set_xlabel("concurrent clients")
    axes[0].set_ylabel("searches / s")
    axes[0].set_xscale("log", base=2)
    axes[1].plot(clients, [level["p50_ms"] / 1000 for level in levels], "o-", label="p50")
    axes[1].plot(clients, [level["p95_ms"] / 1000 for level in levels], "s--", label="p95")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("concurrent clients")
    axes[1].set_ylabel("latency, s")
    axes[1].legend()
    overhead = result["http_overhead"]
    values = [overhead["transport_ms"]["p50"], overhead["vs_search_image_ms"]["p50"]]
    axes[2].bar(["client - server took_ms", "client - search_image\n(paired, same query)"], values,
                color=["tab:blue", "tab:gray"])
    for x, value in enumerate(values):
        axes[2].annotate(f"{value:.1f} ms", (x, value), ha="center", va="bottom")
    axes[2].axhline(10, color="k", linestyle="--", linewidth=1, label="target p50 10 ms")
    axes[2].set_ylabel("HTTP overhead at 1 client, p50 ms")
    axes[2].legend()
    fig.suptitle(f"api_load.py: delf-es serve, embedded index of {result['data']['images']} images "
                 f"(real paris250 features replicated with noise), real query photos")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="searches per client count")
    parser.add_argument("--queries", type=int, default=8, help="distinct real query photos")
    parser.add_argument("--malformed", type=int, default=100)
    parser.add_argument("--pair-rounds", type=int, default=2, help="paired search_image / HTTP rounds over the queries")
    parser.add_argument("--gt", type=Path, default=SHARED / "paris250" / "gt.json")
    parser.add_argument("--distractors", type=Path, nargs="*", default=[SHARED / "distractors" / "wallpapers"])
    parser.add_argument("--feature-cache", type=Path, default=Path("/work/cache/features"))
    parser.add_argument("--work", type=Path, default=Path("/work/cache/api/api_load"))
    parser.add_argument("--out", type=Path, default=RESULTS / "api_load.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=args.work / f"index-{args.size}")
    gt = load_ground_truth(args.gt)
    with DelfEs(settings) as probe:
        model_id = probe.model_id
    photos = cached_database(gt, args.distractors, args.feature_cache, model_id)
    if not photos:
        raise SystemExit(f"no cached features of {model_id} under {args.feature_cache}: run delf-es eval first")
    build_index(settings, photos, args.size)
    queries = query_files(gt, settings, args.queries)
    result: dict = {
        "benchmark": "api_load.py", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "model_id": model_id,
        "data": {"images": args.size, "real_photos": len(photos), "queries": [q[0] for q in queries],
                 "replication": "image i = cached paris250 photo i mod n + noise (copy i // n); copy 0 = the photo",
                 "noise_sigma_per_dim": NOISE_SIGMA, "jitter_px": JITTER_PX},
        "server": {"backend": "embedded", "api_max_extractions": settings.api_max_extractions,
                   "torch_threads": os.environ.get("DELF_ES_TORCH_THREADS", "default")},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
    }

    # The in-process baseline searches a copy of the index (the embedded index opens in one
    # process), alternating with the server query by query: the paired times see the same load.
    sdk_dir = args.work / f"index-{args.size}-sdk"
    shutil.rmtree(sdk_dir, ignore_errors=True)
    shutil.copytree(settings.data_dir, sdk_dir)
    passed = {k: v for k, v in os.environ.items() if k.startswith("DELF_ES_") and "THREADS" not in k}
    env = {**passed, "DELF_ES_DATA_DIR": str(settings.data_dir), "DELF_ES_API_MAX_QUEUED": "64",
           "DELF_ES_API_REQUEST_TIMEOUT": "600"}
    server = Server(env, args.work / "serve.log", token=TOKEN)
    try:
        server.wait_ready(timeout=300)
        result["server_rss_mb_at_start"] = rss_mb(server.proc.pid)
        pairs = []
        with DelfEs(settings.model_copy(update={"data_dir": sdk_dir})) as engine, server.client(timeout=600) as client:
            engine.search_image(queries[0][1], bytestream=True)  # warm-up (model, faiss, caches)
            search(client, queries[0])
            for round_ in range(args.pair_rounds):
                for name, data in queries:
                    started = time.perf_counter()
                    hits = engine.search_image(data, bytestream=True, limit=10)
                    sdk_ms = (time.perf_counter() - started) * 1000
                    served = search(client, (name, data))
                    pairs.append({"query": name, "sdk_ms": sdk_ms, **served,
                                  "same_hits": served["hits"] == [(h["id"], h["inliers"]) for h in hits]})
        ok = [p for p in pairs if p["status"] == 200]
        transport = [p["latency_ms"] - p["took_ms"] for p in ok]
        versus = [p["latency_ms"] - p["sdk_ms"] for p in ok]
        result["search_image_ms"] = {"p50": round(statistics.median(p["sdk_ms"] for p in pairs), 1)}
        result["http_search_ms"] = {"p50": round(statistics.median(p["latency_ms"] for p in ok), 1)}
        result["http_overhead"] = {
            "pairs": len(pairs),
            "transport_ms": {"p50": round(percentile(transport, 50), 2), "p95": round(percentile(transport, 95), 2),
                             "what": "client latency - the server's own time for the request (took_ms)"},
            "vs_search_image_ms": {"p50": round(percentile(versus, 50), 1), "p95": round(percentile(versus, 95), 1),
                                   "what": "client latency - search_image of the same query just before (paired)"},
            "target_p50_ms": 10,
            "hits_identical_to_search_image": f"{sum(p['same_hits'] for p in pairs)}/{len(pairs)}",
        }
        print(json.dumps(result["http_overhead"]), flush=True)
        result["server_rss_mb_idle"] = rss_mb(server.proc.pid)
        levels = []
        for clients in args.clients:
            level = load_level(server, queries, clients, args.requests)
            level.pop("_results")
            levels.append(level)
            print(json.dumps(level), flush=True)
        result["levels"] = levels

        # 3. malformed requests
        photo = queries[0][1]
        cases = malformed_requests(photo, settings.api_max_upload_bytes, TOKEN)
        statuses, shaped = [], 0
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for n in range(args.malformed):
                case = dict(cases[n % len(cases)])
                expect = case.pop("expect")
                response = client.request(**case)
                statuses.append(response.status_code)
                try:
                    check_error(response)
                    shaped += response.status_code == expect
                except (AssertionError, ValueError):
                    pass
        health = httpx.get(server.url + "/healthz", timeout=30)
        result["malformed"] = {
            "requests": args.malformed, "distinct_cases": len(cases),
            "all_4xx": all(400 <= s < 500 for s in statuses),
            "json_error_with_expected_status": shaped,
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "healthz_after": health.status_code, "server_alive_after": server.proc.poll() is None,
            "server_rss_mb_after": rss_mb(server.proc.pid),
        }
    finally:
        server.stop()
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("http_overhead", "malformed", "search_image_ms")}, indent=1))


if __name__ == "__main__":
    main()
