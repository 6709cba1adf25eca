"""The Celery application's configuration and the staged-features payload (no broker needed:
building the app does not connect)."""

from __future__ import annotations

import numpy as np
import pytest

from delf_es.settings import Settings
from delf_es.types import Features
from delf_es.workers.app import EXTRACT_QUEUE, INDEX_QUEUE, PUBLISH_RETRY_S, make_app
from delf_es.workers.store import JobProgress, Staged, staging_key
from delf_es.workers.tasks import RETRYABLE


@pytest.fixture(scope="module")
def app():
    return make_app(Settings(redis_url="redis://127.0.0.1:1/3", worker_namespace="unit-ns",
                             worker_visibility_timeout=40))


def test_each_task_goes_to_its_own_queue_through_its_own_exchange(app):
    routes = {name: app.amqp.router.route({}, name)["queue"] for name in ("delf.extract", "delf.flush", "delf.reindex_tick")}
    assert routes["delf.extract"].name == EXTRACT_QUEUE
    assert routes["delf.flush"].name == routes["delf.reindex_tick"].name == INDEX_QUEUE
    bindings = {(q.exchange.name, q.routing_key) for q in app.amqp.queues.values()}
    assert len(bindings) == len(app.amqp.queues) == 2  # a shared binding would deliver every message twice


def test_tasks_are_acknowledged_late_requeued_on_worker_loss_and_retry_outages_only(app):
    assert app.conf.worker_prefetch_multiplier == 1
    for name in ("delf.extract", "delf.flush"):
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        assert set(task.autoretry_for) == set(RETRYABLE) and task.retry_backoff
    from delf_es.errors import IndexUnavailable, InvalidImage

    assert IndexUnavailable in RETRYABLE and not any(issubclass(InvalidImage, e) for e in RETRYABLE)


def test_everything_lives_under_the_namespace(app):
    assert app.conf.broker_transport_options["global_keyprefix"] == "unit-ns:"
    assert app.conf.result_backend_transport_options["global_keyprefix"] == "unit-ns:"
    assert app.conf.broker_transport_options["visibility_timeout"] == 40
    assert app.conf.broker_transport_options["unacked_restore_interval"] <= 10
    assert {entry["task"] for entry in app.conf.beat_schedule.values()} <= set(app.tasks)


def test_workers_need_redis():
    with pytest.raises(ValueError, match="Redis"):
        make_app(Settings(redis_url=None, worker_redis_url=None))


def test_staged_payload_round_trips_features_and_metadata():
    rng = np.random.default_rng(0)
    features = Features(
        image_id="a|b.jpg", model_id="m@1", image_size=(640, 480),
        keypoints=rng.random((5, 2), dtype=np.float32), scales=np.ones(5, np.float32),
        scores=rng.random(5, dtype=np.float32), descriptors=rng.random((5, 40), dtype=np.float32),
        global_desc=rng.random(8, dtype=np.float32),
    )
    key = staging_key("alias", features.model_id, features.image_id)
    assert key.split("|", 2)[2] == "a|b.jpg"  # image ids may contain the separator
    staged = Staged(key, "alias", "/photos/b.jpg", {"city": "paris", "n": 3}, "alias-failures", features)
    back = Staged.decode(key, staged.encode())
    assert (back.alias, back.path, back.metadata, back.failures) == ("alias", "/photos/b.jpg", {"city": "paris", "n": 3}, "alias-failures")
    np.testing.assert_array_equal(back.features.descriptors, features.descriptors)
    assert back.features.image_size == (640, 480) and back.features.model_id == "m@1"


def test_job_progress_is_finished_when_every_image_is_done_or_failed():
    assert not JobProgress("j", 3, 2, {}).finished
    assert JobProgress("j", 3, 2, {"x": "InvalidImage"}).finished
    assert not JobProgress("j", 0, 0, {}).finished


def test_add_image_without_waiting_takes_only_a_path_the_workers_can_read():
    from delf_es.sdk import DelfEs, InvalidRequest

    sdk = DelfEs(Settings(redis_url="redis://127.0.0.1:1/3"))
    with pytest.raises(InvalidRequest, match="wait=False"):
        sdk.add_image(b"\xff\xd8 jpeg bytes", bytestream=True, wait=False)
    with pytest.raises(InvalidRequest, match="wait=False"):
        sdk.add_image("name.jpg", img="other.jpg", wait=False)


def test_each_app_registers_its_own_tasks_with_its_own_retry_policy():
    import warnings

    from celery.exceptions import DuplicateTaskNameWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateTaskNameWarning)
        apps = [make_app(Settings(redis_url="redis://127.0.0.1:1/3", worker_max_retries=n)) for n in (3, 5)]
        assert [a.tasks["delf.extract"].max_retries for a in apps] == [3, 5]
    assert apps[0].tasks["delf.flush"] is not apps[1].tasks["delf.flush"]


def test_the_beat_schedule_comes_from_the_settings():
    from datetime import timedelta

    from delf_es.errors import InvalidSetting

    def schedule(**fields):
        app = make_app(Settings(redis_url="redis://127.0.0.1:1/3", **fields))
        return {name: entry["schedule"] for name, entry in app.conf.beat_schedule.items()}

    nightly = schedule()
    assert nightly["flush-stragglers"] == timedelta(minutes=1)
    reindex = nightly["reindex-if-model-changed"]
    assert (reindex.hour, reindex.minute) == ({3}, {0})
    weekly = schedule(worker_reindex_schedule="30 2 * * 0")["reindex-if-model-changed"]
    assert (weekly.hour, weekly.minute, weekly.day_of_week) == ({2}, {30}, {0})
    fast = schedule(worker_reindex_schedule="2.5", worker_flush_interval=7)
    assert fast == {"flush-stragglers": timedelta(seconds=7), "reindex-if-model-changed": timedelta(seconds=2.5)}
    for bad in ("0 3 * *", "-1", "0"):
        with pytest.raises(InvalidSetting, match="worker_reindex_schedule"):
            Settings(worker_reindex_schedule=bad)


def test_a_publish_keeps_retrying_through_a_broker_outage_of_two_minutes(app):
    """A retry that cannot be published drops the task (Reject, requeue=False): the waits of
    kombu's policy (its own interval generator) must add up to PUBLISH_RETRY_S."""
    import itertools

    from kombu.utils.functional import fxrange

    policy = app.conf.task_publish_retry_policy
    waits = fxrange(policy["interval_start"], policy["interval_max"] + policy["interval_start"],
                    policy["interval_step"], repeatlast=True)
    assert app.conf.task_publish_retry is True
    assert sum(itertools.islice(waits, policy["max_retries"])) >= PUBLISH_RETRY_S >= 60
