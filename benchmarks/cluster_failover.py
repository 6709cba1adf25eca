"""A 3-node Elasticsearch cluster on this machine losing a node (issue 13 item 3): start time, search
latency before / while / after one node is SIGKILLed, how long until the cluster is green again.

    python benchmarks/cluster_failover.py [--images 500] [--out benchmarks/results/cluster_failover.json]

The cluster is ``delf-es services start es --nodes 3`` on the ports above the suite's node
(``DELF_ES_ES_PORT + 3 .. + 5``, like tests/integration/test_cluster.py), 384 MB heap per node;
the index has 3 shards and 1 replica, written and searched through the three-URL client.  Images
are SYNTHETIC records (random unit descriptors, 100 keypoints, 1280-d global vectors): failover
does not depend on what the vectors are.  Searches are global kNN (k=10) of stored images' vectors
in a loop, timed one by one; the node is killed with SIGKILL mid-loop and restarted once the
cluster has noticed.  The load average is recorded (the machine is shared).  Writes JSON + a
latency-over-time plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from delf_es.errors import DelfEsError
from delf_es.index.base import ImageRecord
from delf_es.index.es import ElasticsearchBackend
from delf_es.services import es_status, kill_node, restart_node, services_config, start, stop_es
from delf_es.settings import Settings
from delf_es.types import Features

RESULTS = Path(__file__).resolve().parent / "results"
NODES = 3
VICTIM = 1


def synthetic(i: int, rng: np.random.Generator) -> ImageRecord:
    def unit(n: int, d: int) -> np.ndarray:
        rows = rng.standard_normal((n, d)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    n = 100
    features = Features(image_id=f"img-{i}", model_id="synthetic@failover", image_size=(640, 480),
                        keypoints=(rng.random((n, 2)) * 480).astype(np.float32), scales=np.ones(n, np.float32),
                        scores=rng.random(n).astype(np.float32), descriptors=unit(n, 128), global_desc=unit(1, 1280)[0])
    return ImageRecord(features.image_id, f"/synthetic/{i}.jpg", {}, features, "2026-12-01T00:00:00+00:00")


def health(backend: ElasticsearchBackend, **wait: str) -> dict:
    client = backend.transport.client.options(request_timeout=200)
    return backend.transport.call("health", client.cluster.health, timeout="180s", **wait)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster_failover.json")
    args = parser.parse_args()

    base = Settings()
    transport_port = (base.es_transport_port or base.es_port + 1100) + 3
    settings = Settings(services_home=base.services_home, es_port=base.es_port + 3, es_transport_port=transport_port,
                        es_heap="384m", es_start_timeout=300)
    config = services_config(settings, nodes=NODES)
    began = time.monotonic()
    start(config, "es")
    start_s = time.monotonic() - began
    alias = f"failover-{uuid.uuid4().hex[:8]}"
    index = settings.model_copy(update={"es_url": config.es_url, "index_alias": alias, "es_number_of_shards": 3,
                                        "es_number_of_replicas": 1, "thumbnails": False})
    rng = np.random.default_rng(0)
    records = [synthetic(i, rng) for i in range(args.images)]
    timeline: list[tuple[float, float | None, str]] = []  # (t s, latency ms or None if failed, phase)
    events: dict[str, float] = {}
    try:
        with ElasticsearchBackend(index) as backend:
            began = time.monotonic()
            report = backend.upsert(records, refresh=True)
            ingest_s = time.monotonic() - began
            health(backend, wait_for_status="green")
            t0 = time.monotonic()

            def search(phase: str) -> None:
                query = records[int(rng.integers(len(records)))].features.global_desc
                began = time.monotonic()
                try:
                    backend.global_knn(query, 10)
                    timeline.append((began - t0, (time.monotonic() - began) * 1000, phase))
                except DelfEsError:
                    timeline.append((began - t0, None, phase))

            for _ in range(100):
                search("healthy")
            events["kill"] = time.monotonic() - t0
            kill_node(config, VICTIM)
            for _ in range(100):
                search("one node down")
            left = health(backend, wait_for_nodes=str(NODES - 1))
            events["node_left_seen"] = time.monotonic() - t0
            events["restart"] = time.monotonic() - t0
            restart_node(config, VICTIM)
            events["node_back"] = time.monotonic() - t0
            for _ in range(100):
                search("recovering")
            health(backend, wait_for_status="green", wait_for_nodes=str(NODES))
            events["green"] = time.monotonic() - t0
            for _ in range(100):
                search("green again")
            after = es_status(config)
            client = backend.transport.client
            found = client.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
            if found.meta.status == 200:
                client.indices.delete(index=",".join(found.body))
    finally:
        stop_es(config)

    phases = {}
    for phase in ("healthy", "one node down", "recovering", "green again"):
        rows = [latency for _, latency, p in timeline if p == phase]
        done = [x for x in rows if x is not None]
        phases[phase] = {"searches": len(rows), "failed": len(rows) - len(done), "p50_ms": percentile(done, 50),
                         "p95_ms": percentile(done, 95), "max_ms": max(done) if done else None}
    result = {
        "nodes": NODES, "shards": 3, "replicas": 1, "heap_per_node": "384m", "images": args.images,
        "images_are": "synthetic records (random unit descriptors, 100 keypoints, 1280-d global)",
        "cluster_start_s": round(start_s, 1), "ingest_s": round(ingest_s, 2), "ingest_failed": len(report.failed),
        "health_after_kill": {"status": left["status"], "number_of_nodes": left["number_of_nodes"]},
        "node_left_seen_s_after_kill": round(events["node_left_seen"] - events["kill"], 2),
        "restart_until_node_back_s": round(events["node_back"] - events["restart"], 1),
        "restart_until_green_s": round(events["green"] - events["restart"], 1),
        "cluster_status_end": "green" if after.ready and after.health == "green" else after.health,
        "searches": len(timeline), "searches_failed": sum(1 for _, x, _ in timeline if x is None),
        "phases": phases, "load_average_1m_end": round(os.getloadavg()[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(timeline, events, args.out.with_suffix(".png"))
    json.dump(result, sys.stdout, indent=2)
    print()


def plot(timeline: list[tuple[float, float | None, str]], events: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ok = [(t, x) for t, x, _ in timeline if x is not None]
    ax.plot([t for t, _ in ok], [x for _, x in ok], ".", ms=3, label="global kNN search")
    failed = [t for t, x, _ in timeline if x is None]
    if failed:
        ax.plot(failed, [0] * len(failed), "rx", label="failed")
    for name, t in events.items():
        ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.text(t, ax.get_ylim()[1] * 0.95, name, rotation=90, va="top", fontsize=7)
    ax.set_xlabel("s since the cluster was green")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"3-node cluster, node-{VICTIM} SIGKILLed and restarted (median of all: "
                 f"{statistics.median(x for _, x in ok):.0f} ms)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
