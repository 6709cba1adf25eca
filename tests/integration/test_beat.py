"""A real ``celery -A delf_es.workers.main beat`` process publishes the scheduled reindex check to the real
Redis broker, on the interval the settings give it (``DELF_ES_WORKER_REINDEX_SCHEDULE``).

The messages are read off the ``index`` queue (no worker consumes them; what a tick does is
tested in tests/integration/test_reindex.py).  The beat process is stopped by its pid.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis

from delf_es.workers.app import INDEX_QUEUE
from workers_fleet import REPO_ROOT, redis_url, wait_for

pytestmark = pytest.mark.integration

INTERVAL_S = 2


def published_tasks(client: redis.Redis, queue_key: str) -> list[dict]:
    """The task name and routing of every message waiting on a kombu Redis queue (a list)."""
    out = []
    for raw in client.lrange(queue_key, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"])) if message["properties"]["body_encoding"] == "base64" \
            else json.loads(message["body"])
        out.append({"task": message["headers"]["task"], "routing_key": message["properties"]["delivery_info"]["routing_key"],
                    "args": body[0]})
    return out


@pytest.fixture()
def namespace(services):
    name = f"test-beat-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(redis_url(services.redis_url))
    for key in list(client.scan_iter(match=f"{name}:*", count=1000)):
        client.delete(key)
    client.close()


def test_a_beat_process_publishes_the_reindex_check_on_the_configured_interval(services, namespace, tmp_path):
    broker = redis_url(services.redis_url)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")},
        "PYTHONPATH": str(REPO_ROOT),
        "DELF_ES_ES_URL": services.es_url,
        "DELF_ES_WORKER_REDIS_URL": broker,
        "DELF_ES_WORKER_NAMESPACE": namespace,
        "DELF_ES_WORKER_REINDEX_SCHEDULE": str(INTERVAL_S),
        "DELF_ES_WORKER_FLUSH_INTERVAL": "3600",  # only the reindex check is due during the test
    }
    schedule = tmp_path / "celerybeat-schedule"
    log = open(tmp_path / "beat.log", "wb")
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "delf_es.workers.main", "beat", "--loglevel", "info",
         "--schedule", str(schedule), "--pidfile", str(tmp_path / "beat.pid"), "--max-interval", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    client = redis.Redis.from_url(broker)
    queue_key = f"{namespace}:{INDEX_QUEUE}"
    try:
        started = time.monotonic()
        wait_for(lambda: len(published_tasks(client, queue_key)) >= 2 or beat.poll() is not None, 45,
                 "two reindex checks on the index queue")
        elapsed = time.monotonic() - started
        assert beat.poll() is None, (tmp_path / "beat.log").read_text()[-3000:]
        tasks = published_tasks(client, queue_key)
    finally:
        beat.terminate()
        try:
            beat.wait(timeout=20)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait(timeout=20)
        log.close()
        client.close()
    assert {t["task"] for t in tasks} == {"delf.reindex_tick"} and {t["routing_key"] for t in tasks} == {INDEX_QUEUE}
    assert elapsed >= INTERVAL_S  # on the interval, not all at start-up
    assert list(tmp_path.glob("celerybeat-schedule*")), "beat kept no schedule file"
    assert "delf.reindex_tick" in (tmp_path / "beat.log").read_text()
