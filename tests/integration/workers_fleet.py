"""Real Celery worker processes for integration tests, isolated from everyone else's.

Each :class:`Fleet` has its own Redis namespace (kombu ``global_keyprefix`` + staging keys) on
Redis DB 10 (benchmarks/ingest_workers.py uses 9) and its own index alias; workers are ``python -m celery -A delf_es.workers.main worker``
subprocesses in their own process group, killed by that group at the end (or by the test, with
SIGKILL, to simulate a crash).  Teardown deletes the fleet's indices and Redis keys only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from elasticsearch import Elasticsearch

from delf_es.eval.run import drop_indices
from delf_es.services.system import kill_group, start_group, stop_group
from delf_es.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 10
#: The fast model of tests/integration/test_sdk.py, as environment variables for the workers.
FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))
FAST_ENV = {"DELF_ES_BACKBONE": "efficientnet-lite0", "DELF_ES_SCALES": "[0.7071, 1.0, 1.4142]",
            "DELF_ES_GLOBAL_SCALES": "[1.0]"}
#: Short enough that a crashed worker's tasks and lock come back within the test's patience.
VISIBILITY_TIMEOUT_S = 20
LOCK_TTL_S = 15


def redis_url(base: str, db: int = REDIS_DB) -> str:
    return base.rsplit("/", 1)[0] + f"/{db}"


class Fleet:
    def __init__(self, services, tmp_path: Path, name: str) -> None:
        self.id = f"test-{name}-{uuid.uuid4().hex[:8]}"
        self.alias = self.id
        self.broker = redis_url(services.redis_url)
        self.es_url = services.es_url
        self.log_dir = tmp_path
        self.settings = Settings(**FAST, es_url=self.es_url, worker_redis_url=self.broker, index_alias=self.alias,
                                 worker_namespace=self.id, worker_index_batch=4,
                                 worker_visibility_timeout=VISIBILITY_TIMEOUT_S, worker_lock_ttl=LOCK_TTL_S,
                                 keypoint_vectors=True)  # whole_images checks the keypoint documents too
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")},
            **FAST_ENV,
            "PYTHONPATH": str(REPO_ROOT),
            "DELF_ES_ES_URL": self.es_url,
            "DELF_ES_WORKER_REDIS_URL": self.broker,
            "DELF_ES_INDEX_ALIAS": self.alias,
            "DELF_ES_WORKER_NAMESPACE": self.id,
            "DELF_ES_WORKER_INDEX_BATCH": "4",
            "DELF_ES_WORKER_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S),
            "DELF_ES_WORKER_LOCK_TTL": str(LOCK_TTL_S),
            "DELF_ES_KEYPOINT_VECTORS": "true",
            "OMP_NUM_THREADS": "1",  # two pool processes on a shared 2-core machine
        }
        self.workers: list[subprocess.Popen] = []
        self.es = Elasticsearch(self.es_url, request_timeout=60)

    def start_worker(self, concurrency: int = 2, queues: str = "extract,index", env: dict[str, str] | None = None) -> subprocess.Popen:
        n = len(self.workers)
        proc = start_group(
            [sys.executable, "-m", "celery", "-A", "delf_es.workers.main", "worker", "-Q", queues, "-c", str(concurrency),
             "--loglevel", "info", "-n", f"{self.id}-{n}@%h", "--without-gossip", "--without-mingle"],
            self.log_dir / f"worker-{n}.log", {**self.env, **(env or {})}, cwd=REPO_ROOT,
        )
        self.workers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker and its pool processes (its own process group): a crash."""
        kill_group(proc)

    def log(self, n: int) -> str:
        return (self.log_dir / f"worker-{n}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.workers:
            stop_group(proc, timeout=20)
        drop_indices(self.es, f"{self.alias}*")
        self.es.close()
        client = redis.Redis.from_url(self.broker)
        keys = list(client.scan_iter(match=f"{self.id}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()


def whole_images(es: Elasticsearch, alias: str) -> dict[str, tuple[int, int]]:
    """image id -> (num_keypoints of its image document, keypoint documents of its live generation).
    Equal pairs mean every image is whole."""
    es.indices.refresh(index=f"{alias},{alias}-keypoints")
    docs = es.search(index=alias, size=1000, source=["image_id", "generation", "num_keypoints"])["hits"]["hits"]
    out = {}
    for doc in docs:
        src = doc["_source"]
        live = es.count(index=f"{alias}-keypoints", query={"bool": {"filter": [
            {"term": {"image_id": src["image_id"]}}, {"term": {"generation": src["generation"]}}]}})["count"]
        out[src["image_id"]] = (int(src["num_keypoints"]), int(live))
    return out


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
