"""The tasks: ``delf.extract`` (one image -> staged features), ``delf.extract_batch`` (several
images, their pyramid levels batched: GPU workers) and ``delf.flush`` (staged -> index).

An extract task message is a dict (JSON)::

    {"source": "photos/a.jpg" or "https://...", "image_id": "photos/a.jpg", "metadata": {...},
     "job": "<job id>", "alias": null or "<index alias>", "failures": null or "<failures index>",
     "model": null or {"format": "delf-es-model/1", "backbone": ..., ..., "model_id": ...}}

``model`` is null (the worker's own model) or a :class:`~delf_es.model.spec.ModelSpec`'s JSON form
(``to_json``): the worker builds that model and fails the image (ModelMismatch) if it computes
another model id than the sender's, i.e. its weight or PCA files differ.  Messages queued by a
release before the spec carried a dict of Settings overrides there; workers still accept it
(:meth:`WorkerContext.model_spec`), so upgrading the workers first needs no queue drain.  An old
worker cannot read a new message: upgrade the workers before the submitters (or drain the queues).

Idempotency: the work is keyed by alias + model id (backbone, head, PCA) + image id
(:func:`delf_es.workers.store.staging_key`).  A redelivered or duplicated message re-stages the same
key, which enters the write queue once; the write itself is the Elasticsearch backend's upsert,
which replaces an image by id and publishes it through the image document's generation (an
image appears whole or not at all).  So N submitted images end as exactly N indexed images.

Failures: IndexUnavailable and Redis connection errors are retried with exponential backoff
(2 s, 4 s ... capped at 5 min, ``worker_max_retries`` times); an input that cannot be decoded
or fetched (4xx) is recorded as failed in its job and in ``<alias>-failures``, never retried.
An outage that outlasts the retries ends the same way (``RetriesExhausted`` with the last
error), so jobs finish; resubmitting the image later indexes it.  A failure record the index
cannot take at the time waits in Redis and is written by the next flush.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import redis.exceptions
from celery import Celery

from delf_es.degenerate import drop_flat_keypoints
from delf_es.errors import DelfEsError, FetchFailed, IndexUnavailable, InvalidImage, RetriesExhausted, UnsafeURL
from delf_es.index.base import ImageRecord
from delf_es.index.writing import upsert_and_refresh_cache
from delf_es.index.es.failures import FailedImage, failures_index, now
from delf_es.settings import Settings
from delf_es.workers.reindex import tick
from delf_es.workers.routes import EXTRACT, EXTRACT_BATCH, FLUSH, REINDEX_TICK
from delf_es.workers.store import Staged, staging_key

log = logging.getLogger(__name__)

RETRYABLE = (IndexUnavailable, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
BACKOFF_S = 2
BACKOFF_MAX_S = 300


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _final_attempt(task) -> bool:
    """True on the attempt after which autoretry gives up (``request.retries`` = retries so far)."""
    return task.max_retries is not None and task.request.retries >= task.max_retries


def _exhausted(task, exc: BaseException) -> RetriesExhausted:
    return RetriesExhausted(_error(exc), task.request.retries)


def _record_failures(ctx, index: str, failed: list[FailedImage]) -> None:
    """Write failure records to ``index``, or keep them in Redis for the next flush when the
    index is unreachable (a job must not wait for Elasticsearch to report a failure)."""
    try:
        ctx.failure_log(index).record(failed)
    except IndexUnavailable as exc:
        log.warning("%d failure record(s) for %s deferred: %s", len(failed), index, exc)
        ctx.store.defer_failures(index, failed)


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks on ``app`` (their retry policy comes from ``settings``)."""
    # shared=False: a shared task is also added to every app finalized later in the process, so
    # a second app (another Settings) would get the first one's tasks and retry policy.
    retry = dict(
        autoretry_for=RETRYABLE, retry_backoff=BACKOFF_S, retry_backoff_max=BACKOFF_MAX_S, retry_jitter=True,
        max_retries=settings.worker_max_retries, acks_late=True, reject_on_worker_lost=True, shared=False,
    )

    @app.task(bind=True, name=EXTRACT, **retry)
    def extract(self, item: dict[str, Any]) -> dict[str, Any]:
        return run_extract(self, item)

    @app.task(bind=True, name=EXTRACT_BATCH, **retry)
    def extract_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run_extract_batch(self, items)

    @app.task(bind=True, name=FLUSH, **retry)
    def flush(self) -> int:
        return run_flush(self)

    @app.task(bind=True, name=REINDEX_TICK, **retry)
    def reindex_tick(self) -> dict[str, Any]:
        return tick(self.app).as_dict()


# ---------------------------------------------------------------------------------- extract


def _give_up(ctx, item: dict[str, Any], stage: str, exc: BaseException, model_id: str = "") -> dict[str, Any]:
    """Record an image that will not be indexed (job + failures index); no retry."""
    image_id = item["image_id"]
    log.warning("%s failed at %s: %s", image_id, stage, exc)
    failures = item.get("failures") or failures_index(ctx.settings.index_alias)
    _record_failures(ctx, failures, [
        FailedImage(image_id, str(item.get("source", image_id)), stage, type(exc).__name__, str(exc), model_id, now())
    ])
    ctx.store.fail(item.get("job"), image_id, _error(exc))
    return {"image_id": image_id, "status": "failed", "stage": stage, "error": _error(exc)}


def _transient(exc: FetchFailed) -> bool:
    """A fetch worth retrying: no HTTP status (network), 429 or a server error."""
    return exc.status is None or exc.status == 429 or exc.status >= 500


def _load(source: str, settings: Settings):
    from delf_es.imageio import load_image, load_image_from_url

    return load_image_from_url(source, settings) if "://" in source else load_image(source, settings)


def run_extract(task, item: dict[str, Any]) -> dict[str, Any]:
    """Decode, extract and stage one image; an outage that outlasts the retries fails the image."""
    try:
        return _extract(task, item)
    except RETRYABLE as exc:
        if not _final_attempt(task):
            raise  # autoretry: backoff
        return _give_up(task.app.delf, item, "extract", _exhausted(task, exc))


def _extract(task, item: dict[str, Any]) -> dict[str, Any]:
    ctx = task.app.delf
    settings = ctx.settings
    image_id = str(item["image_id"])
    source = str(item.get("source") or image_id)
    try:
        extractor = ctx.extractor(item.get("model"))
    except DelfEsError as exc:  # missing weights / PCA: a configuration error, visible per image
        return _give_up(ctx, item, "extract", exc)
    started = time.perf_counter()
    try:
        image = _load(source, settings)
    except (InvalidImage, UnsafeURL) as exc:
        return _give_up(ctx, item, "decode", exc, extractor.model_id)
    except FetchFailed as exc:
        if _transient(exc) and task.request.retries < settings.worker_max_retries:
            raise task.retry(exc=exc, countdown=min(BACKOFF_MAX_S, BACKOFF_S * 2**task.request.retries))
        return _give_up(ctx, item, "decode", exc, extractor.model_id)
    decoded = time.perf_counter()
    try:
        features = drop_flat_keypoints(extractor.extract(image.pixels, image_id=image_id), image.pixels,
                                       settings.min_keypoint_contrast, settings.max_image_size)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stall its job: record it
        return _give_up(ctx, item, "extract", exc, extractor.model_id)
    extracted = time.perf_counter()
    _stage(ctx, item, features, _thumbnail(settings, image.pixels))
    ctx.store.add_stats(decode_s=decoded - started, extract_s=extracted - decoded, extracted=1)
    ctx.store.add_timings(decode=decoded - started, extract=extracted - decoded)
    task.app.send_task(FLUSH)
    return {"image_id": image_id, "status": "staged", "model_id": features.model_id,
            "keypoints": features.num_keypoints, "decode_s": decoded - started, "extract_s": extracted - decoded}


def _thumbnail(settings: Settings, pixels) -> bytes | None:
    """The JPEG stored with the image (made here: the index writer never sees the pixels)."""
    if not settings.thumbnails:
        return None
    from delf_es.thumbnails import make_thumbnail

    return make_thumbnail(pixels)


def _stage(ctx, item: dict[str, Any], features, thumbnail: bytes | None = None) -> None:
    settings = ctx.settings
    alias = item.get("alias") or settings.index_alias
    source = str(item.get("source") or item["image_id"])
    ctx.store.stage(Staged(
        key=staging_key(alias, features.model_id, str(item["image_id"])),
        alias=alias,
        path=source,
        metadata=dict(item.get("metadata") or {}),
        failures=item.get("failures") or failures_index(settings.index_alias),
        features=features,
        thumbnail=thumbnail,
    ), item.get("job"))


def run_extract_batch(task, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several images (one submission's, same alias and model) in one task, so their pyramid
    levels share forward passes (``Extractor.extract_many``, ``extract_batch`` per pass).

    Per image it behaves as ``delf.extract``: an undecodable image is recorded and the rest go
    on; a transient fetch error re-queues that image alone as ``delf.extract`` (with its own
    retries) rather than retrying the batch.  An outage while staging retries the whole task
    (staging is idempotent); one that outlasts the retries fails the images not yet staged."""
    ctx = task.app.delf
    staged: set[str] = set()
    try:
        return _extract_batch(task, items, staged)
    except RETRYABLE as exc:
        if not _final_attempt(task):
            raise
        return [_give_up(ctx, item, "extract", _exhausted(task, exc)) for item in items if item["image_id"] not in staged]


def _extract_batch(task, items: list[dict[str, Any]], staged: set[str]) -> list[dict[str, Any]]:
    ctx = task.app.delf
    settings = ctx.settings
    try:
        extractor = ctx.extractor(items[0].get("model") if items else None)
    except DelfEsError as exc:
        return [_give_up(ctx, item, "extract", exc) for item in items]
    results: list[dict[str, Any]] = []
    loaded = []  # (item, pixels, decode seconds)
    for item in items:
        started = time.perf_counter()
        try:
            image = _load(str(item.get("source") or item["image_id"]), settings)
        except (InvalidImage, UnsafeURL) as exc:
            results.append(_give_up(ctx, item, "decode", exc, extractor.model_id))
            continue
        except FetchFailed as exc:
            if _transient(exc):
                task.app.send_task(EXTRACT, args=[item])  # alone, with its own backoff
                results.append({"image_id": item["image_id"], "status": "requeued", "error": _error(exc)})
            else:
                results.append(_give_up(ctx, item, "decode", exc, extractor.model_id))
            continue
        loaded.append((item, image.pixels, time.perf_counter() - started))
    if not loaded:
        return results
    started = time.perf_counter()
    try:
        features = extractor.extract_many([(pixels, str(item["image_id"])) for item, pixels, _ in loaded])
    except Exception:  # noqa: BLE001 - find the bad image: extract one by one
        features = []
        for item, pixels, _ in loaded:
            try:
                features.append(extractor.extract(pixels, image_id=str(item["image_id"])))
            except Exception as exc:  # noqa: BLE001
                results.append(_give_up(ctx, item, "extract", exc, extractor.model_id))
                features.append(None)
    extract_each = (time.perf_counter() - started) / len(loaded)
    for (item, pixels, decode_s), feats in zip(loaded, features):
        if feats is None:
            continue
        # as DelfEs.extract does: keypoints on flat pixels never match (delf_es/degenerate.py)
        feats = drop_flat_keypoints(feats, pixels, settings.min_keypoint_contrast, settings.max_image_size)
        _stage(ctx, item, feats, _thumbnail(settings, pixels))
        staged.add(item["image_id"])
        ctx.store.add_stats(decode_s=decode_s, extract_s=extract_each, extracted=1)
        ctx.store.add_timings(decode=decode_s, extract=extract_each)
        results.append({"image_id": item["image_id"], "status": "staged", "model_id": feats.model_id,
                        "keypoints": feats.num_keypoints, "decode_s": decode_s, "extract_s": extract_each})
    task.app.send_task(FLUSH)
    return results


# ---------------------------------------------------------------------------------- flush


def run_flush(task) -> int:
    """Drain the staged features in batches while holding the writer's lock; returns images
    written.  A flush that finds the lock taken leaves the work to its holder (who looks again
    after releasing it), or, if the holder may be dead, retries once the lock could have expired."""
    ctx = task.app.delf
    store, settings = ctx.store, ctx.settings
    token = uuid.uuid4().hex
    written = 0
    while True:
        if not store.acquire(token, settings.worker_lock_ttl):
            wait = max(1.0, min(10.0, settings.worker_lock_ttl / 3))
            if store.ready_count() and store.claim_retry(wait):
                # a new flush, not task.retry: this task's retries count outages only (_final_attempt)
                task.app.send_task(FLUSH, countdown=wait)
            return written
        try:
            written += _drain(task, token)
        finally:
            store.release(token)
        if not store.ready_count():  # staged while we released: ours to write
            return written


def _drain(task, token: str) -> int:
    ctx = task.app.delf
    store, settings = ctx.store, ctx.settings
    written = 0
    while True:
        batch = store.peek(settings.worker_index_batch)
        if not store.renew(token, settings.worker_lock_ttl):
            return written
        started = time.perf_counter()
        try:
            # deferred records first: written after the batch, one could mask its image's success
            _write_deferred_failures(ctx)
            if not batch:
                return written
            outcomes = _write(ctx, batch)
        except RETRYABLE as exc:
            if not _final_attempt(task):
                raise  # autoretry: backoff; the batch stays staged
            if not batch:
                return written  # the deferred records wait for the next flush
            outcomes = _give_up_batch(ctx, batch, _exhausted(task, exc))
        if not store.finish(token, outcomes):
            log.warning("lost the writer's lock mid-batch; the next writer rewrites the batch (idempotent)")
            return written
        ok = sum(1 for _, _, error in outcomes if not error)
        elapsed = time.perf_counter() - started
        store.add_stats(write_s=elapsed, written=ok, batches=1)
        store.add_timings(write=elapsed, batch_size=len(outcomes))
        written += ok


#: Deferred failure records copied per flush (they pile up only while Elasticsearch is down).
DEFERRED_PER_FLUSH = 1000


def _write_deferred_failures(ctx) -> None:
    """Copy failure records deferred during an outage into their failures indices (lock holder
    only); IndexUnavailable if the index is still unreachable (the records stay)."""
    deferred = ctx.store.deferred_failures(DEFERRED_PER_FLUSH)
    if not deferred:
        return
    by_index: dict[str, list[FailedImage]] = {}
    for index, failed in deferred:
        by_index.setdefault(index, []).append(failed)
    for index, failed in by_index.items():
        ctx.failure_log(index).record(failed)
    ctx.store.drop_deferred_failures(len(deferred))
    log.info("wrote %d deferred failure record(s)", len(deferred))


def _give_up_batch(ctx, batch: list[tuple[str, bytes | None]], exc: RetriesExhausted) -> list[tuple[str, str, str]]:
    """Fail every image of a batch the index did not take within the retries, recorded like an
    undecodable image (deferred: the index is down), so their jobs finish."""
    log.warning("giving up on %d staged image(s): %s", len(batch), exc)
    by_index: dict[str, list[FailedImage]] = {}
    for key, payload in batch:
        if payload is not None:
            staged = Staged.decode(key, payload)
            by_index.setdefault(staged.failures, []).append(FailedImage(
                staged.features.image_id, staged.path, "index", type(exc).__name__, str(exc),
                staged.features.model_id, now()))
    for index, failed in by_index.items():
        ctx.store.defer_failures(index, failed)
    return [(key, key.split("|", 2)[2], _error(exc)) for key, _ in batch]


def _write(ctx, batch: list[tuple[str, bytes | None]]) -> list[tuple[str, str, str]]:
    """Upsert one batch, grouped by (alias, model); (key, image_id, error or '') per item, in order."""
    errors: dict[str, str] = {}
    groups: dict[tuple[str, str], list[Staged]] = {}
    image_of: dict[str, str] = {}
    for key, payload in batch:
        image_of[key] = key.split("|", 2)[2]  # alias|model_id|image_id
        if payload is None:
            errors[key] = "staged features vanished; submit the image again"
            continue
        staged = Staged.decode(key, payload)
        groups.setdefault((staged.alias, staged.features.model_id), []).append(staged)
    for (alias, model_id), items in groups.items():
        backend = ctx.backend(alias, model_id)
        created = now()
        report = upsert_and_refresh_cache(  # IndexUnavailable propagates: the task retries, the batch stays staged
            backend, ctx.location_cache,
            [ImageRecord(s.features.image_id, s.path, s.metadata, s.features, created, thumbnail=s.thumbnail)
             for s in items],
        )
        failed = {f.item_id: f.error for f in report.failed}
        by_failures: dict[str, list[Staged]] = {}
        for s in items:
            by_failures.setdefault(s.failures, []).append(s)
            if s.features.image_id in failed:
                errors[s.key] = "index refused: " + failed[s.features.image_id]
        for index, members in by_failures.items():
            log_ = ctx.failure_log(index)
            log_.record([FailedImage(s.features.image_id, s.path, "index", "BulkIndexFailed", failed[s.features.image_id],
                                     model_id, created) for s in members if s.features.image_id in failed])
            log_.clear([s.features.image_id for s in members if s.features.image_id not in failed])
    return [(key, image_of[key], errors.get(key, "")) for key, _ in batch]
