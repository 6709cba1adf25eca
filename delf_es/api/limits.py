"""Bounds on what one request may cost: body size and arrival time, and CPU (extractions).

- :func:`read_body` / :func:`read_form` count bytes as they stream in and stop at the cap
  (:class:`~delf_es.errors.UploadTooLarge`, 413) rather than reading a huge body first; a
  declared ``Content-Length`` over the cap is refused before anything is read.  Multipart
  files are spooled by Starlette's parser (memory up to 1 MB, then a temporary file).
- :class:`ExtractionSlots`: at most ``size`` model runs at once (the model is CPU-bound: more
  would only share the cores); up to ``max_queued`` requests wait for a slot, beyond that a
  request is refused at once with 503 + Retry-After instead of piling up.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, TypeVar

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from delf_es.errors import InvalidRequest, Overloaded, UploadTimedOut, UploadTooLarge

T = TypeVar("T")

#: Most files in one multipart body (a _bulk upload) and most plain fields.
MAX_FILES = 256
MAX_FIELDS = 1024


def _check_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(limit)


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge(limit)
        yield chunk


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes, within ``timeout_s`` s."""
    _check_declared(request, limit)

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in _capped(request, limit)])

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except TimeoutError:
        raise UploadTimedOut(f"request body not received within {timeout_s:g} s") from None


async def read_form(request: Request, limit: int, timeout_s: float) -> FormData:
    """A multipart body parsed while it streams in, at most ``limit`` bytes in all."""
    _check_declared(request, limit)
    parser = MultiPartParser(request.headers, _capped(request, limit), max_files=MAX_FILES,
                             max_fields=MAX_FIELDS, max_part_size=limit)
    try:
        return await asyncio.wait_for(parser.parse(), timeout_s)
    except TimeoutError:
        raise UploadTimedOut(f"request body not received within {timeout_s:g} s") from None
    except MultiPartException as error:
        raise InvalidRequest(f"malformed multipart body: {error.message}") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class ExtractionSlots:
    """A semaphore with a bounded waiting room, for work that runs the model.

    Args:
        size: works at once.
        max_queued: works waiting for a slot; one more is refused (:class:`Overloaded`).
    """

    def __init__(self, size: int, max_queued: int) -> None:
        self.size = size
        self.max_queued = max_queued
        self.running = 0
        self.queued = 0
        self._semaphore = asyncio.Semaphore(size)
        # The model runs on these ``size`` threads only, not on whichever of the 40 threads of the
        # request pool is free: each new thread running torch grows the process by its own
        # allocator arena and thread state (measured: RSS +400 MB per load level with the pool).
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="delf-es-extract")

    async def run(self, work: Callable[..., T], *args: Any, timeout_s: float) -> T:
        """``work(*args)`` on one of the slots' threads once a slot is free, within ``timeout_s`` s
        (waiting included).  After the deadline the client gets :class:`Overloaded`; the work
        itself cannot be interrupted, so it finishes in the background still holding its
        slot (which keeps the bound on CPU honest)."""
        if self._semaphore.locked() and self.queued >= self.max_queued:
            raise Overloaded(f"{self.queued} requests already wait for one of {self.size} extraction slots",
                             retry_after=_retry_after(timeout_s))
        deadline = time.monotonic() + timeout_s
        self.queued += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), timeout_s)
        except TimeoutError:
            raise Overloaded(f"no extraction slot free within {timeout_s:g} s",
                             retry_after=_retry_after(timeout_s)) from None
        finally:
            self.queued -= 1
        self.running += 1
        task = asyncio.get_running_loop().run_in_executor(self._threads, work, *args)
        task.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise Overloaded(f"request took longer than {timeout_s:g} s", retry_after=_retry_after(timeout_s)) from None

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _finished(self, task: asyncio.Future) -> None:
        self.running -= 1
        self._semaphore.release()
        if not task.cancelled():
            task.exception()  # retrieved, so a timed-out failure is not reported as "never retrieved"


def _retry_after(timeout_s: float) -> int:
    return max(1, min(60, int(timeout_s // 4)))
