"""Build the Celery application and the per-process state its tasks use.

Queues: ``extract`` (decode + features; one task per image; prefetch 1 and late acks, so a task
of a worker that dies is redelivered: immediately if only its pool process died
(``reject_on_worker_lost``), after ``worker_visibility_timeout`` s if the whole worker died) and
``index`` (``delf.flush``: one writer at a time drains the staged features in bulk batches of
``worker_index_batch`` images).  Everything lives under ``worker_namespace`` in Redis (kombu's
``global_keyprefix``), so fleets, tests and benchmarks sharing a Redis never see each other.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Mapping

from celery import Celery
from celery.schedules import crontab
from kombu import Exchange, Queue

from delf_es.errors import ConfigurationError
from delf_es.settings import Settings
from delf_es.workers.routes import EXTRACT_QUEUE, FLUSH, INDEX_QUEUE, REINDEX_TICK, TASK_ROUTES
from delf_es.workers.submit import Submitter
from delf_es.workers.tasks import register

__all__ = ["EXTRACT_QUEUE", "INDEX_QUEUE", "WorkerContext", "broker_url", "make_app", "make_submitter",
           "reindex_schedule"]
#: Models kept loaded per worker process (a reindex briefly needs the old and the new one).
MAX_EXTRACTORS = 2
#: How long a publish (a task's retry, the flush it triggers, a submission) keeps trying through
#: a broker outage, s.  Celery's default gives up after about 0.6 s, and a task whose retry cannot
#: be published is rejected *without requeue* (``Task.retry`` raises ``Reject(exc,
#: requeue=False)``): a Redis restart of a few seconds lost images (the fault test,
#: tests/integration/test_workers_broker_restart.py).  Past this the message is still lost: a
#: broker down for minutes needs the jobs resubmitted (ids make that harmless).
PUBLISH_RETRY_S = 120.0
PUBLISH_RETRY_STEP_S, PUBLISH_RETRY_MAX_INTERVAL_S = 0.5, 2.0


def publish_retry_policy(total_s: float = PUBLISH_RETRY_S) -> dict[str, float]:
    """kombu's retry policy for publishing: waits of 0, 0.5, 1, 1.5, then 2 s each, ``total_s`` in all."""
    ramp = [min(i * PUBLISH_RETRY_STEP_S, PUBLISH_RETRY_MAX_INTERVAL_S) for i in range(4)]
    retries = len(ramp) + max(0, math.ceil((total_s - sum(ramp)) / PUBLISH_RETRY_MAX_INTERVAL_S))
    return {"max_retries": retries, "interval_start": 0, "interval_step": PUBLISH_RETRY_STEP_S,
            "interval_max": PUBLISH_RETRY_MAX_INTERVAL_S}


class WorkerContext:
    """What tasks of one worker process share, built lazily after the pool forks: the Redis
    store, the extractors (one per model a task names), the Elasticsearch client and backends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store = None
        self._es = None
        self._cache = None
        self._extractors: OrderedDict[str, Any] = OrderedDict()
        self._spec = None
        self._backends: dict[tuple[str, str], Any] = {}

    @property
    def redis_url(self) -> str:
        return broker_url(self.settings)

    @property
    def store(self):
        if self._store is None:
            from delf_es.workers.store import Store

            self._store = Store(self.redis_url, self.settings.worker_namespace)
        return self._store

    @property
    def spec(self):
        """The worker's own model (:class:`~delf_es.model.spec.ModelSpec` of its settings)."""
        if self._spec is None:
            from delf_es.model.spec import ModelSpec

            self._spec = ModelSpec.from_settings(self.settings)
        return self._spec

    def model_spec(self, model: Mapping[str, Any] | None):
        """The model a task message names (its ``"model"``): None = the worker's own; the JSON
        form of a ModelSpec (what submitters send); or, in a message queued by a release before
        the spec existed, a dict of Settings overrides applied over the worker's settings (so a
        rolling upgrade need not drain the queues).

        Raises:
            InvalidSetting, ModelMismatch, WeightsNotFound...: the image fails with that error.
        """
        from delf_es.model.spec import ModelSpec

        if not model:
            return self.spec
        if isinstance(model, Mapping) and "format" in model:
            return ModelSpec.from_json(model)
        from delf_es.validation import load_settings  # legacy overrides, typed errors as on the command line

        return ModelSpec.from_settings(load_settings({**self.settings.model_dump(), **dict(model)}))

    def extractor(self, model: Mapping[str, Any] | None):
        """The extractor of a message's model (see :meth:`model_spec`), kept loaded (LRU)."""
        from delf_es.features import Extractor

        key = json.dumps(model or None, sort_keys=True, default=str)
        if key not in self._extractors:
            self._extractors[key] = Extractor(self.settings, self.model_spec(model))
            while len(self._extractors) > MAX_EXTRACTORS:
                self._extractors.popitem(last=False)
        self._extractors.move_to_end(key)
        return self._extractors[key]

    @property
    def transport(self):
        """The Elasticsearch transport every backend and failure log of this process shares."""
        if self._es is None:
            from delf_es.index.es.transport import Transport

            if not self.settings.es_url:
                raise ConfigurationError("workers write to Elasticsearch: set DELF_ES_ES_URL")
            self._es = Transport(self.settings)
        return self._es

    def backend(self, alias: str, model_id: str):
        from delf_es.index.es import ElasticsearchBackend

        key = (alias, model_id)
        if key not in self._backends:
            settings = self.settings.model_copy(update={"index_alias": alias})
            self._backends[key] = ElasticsearchBackend(settings, model_id=model_id, client=self.transport.client)
        return self._backends[key]

    def failure_log(self, index: str):
        from delf_es.index.es.failures import FailureLog

        return FailureLog(self.transport, index, replicas=self.settings.es_number_of_replicas)

    @property
    def location_cache(self):
        """The searchers' keypoint-location cache, refreshed on every write (None without redis_url)."""
        if self._cache is None and self.settings.redis_url:
            from delf_es.cache import RedisLocationCache

            self._cache = RedisLocationCache(self.settings.redis_url)
        return self._cache


def broker_url(settings: Settings) -> str:
    url = settings.worker_redis_url or settings.redis_url
    if not url:
        raise ConfigurationError("workers need Redis: set DELF_ES_WORKER_REDIS_URL or DELF_ES_REDIS_URL")
    return url


def reindex_schedule(settings: Settings) -> timedelta | crontab:
    """``worker_reindex_schedule`` as a Celery schedule: seconds -> an interval, else a crontab."""
    try:
        return timedelta(seconds=float(settings.worker_reindex_schedule))
    except ValueError:
        minute, hour, day_of_month, month_of_year, day_of_week = settings.worker_reindex_schedule.split()
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                       day_of_week=day_of_week)


def make_app(settings: Settings) -> Celery:
    """The Celery application for ``settings`` (tasks registered, ``app.delf`` = WorkerContext)."""
    url = broker_url(settings)
    prefix = settings.worker_namespace + ":"
    visibility = float(settings.worker_visibility_timeout)
    app = Celery("delf-es", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        # one exchange and routing key per queue: sharing one would copy every message to both queues
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (EXTRACT_QUEUE, INDEX_QUEUE)),
        task_default_queue=EXTRACT_QUEUE,
        task_default_exchange=EXTRACT_QUEUE,
        task_default_routing_key=EXTRACT_QUEUE,
        task_routes=TASK_ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy=publish_retry_policy(),
        broker_transport_options={
            "global_keyprefix": prefix,
            "visibility_timeout": visibility,
            # look for abandoned messages often enough to honour a short visibility timeout
            "unacked_restore_interval": max(1, min(10, int(visibility / 4))),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"global_keyprefix": prefix},
        worker_send_task_events=False,
        # The beat schedule (`celery -A delf_es.workers.main beat`): a safety-net flush for staged
        # features whose writer died, and a check (nightly by default) that rebuilds the index
        # when the configured model or PCA differs from the live index's (zero downtime, resumable).
        beat_schedule={
            "flush-stragglers": {"task": FLUSH, "schedule": timedelta(seconds=settings.worker_flush_interval)},
            "reindex-if-model-changed": {"task": REINDEX_TICK, "schedule": reindex_schedule(settings)},
        },
    )
    app.delf = WorkerContext(settings)
    register(app, settings)  # tasks are registered through the app: no module-level Celery app exists
    return app


def make_submitter(settings: Settings) -> Submitter:
    """A :class:`~delf_es.workers.submit.Submitter` on a new application for ``settings``."""
    return Submitter(make_app(settings))
