"""An Elasticsearch outage that outlasts the flush task's retries, on the real services: real
Redis (staging, jobs), real Elasticsearch once it "comes back"; the outage is a URL nobody
listens on.  The tasks run eagerly in-process (``apply`` runs the whole autoretry chain at once),
so no model and no worker process are needed.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis
from elasticsearch import Elasticsearch

from delf_es.eval.run import drop_indices
from delf_es.sdk import DelfEs
from delf_es.settings import Settings
from delf_es.types import Features
from delf_es.workers.app import make_app
from delf_es.workers.submit import Submitter
from delf_es.workers.store import Staged, staging_key
from workers_fleet import redis_url

pytestmark = pytest.mark.integration

MAX_RETRIES = 2
DOWN_URL = "http://127.0.0.1:9"  # discard port: connection refused at once


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def staged(alias: str, image_id: str) -> Staged:
    rng = np.random.default_rng(0)
    features = Features(
        image_id=image_id, model_id="synthetic-model@out0", image_size=(640, 480),
        keypoints=(rng.random((20, 2)) * np.array([640, 480])).astype(np.float32), scales=np.ones(20, np.float32),
        scores=rng.random(20).astype(np.float32), descriptors=unit_rows(rng, 20, 40),
        global_desc=unit_rows(rng, 1, 32)[0],
    )
    return Staged(staging_key(alias, features.model_id, image_id), alias, f"/photos/{image_id}", {},
                  f"{alias}-failures", features)


@pytest.fixture()
def settings(services):
    name = f"test-outage-{uuid.uuid4().hex[:8]}"
    settings = Settings(es_url=services.es_url, worker_redis_url=redis_url(services.redis_url), index_alias=name,
                        worker_namespace=name, worker_max_retries=MAX_RETRIES, es_timeout=5)
    yield settings
    with Elasticsearch(services.es_url) as es:
        drop_indices(es, f"{name}*")
    client = redis.Redis.from_url(settings.worker_redis_url)
    for key in list(client.scan_iter(match=f"{name}:*", count=1000)):
        client.delete(key)
    client.close()


def failures(settings: Settings) -> list[dict]:
    with Elasticsearch(settings.es_url) as es:
        es.indices.refresh(index=f"{settings.index_alias}-failures", ignore_unavailable=True)
    with DelfEs(settings) as sdk:
        return sdk.failures()


def test_an_index_outage_that_outlasts_the_retries_fails_the_job_queryably_and_resubmitting_indexes(settings):
    down = make_app(settings.model_copy(update={"es_url": DOWN_URL}))
    up = make_app(settings)
    image = staged(settings.index_alias, "louvre.jpg")
    with Submitter(down) as submitter, Submitter(up):
        store = submitter.store
        store.start_job("job-1", 1)
        store.stage(image, "job-1")

        result = down.tasks["delf.flush"].apply()  # every retry hits the outage

        assert result.state == "SUCCESS" and result.result == 0
        progress = submitter.wait("job-1", timeout=5)  # the job is finished, not stalled
        assert progress.done == 0 and list(progress.failed) == ["louvre.jpg"]
        assert progress.failed["louvre.jpg"].startswith(
            f"RetriesExhausted: gave up after {MAX_RETRIES} retries: IndexUnavailable")
        assert store.ready_count() == 0  # nothing left staged to stall a later flush

        # Elasticsearch is back: the next flush (here one with nothing staged) writes the record
        assert up.tasks["delf.flush"].apply().state == "SUCCESS"
        assert store.deferred_failures(10) == []
        [failure] = failures(settings)
        assert (failure["image_id"], failure["stage"], failure["error_type"]) == ("louvre.jpg", "index", "RetriesExhausted")
        assert "IndexUnavailable" in failure["error"]

        # resubmitted later: indexed once, and its failure record is gone
        store.start_job("job-2", 1)
        store.stage(image, "job-2")
        assert up.tasks["delf.flush"].apply().result == 1
        assert submitter.wait("job-2", timeout=5).done == 1
        with Elasticsearch(settings.es_url) as es:
            es.indices.refresh(index=settings.index_alias)
            assert es.count(index=settings.index_alias)["count"] == 1
        assert failures(settings) == []
