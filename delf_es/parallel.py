"""Decode + extract in several processes, each with its share of the cores.

On a CPU host, N processes of cores/N threads beat one process of N threads: the network's
depthwise layers and element-wise steps are memory-bound and serial between convolutions,
so a second thread adds less than a second process (benchmarks/results/extract_speed.json,
rows ``*-2x1``; benchmarks/results/ingest_embedded.json).  :class:`ExtractorPool` is what
``DelfEs.bulk_add`` (``delf-es index``) uses when ``Settings.extract_processes`` asks for
more than one process; results come back in input order, failures as :class:`ItemFailure`.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from delf_es.errors import DelfEsError, ItemFailure
from delf_es.settings import Settings
from delf_es.types import Features


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_plan(settings: Settings) -> tuple[int, int]:
    """(processes, threads per process) for bulk extraction: ``extract_processes`` (0 = one per
    usable core on CPU, 1 on a GPU) and ``torch_threads`` (0 = cores / processes)."""
    cores = usable_cores()
    processes = settings.extract_processes or (cores if settings.device == "cpu" else 1)
    threads = settings.torch_threads or max(1, cores // processes)
    return processes, threads


# Per worker process: the engine built once by the pool initializer (a process-pool worker has
# no other place to keep it between tasks; it never leaves that process).
_ENGINE: Any = None


def _start_worker(engine: Callable[[Settings], Any], settings_fields: dict[str, Any], threads: int) -> None:
    global _ENGINE
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    _ENGINE = engine(Settings(**settings_fields))
    _ENGINE.extractor  # build the model now, not inside the first task


def _extract_one(fields: dict[str, Any]) -> tuple[str, Features | None, str, bytes | None]:
    """(name or label, features or None, error or "", thumbnail JPEG or None)."""
    label = fields["path"] if isinstance(fields["path"], str) else "<bytes>"
    try:
        name, image = _ENGINE.load(fields["path"], fields.get("img"), fields.get("bytestream", False))
        # the thumbnail is made here too: the pixels never leave this process
        return name, _ENGINE.extract(image.pixels, image_id=name), "", _ENGINE._thumbnail(image)
    except DelfEsError as error:
        return label, None, str(error), None


class ExtractorPool:
    """``processes`` worker processes, each holding its own model with ``threads`` threads.

    Use as a context manager; :meth:`extract` maps item fields (``path``, ``img``,
    ``bytestream`` as in ``DelfEs.bulk_add``) to ``(name, Features, thumbnail JPEG or None)`` or an
    ItemFailure, in order.
    """

    def __init__(self, settings: Settings, processes: int, threads: int, engine: Callable[[Settings], Any]) -> None:
        fields = settings.model_dump()
        fields["torch_threads"] = threads
        # ``engine(settings)`` builds what loads and extracts (delf_es.sdk.pool_engine): a
        # module-level function the spawned process imports by name, handed in so that this
        # module never imports the SDK that uses it (no import cycle).
        # spawn, not fork: a forked copy of a process whose torch/OpenMP threads already ran can deadlock
        self._executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(engine, fields, threads))
        self.processes = processes

    def extract(self, items: Iterable[dict[str, Any]]) -> Iterator[tuple[str, Features, bytes | None] | ItemFailure]:
        # a bounded window of tasks in flight: memory stays flat for millions of items
        window = 4 * self.processes
        pending = []
        for fields in items:
            pending.append(self._executor.submit(_extract_one, fields))
            if len(pending) >= window:
                yield self._result(pending.pop(0))
        while pending:
            yield self._result(pending.pop(0))

    @staticmethod
    def _result(future) -> tuple[str, Features, bytes | None] | ItemFailure:
        name, features, error, thumbnail = future.result()
        return ItemFailure(item_id=name, error=error) if features is None else (name, features, thumbnail)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ExtractorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
