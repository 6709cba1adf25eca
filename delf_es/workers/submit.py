"""The submitting side: send images to the fleet as a *job* and follow the job to completion.

    from delf_es.workers.app import make_submitter
    with make_submitter(settings) as submitter:           # = Submitter(make_app(settings))
        job = submitter.submit(["photos/a.jpg", ("photos/b.jpg", {"city": "paris"})])
        progress = submitter.wait(job)            # JobProgress(total, done, failed)

A job counts an image done once it is in the index (not merely extracted), so waiting on a job
means the images are searchable after the next refresh (1 s by default).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from delf_es.errors import InvalidRequest, JobTimeout
from delf_es.items import check_id, check_metadata, parse_item
from delf_es.workers.routes import EXTRACT, EXTRACT_BATCH, EXTRACT_QUEUE
from delf_es.workers.store import JobProgress, Store

if TYPE_CHECKING:  # pragma: no cover
    from delf_es.model.spec import ModelSpec


class Submitter:
    """Submit images to the ``extract`` queue and read job progress from Redis.

    Args:
        app: the Celery application of the fleet, made by :func:`delf_es.workers.app.make_app`
            (its settings give the broker, ``worker_namespace`` and ``worker_extract_batch``).
            Closed by :meth:`close`.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.settings = app.delf.settings
        self.store: Store = self.app.delf.store

    def submit(
        self,
        items: Iterable[str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]],
        *,
        job_id: str | None = None,
        alias: str | None = None,
        failures: str | None = None,
        model: ModelSpec | None = None,
    ) -> str:
        """Queue one extract task per image (id = its path/URL); returns the job id.

        ``alias`` / ``model`` redirect the work to another index / model (reindexing uses them;
        the spec travels as its JSON form); None = the workers' own settings."""
        model_json = None
        if model is not None:
            from delf_es.model.spec import ModelSpec  # only here: submitting alone never loads the model code

            if not isinstance(model, ModelSpec):
                raise InvalidRequest(f"model must be a ModelSpec (delf_es.model.spec), not {type(model).__name__}")
            model_json = model.to_json()
        entries: dict[str, tuple[str, dict[str, Any]]] = {}  # one task per id (the last wins)
        refused: dict[str, str] = {}
        for entry in items:
            item = parse_item(entry)
            try:  # the SDK's rules: an id or metadata it would refuse is refused here too
                if item.invalid or not isinstance(item.path, str):
                    raise InvalidRequest(item.invalid or "the workers read a path or URL, not bytes")
                entries[check_id(item.image_id)] = (item.path, check_metadata(item.metadata))
            except InvalidRequest as error:
                refused[item.label] = f"InvalidRequest: {error}"
        job_id = job_id or uuid.uuid4().hex
        self.store.start_job(job_id, len(entries) + len(refused))
        for image_id, error in refused.items():  # counted in the job, so it finishes and reports them
            self.store.fail(job_id, image_id, error)
        messages = [{"source": path, "image_id": image_id, "metadata": metadata, "job": job_id,
                     "alias": alias, "failures": failures, "model": model_json}
                    for image_id, (path, metadata) in entries.items()]
        size = self.settings.worker_extract_batch
        with self.app.producer_or_acquire() as producer:
            if size == 1:
                for message in messages:
                    self.app.send_task(EXTRACT, args=[message], queue=EXTRACT_QUEUE, producer=producer)
            else:  # a GPU fleet: several images per task, their levels batched by the worker
                for start in range(0, len(messages), size):
                    self.app.send_task(EXTRACT_BATCH, args=[messages[start : start + size]],
                                       queue=EXTRACT_QUEUE, producer=producer)
        return job_id

    def submit_one(self, path: str, metadata: Mapping[str, Any] | None = None) -> str:
        """One image as a job of one; the job id is also the extract task's id."""
        job_id = uuid.uuid4().hex
        self.store.start_job(job_id, 1)
        message = {"source": path, "image_id": path, "metadata": dict(metadata or {}), "job": job_id,
                   "alias": None, "failures": None, "model": None}
        self.app.send_task(EXTRACT, args=[message], queue=EXTRACT_QUEUE, task_id=job_id)
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
