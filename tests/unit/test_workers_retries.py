"""What the extract and flush tasks do when an outage outlasts their retries.

The Celery application and its autoretry chain are real (run eagerly: ``apply`` re-runs each
retry at once, with ``request.retries`` counted up); the worker context is a FAKE
(:class:`FakeContext`: in-memory store, no Redis, no Elasticsearch, no model), so Redis and
Elasticsearch can fail on demand.  tests/integration/test_workers_outage.py runs the flush side
against the real services.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import redis.exceptions
from PIL import Image

from delf_es.errors import IndexUnavailable, RetriesExhausted
from delf_es.index.es.failures import FailedImage
from delf_es.settings import Settings
from delf_es.types import Features
from delf_es.workers.app import make_app

MAX_RETRIES = 2


def features(image_id: str) -> Features:
    rng = np.random.default_rng(0)
    return Features(
        image_id=image_id, model_id="m@1", image_size=(64, 64),
        keypoints=rng.random((5, 2), dtype=np.float32), scales=np.ones(5, np.float32),
        scores=rng.random(5, dtype=np.float32), descriptors=rng.random((5, 40), dtype=np.float32),
        global_desc=rng.random(8, dtype=np.float32),
    )


class FakeStore:
    """FAKE delf_es.workers.store.Store: jobs and deferred records in memory; staging raises
    ``stage_error`` (a Redis outage) when set; the writer's lock can be held by someone else."""

    def __init__(self, stage_error: Exception | None = None, lock_taken: bool = False) -> None:
        self.stage_error = stage_error
        self.lock_taken = lock_taken
        self.stage_calls = 0
        self.failed: dict[str, dict[str, str]] = {}
        self.deferred: list[tuple[str, FailedImage]] = []
        self.retry_claims = 0

    def stage(self, staged, job_id) -> None:
        self.stage_calls += 1
        if self.stage_error is not None:
            raise self.stage_error

    def fail(self, job_id, image_id, error) -> None:
        self.failed.setdefault(job_id, {})[image_id] = error

    def defer_failures(self, index, failed) -> None:
        self.deferred.extend((index, f) for f in failed)

    def add_stats(self, **values) -> None:
        pass

    def add_timings(self, **seconds) -> None:
        pass

    def acquire(self, token, ttl_s) -> bool:
        return not self.lock_taken

    def ready_count(self) -> int:
        return 1

    def claim_retry(self, seconds) -> bool:
        self.retry_claims += 1
        return self.retry_claims == 1


class DownFailureLog:
    """FAKE FailureLog of an unreachable Elasticsearch."""

    def record(self, failures) -> None:
        raise IndexUnavailable("Elasticsearch unavailable (connection refused)")


class FakeExtractor:
    """FAKE Extractor: fixed features, no model."""

    model_id = "m@1"

    def extract(self, pixels, image_id):
        return features(image_id)


class FakeBatchExtractor(FakeExtractor):
    """FAKE Extractor whose batched pass fails when a ``bad`` image is in it, as a real one
    would on an image that breaks the network; alone, only that image fails."""

    def __init__(self, bad: str = "") -> None:
        self.bad = bad
        self.batches: list[list[str]] = []

    def extract(self, pixels, image_id):
        if image_id == self.bad:
            raise RuntimeError("this image breaks the network")
        return features(image_id)

    def extract_many(self, images):
        self.batches.append([image_id for _, image_id in images])
        return [self.extract(pixels, image_id) for pixels, image_id in images]


class FakeContext:
    """FAKE delf_es.workers.app.WorkerContext wiring the fakes above."""

    def __init__(self, settings: Settings, store: FakeStore) -> None:
        self.settings = settings
        self.store = store

    extractor_instance: FakeExtractor | None = None

    def extractor(self, overrides):
        return self.extractor_instance or FakeExtractor()

    def failure_log(self, index):
        return DownFailureLog()


@pytest.fixture()
def settings() -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/3", index_alias="photos", worker_max_retries=MAX_RETRIES)


@pytest.fixture()
def photo(tmp_path) -> str:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_an_extract_whose_redis_outage_outlasts_the_retries_fails_its_image_in_the_job(settings, photo):
    app = make_app(settings)
    store = FakeStore(stage_error=redis.exceptions.ConnectionError("Connection refused"))
    app.delf = FakeContext(settings, store)
    item = {"source": photo, "image_id": photo, "metadata": {}, "job": "job-1", "alias": None, "failures": None,
            "model": None}

    result = app.tasks["delf.extract"].apply(args=[item])

    assert store.stage_calls == MAX_RETRIES + 1  # retried with backoff first, not given up at once
    assert result.state == "SUCCESS" and result.result["status"] == "failed"
    error = store.failed["job-1"][photo]
    assert error.startswith("RetriesExhausted: gave up after 2 retries: ConnectionError: Connection refused")
    # Elasticsearch is down too: the failure record waits in Redis for the next flush
    [(index, failed)] = store.deferred
    assert index == "photos-failures"
    assert (failed.image_id, failed.stage, failed.error_type) == (photo, "extract", "RetriesExhausted")
    assert "ConnectionError: Connection refused" in failed.error


def test_an_undecodable_image_fails_its_job_at_once_while_the_index_is_down(settings, tmp_path):
    app = make_app(settings)
    store = FakeStore()
    app.delf = FakeContext(settings, store)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a JPEG")
    item = {"source": str(bad), "image_id": str(bad), "job": "job-2"}

    result = app.tasks["delf.extract"].apply(args=[item])

    assert result.result["status"] == "failed" and store.failed["job-2"][str(bad)].startswith("InvalidImage")
    assert [(f.stage, f.error_type) for _, f in store.deferred] == [("decode", "InvalidImage")]


def test_a_flush_that_finds_the_lock_taken_sends_a_new_flush_instead_of_spending_a_retry(settings, monkeypatch):
    app = make_app(settings)
    app.delf = FakeContext(settings, FakeStore(lock_taken=True))
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, **options: sent.append((name, options)))

    result = app.tasks["delf.flush"].apply()

    assert result.state == "SUCCESS" and result.result == 0
    assert [name for name, _ in sent] == ["delf.flush"] and sent[0][1]["countdown"] > 0


def test_retries_exhausted_survives_a_pickle_round_trip():
    error = pickle.loads(pickle.dumps(RetriesExhausted("IndexUnavailable: down", 8)))
    assert (error.last_error, error.retries) == ("IndexUnavailable: down", 8)
    assert str(error) == "gave up after 8 retries: IndexUnavailable: down"


class StageFailsFor(FakeStore):
    """FAKE store whose Redis fails (every attempt) when staging the given image."""

    def __init__(self, image_id: str) -> None:
        super().__init__()
        self.image_id = image_id
        self.staged: list[str] = []

    def stage(self, staged, job_id) -> None:
        self.stage_calls += 1
        if staged.key.endswith(self.image_id):
            raise redis.exceptions.ConnectionError("Connection refused")
        self.staged.append(staged.key)


def _batch(paths, job):
    return [{"source": p, "image_id": p, "metadata": {}, "job": job} for p in paths]


@pytest.fixture()
def photos(tmp_path) -> list[str]:
    paths = []
    for i in range(3):
        path = tmp_path / f"photo-{i}.png"
        Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_a_batch_records_the_image_that_breaks_extraction_and_stages_the_others(settings, photos, tmp_path, monkeypatch):
    app = make_app(settings)
    store = FakeStore()
    app.delf = FakeContext(settings, store)
    app.delf.extractor_instance = extractor = FakeBatchExtractor(bad=photos[1])
    monkeypatch.setattr(app, "send_task", lambda name, **options: None)
    undecodable = tmp_path / "bad.jpg"
    undecodable.write_bytes(b"not a JPEG")

    result = app.tasks["delf.extract_batch"].apply(args=[_batch(photos + [str(undecodable)], "job-b")])

    statuses = {r["image_id"]: (r["status"], r.get("stage")) for r in result.result}
    assert statuses == {photos[0]: ("staged", None), photos[2]: ("staged", None), photos[1]: ("failed", "extract"),
                        str(undecodable): ("failed", "decode")}
    assert extractor.batches == [photos]  # one batched pass over the decodable images, then one by one
    assert set(store.failed["job-b"]) == {photos[1], str(undecodable)}


def test_a_batch_whose_outage_outlasts_the_retries_fails_only_the_images_not_staged(settings, photos, monkeypatch):
    app = make_app(settings)
    store = StageFailsFor(photos[1])
    app.delf = FakeContext(settings, store)
    app.delf.extractor_instance = FakeBatchExtractor()
    monkeypatch.setattr(app, "send_task", lambda name, **options: None)

    result = app.tasks["delf.extract_batch"].apply(args=[_batch(photos, "job-c")])

    assert result.state == "SUCCESS"
    assert store.stage_calls == (MAX_RETRIES + 1) * 2  # each attempt stages photo 0, then fails on photo 1
    assert list(store.failed["job-c"]) == photos[1:]  # photo 0 is staged (it will be written): not failed
    assert all(e.startswith("RetriesExhausted") for e in store.failed["job-c"].values())
