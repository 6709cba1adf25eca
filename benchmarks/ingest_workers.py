"""End-to-end ingest through the worker fleet: images/s with 1 and 2 CPU worker processes.

For each fleet size, a fresh Redis namespace and index alias; one `celery -A delf_es.workers.main worker
-c N -Q extract,index` (N pool processes, each consuming both queues, one torch thread each);
a warm-up job (one image per process, not timed: model loading) then the measured job: submit
every photo, wait until the job reports each one indexed (written to Elasticsearch).

Reported per fleet size: wall time and images/s from submission to the last image indexed,
and where the time goes: per-image decode and extract seconds and per-batch bulk-write seconds
(medians, from the workers' own timings in Redis) plus their sums relative to the wall time.
Default model settings (EfficientNet-Lite2, 7 scales, PCA 40).  The machine is shared: the load
average before and after each run is recorded; numbers are indicative.

Usage::

    nice -n 10 python benchmarks/ingest_workers.py [--photos 100] [--out benchmarks/results/ingest_workers.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from delf_es.eval.run import drop_indices
from delf_es.index.es.transport import connect
from delf_es.settings import Settings
from delf_es.workers.app import make_submitter

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "paris250" / "db"
# Warm-up images come from outside the measured set, so the measured job never re-adds one of them.
WARMUP = ROOT.parent / "shared" / "data" / "distractors" / "wallpapers"


def spread_photos(n: int) -> list[str]:
    groups = [sorted(glob.glob(str(d / "*.jpg"))) for d in sorted(PHOTOS.iterdir())]
    return [p for group in zip(*groups) for p in group][:n]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run(processes: int, photos: list[str], warmup: list[str], es_url: str, redis_url: str, log_dir: Path) -> dict:
    name = f"bench-ingest-{processes}w-{uuid.uuid4().hex[:6]}"
    settings = Settings(es_url=es_url, worker_redis_url=redis_url, index_alias=name, worker_namespace=name)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")},
           "PYTHONPATH": str(ROOT), "DELF_ES_ES_URL": es_url, "DELF_ES_WORKER_REDIS_URL": redis_url,
           "DELF_ES_INDEX_ALIAS": name, "DELF_ES_WORKER_NAMESPACE": name, "DELF_ES_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    log = open(log_dir / f"ingest-{processes}w.log", "wb")
    worker = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, "-m", "celery", "-A", "delf_es.workers.main", "worker", "-Q", "extract,index",
         "-c", str(processes), "--loglevel", "warning", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    es = connect(Settings(es_url=es_url), request_timeout=60)
    try:
        with make_submitter(settings) as submitter:
            submitter.wait(submitter.submit(warmup[:processes]), timeout=900)
            submitter.store.reset_stats()
            load_before = os.getloadavg()
            started = time.perf_counter()
            done = submitter.wait(submitter.submit(photos), timeout=7200, poll=0.2)
            wall = time.perf_counter() - started
            load_after = os.getloadavg()
            store = submitter.store
            decode, extract, write = store.timings("decode"), store.timings("extract"), store.timings("write")
            batch_sizes = store.timings("batch_size")
            keys = list(store.keys())
            es.indices.refresh(index=name)
            count = int(es.count(index=name)["count"])
        return {
            "worker_processes": processes,
            "images": len(photos),
            "indexed": done.done,
            "failed": len(done.failed),
            "count_in_index": count - len(warmup[:processes]),
            "wall_s": wall,
            "images_per_s": done.done / wall,
            "decode_s_median": median(decode),
            "extract_s_median": median(extract),
            "write_s_per_batch_median": median(write),
            "images_per_batch_median": median(batch_sizes),
            "bulk_batches": len(write),
            "share_of_worker_time": {
                "decode": sum(decode) / (processes * wall),
                "extract": sum(extract) / (processes * wall),
                "bulk_write": sum(write) / (processes * wall),
            },
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "_redis_keys": len(keys),
        }
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        drop_indices(es, f"{name}*")
        es.close()
        client = redis.Redis.from_url(redis_url)
        for key in list(client.scan_iter(match=f"{name}:*", count=1000)):
            client.delete(key)
        client.close()


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['worker_processes']} process{'es' if r['worker_processes'] > 1 else ''}" for r in results]
    left.bar(labels, [r["images_per_s"] for r in results], color="#4477aa")
    left.set_ylabel("images/s, end to end")
    left.set_title(f"Ingest through the workers ({results[0]['images']} paris250 photos)")
    parts = ("decode", "extract", "bulk_write")
    bottom = [0.0] * len(results)
    for part, colour in zip(parts, ("#ccbb44", "#ee6677", "#228833")):
        values = [r["share_of_worker_time"][part] for r in results]
        right.bar(labels, values, bottom=bottom, label=part, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("share of worker-process time")
    right.set_ylim(0, 1.05)
    right.legend()
    right.set_title("Where the time goes")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=250)
    parser.add_argument("--es-url", default="http://127.0.0.1:9200")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest_workers.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops the worker and cleans up
    photos = spread_photos(args.photos)
    warmup = sorted(glob.glob(str(WARMUP / "*.jpg")))[:2]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    results = [run(n, photos, warmup, args.es_url, args.redis_url, log_dir) for n in (1, 2)]
    report = {
        "benchmark": "ingest_workers",
        "command": "nice -n 10 python benchmarks/ingest_workers.py " + " ".join(sys.argv[1:]),
        "photos": f"{args.photos} of ../shared/data/paris250/db (5 landmarks, interleaved)",
        "model": "default settings: efficientnet-lite2, 7 scales, PCA 40, 1000 keypoints",
        "threads": "one torch thread per worker process (DELF_ES_TORCH_THREADS=1, OMP_NUM_THREADS=1)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "2 cores shared with other agents and with Elasticsearch/Redis; numbers are indicative"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
