"""The submitting side: send images to the fleet as a *job* and follow the job to completion.

    from workers.client import Submitter
    with Submitter(settings) as submitter:
        job = submitter.submit(["photos/a.jpg", ("photos/b.jpg", {"city": "paris"})])
        progress = submitter.wait(job)            # JobProgress(total, done, failed)

A job counts an image done once it is in the index (not merely extracted), so waiting on a job
means the images are searchable after the next refresh (1 s by default).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterable, Mapping

from delf_es.errors import JobTimeout
from delf_es.settings import Settings
from workers.celery_app import EXTRACT_QUEUE, make_app
from workers.store import JobProgress, Store


def _item(entry: Any) -> tuple[str, tuple[str, dict[str, Any]]]:
    """(image id, (source path/URL, metadata)) of a path, a (path, metadata) pair or a dict with
    ``path`` and optional ``image_id`` (default: the path) and ``metadata``."""
    if isinstance(entry, tuple) and len(entry) == 2:
        return str(entry[0]), (str(entry[0]), dict(entry[1] or {}))
    if isinstance(entry, Mapping):
        path = str(entry["path"])
        return str(entry.get("image_id") or path), (path, dict(entry.get("metadata") or {}))
    return str(entry), (str(entry), {})


class Submitter:
    """Submit images to the ``extract`` queue and read job progress from Redis.

    Args:
        settings: broker (``worker_redis_url`` or ``redis_url``), ``worker_namespace``,
            ``index_alias`` (the default target).
        app: an application made by :func:`workers.celery_app.make_app` (built if None).
    """

    def __init__(self, settings: Settings, app=None) -> None:
        self.settings = settings
        self.app = app or make_app(settings)
        self.store: Store = self.app.delf.store

    def submit(
        self,
        items: Iterable[str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]],
        *,
        job_id: str | None = None,
        alias: str | None = None,
        failures: str | None = None,
        model: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue one extract task per image (id = its path/URL); returns the job id.

        ``alias`` / ``model`` redirect the work to another index / model configuration
        (reindexing uses them); None = the workers' own settings."""
        entries = list(dict(_item(entry) for entry in items).items())  # one task per id (the last wins)
        job_id = job_id or uuid.uuid4().hex
        self.store.start_job(job_id, len(entries))
        messages = [{"source": path, "image_id": image_id, "metadata": metadata, "job": job_id,
                     "alias": alias, "failures": failures, "model": dict(model) if model else None}
                    for image_id, (path, metadata) in entries]
        size = self.settings.worker_extract_batch
        with self.app.producer_or_acquire() as producer:
            if size == 1:
                for message in messages:
                    self.app.send_task("delf.extract", args=[message], queue=EXTRACT_QUEUE, producer=producer)
            else:  # a GPU fleet: several images per task, their levels batched by the worker
                for start in range(0, len(messages), size):
                    self.app.send_task("delf.extract_batch", args=[messages[start : start + size]],
                                       queue=EXTRACT_QUEUE, producer=producer)
        return job_id

    def submit_one(self, path: str, metadata: Mapping[str, Any] | None = None) -> str:
        """One image as a job of one; the job id is also the extract task's id."""
        job_id = uuid.uuid4().hex
        self.store.start_job(job_id, 1)
        message = {"source": path, "image_id": path, "metadata": dict(metadata or {}), "job": job_id,
                   "alias": None, "failures": None, "model": None}
        self.app.send_task("delf.extract", args=[message], queue=EXTRACT_QUEUE, task_id=job_id)
        return job_id

    def progress(self, job_id: str) -> JobProgress:
        return self.store.progress(job_id)

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll: float = 0.5,
        on_progress: Callable[[JobProgress], None] | None = None,
    ) -> JobProgress:
        """Poll until every image of the job is indexed or failed; TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            progress = self.progress(job_id)
            if on_progress is not None:
                on_progress(progress)
            if progress.finished or progress.total == 0:
                return progress
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeout(f"job {job_id}: {progress.done + len(progress.failed)}/{progress.total} "
                                   f"after {timeout} s")
            time.sleep(poll)

    def close(self) -> None:
        self.store.close()
        self.app.close()

    def __enter__(self) -> "Submitter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
