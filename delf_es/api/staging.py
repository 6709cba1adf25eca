"""``?wait=false``: uploads handed to the worker fleet (``delf_es/workers/``) instead of extracted here.

The workers read images by path or URL, so an upload is first written to ``api_upload_dir``
(default ``<data_dir>/api-uploads``; the workers must see the same folder) as
``jobs/<job id>/<n>.img``, never under the client's id: no id can name a server path.  A job's
folder is removed once :func:`progress` sees the job finished.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from delf_es.api.models import TaskAccepted, TaskStatus
from delf_es.api.uploads import Upload
from delf_es.errors import IndexUnavailable, InvalidRequest, TaskNotFound
from delf_es.sdk import DelfEs
from delf_es.settings import Settings


def upload_dir(settings: Settings) -> Path:
    return Path(settings.api_upload_dir or Path(settings.data_dir) / "api-uploads")


def _job_dir(settings: Settings, job_id: str) -> Path:
    return upload_dir(settings) / "jobs" / job_id


def submit(engine: DelfEs, settings: Settings, items: Iterable[tuple[str, Upload, Any]]) -> TaskAccepted:
    """Stage each ``(id, upload, metadata)`` and queue them as one job; the job id is the task id."""
    if not (settings.worker_redis_url or settings.redis_url):
        raise InvalidRequest("wait=false needs the worker fleet (DELF_ES_REDIS_URL or DELF_ES_WORKER_REDIS_URL)")
    items = list(items)
    for image_id, upload, metadata in items:
        if not upload.data:
            raise InvalidRequest(f"{image_id}: empty image body")
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidRequest(f"metadata of {image_id!r} must be a JSON object")
    job_id = uuid.uuid4().hex
    folder = _job_dir(settings, job_id)
    folder.mkdir(parents=True)
    entries = []
    for position, (image_id, upload, metadata) in enumerate(items):
        path = folder / f"{position}.img"
        path.write_bytes(upload.data)  # before the task is sent: a worker never reads half a file
        entries.append({"path": str(path), "image_id": image_id, "metadata": metadata or {}})
    try:
        with _broker_errors():
            engine._submitter().submit(entries, job_id=job_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return TaskAccepted(task_id=job_id, ids=[image_id for image_id, _, _ in items])


def progress(engine: DelfEs, settings: Settings, task_id: str) -> TaskStatus:
    if not task_id.isalnum() or len(task_id) > 64:
        raise TaskNotFound(task_id)
    if not (settings.worker_redis_url or settings.redis_url):
        raise TaskNotFound(task_id)
    with _broker_errors():
        state = engine._submitter().progress(task_id)
    if state.total == 0:
        raise TaskNotFound(task_id)
    failed = dict(state.failed)
    finished = state.done + len(failed) >= state.total
    if finished:
        _clean(settings, task_id)
    if not finished:
        label = "pending"
    elif not failed:
        label = "indexed"
    else:
        label = "failed" if not state.done else "partial"
    return TaskStatus(task_id=task_id, state=label, total=state.total, done=state.done, failed=failed)


@contextmanager
def _broker_errors() -> Iterator[None]:
    """Redis / broker outages as :class:`IndexUnavailable` (503 + Retry-After), not a 500."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OperationalError) as error:
        raise IndexUnavailable(f"worker queue unreachable: {error}") from None


def _clean(settings: Settings, job_id: str) -> None:
    shutil.rmtree(_job_dir(settings, job_id), ignore_errors=True)
