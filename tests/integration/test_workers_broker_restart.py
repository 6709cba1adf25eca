"""A Redis (broker) restart of a few seconds must not drop a task message.

Found by the fault test (tests/integration/test_faults.py): a task that meets the outage (staging
its features in Redis) is autoretried; ``Task.retry`` publishes the retry, and when that publish
fails Celery rejects the running message *without requeue* (``Reject(exc, requeue=False)`` in
``celery/app/task.py``), so the image is gone and its job never finishes.  Celery's default
publish retries give up after about 0.6 s; a restart loading an append-only file takes seconds.
The fleet's app now retries a publish through a broker outage of up to ``PUBLISH_RETRY_S``.

Real Redis (its own, on the suite's ``redis_port + 2`` in the services home's ``faults/``
folder, stopped mid-test and started again 3 s later), real Celery publishing; no worker needed.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from pathlib import Path

import pytest
import redis

from delf_es.services import services_config, start_redis, stop_redis
from delf_es.services.redis import ping
from delf_es.settings import Settings
from delf_es.workers.app import make_app
from delf_es.workers.routes import EXTRACT, EXTRACT_QUEUE

pytestmark = pytest.mark.integration

OUTAGE_S = 3.0


def message(image_id: str) -> dict:
    return {"source": f"/photos/{image_id}.jpg", "image_id": image_id, "metadata": {}, "job": "j", "alias": None,
            "failures": None, "model": None}


def image_id(raw: bytes) -> str:
    """The image id of a queued Celery message (kombu's JSON envelope, protocol 2 body)."""
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return body[0][0]["image_id"]


@pytest.fixture()
def broker():
    suite = Settings()
    config = services_config(Settings(services_home=Path(suite.services_home) / "faults",
                                      redis_port=suite.redis_port + 2))
    started = start_redis(config)
    try:
        yield config
    finally:
        if started:
            stop_redis(config)


def test_a_task_published_while_the_broker_restarts_for_seconds_reaches_the_queue(broker):
    namespace = f"test-broker-{uuid.uuid4().hex[:8]}"
    url = broker.redis_url.rsplit("/", 1)[0] + "/12"
    app = make_app(Settings(worker_redis_url=url, worker_namespace=namespace))
    try:
        app.send_task(EXTRACT, args=[message("before")], queue=EXTRACT_QUEUE, ignore_result=True)  # the connection is made and pooled
        stop_redis(broker)
        restarter = threading.Timer(OUTAGE_S, start_redis, args=(broker,))
        restarter.start()
        try:
            assert not ping(broker.redis_port)  # the publish below meets the outage
            app.send_task(EXTRACT, args=[message("during")], queue=EXTRACT_QUEUE, ignore_result=True)  # waits for Redis, then lands
        finally:
            restarter.join()  # even on failure: the fixture then stops the Redis the timer started
        client = redis.Redis.from_url(url)
        try:
            queued = [image_id(raw) for raw in client.lrange(f"{namespace}:{EXTRACT_QUEUE}", 0, -1)]
            assert "during" in queued, queued  # ("before" went with the restart: no append-only file here)
        finally:
            for key in client.scan_iter(match=f"{namespace}:*"):
                client.delete(key)
            client.close()
    finally:
        app.close()
