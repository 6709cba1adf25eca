"""Bulk loading the way Elasticsearch recommends ("Tune for indexing speed"): during a large load
the target indices do not refresh (``refresh_interval: -1``) and keep no replicas
(``number_of_replicas: 0``: each document is indexed once, on its primary, instead of once per
copy), and several writers send the write rounds at once; afterwards both settings are put back as
they were, the indices refreshed, and the replicas rebuilt by copying the primaries' segments.

    with BulkLoad(transport, aliases, writer, writers=4):
        writer.upsert(records)   # ... many times
    # settings restored here, also after an exception or a KeyboardInterrupt

The SDK enters it from ``DelfEs.add_features_bulk`` once a load passes
``settings.es_bulk_load_images`` images (``ElasticsearchBackend.bulk_load``).  What it measured:
``benchmarks/bulk_load.py`` -> ``benchmarks/results/bulk_load.json``.

Caveats: while a load runs, other clients of the same index see its new images only at the end
(no refresh) and the index has no replica (losing a node loses its shards until the load ends).
A process killed with SIGKILL cannot run the ``finally``: the indices then keep the bulk settings
until someone restores them (``put_settings`` of the values logged at the start, at INFO).
"""

from __future__ import annotations

import logging
from typing import Any

from delf_es.errors import DelfEsError
from delf_es.index.es.templates import Aliases
from delf_es.index.es.transport import Transport
from delf_es.index.es.writes import Writer

logger = logging.getLogger(__name__)

#: The index settings a bulk load changes, and their values during the load.
BULK_SETTINGS: dict[str, Any] = {"index.refresh_interval": "-1", "index.number_of_replicas": 0}


class BulkLoad:
    """A context manager: bulk settings on the indices behind ``aliases`` and ``writers``
    concurrent write rounds in ``writer`` while it is open; the previous settings restored on exit.

    Nothing is changed when the aliases point at no index yet (they are created by the first
    write: enter after it) or when a load is already open on the same writer (nested loads)."""

    def __init__(self, transport: Transport, aliases: Aliases, writer: Writer, writers: int = 4) -> None:
        self.transport = transport
        self.aliases = aliases
        self.writer = writer
        self.writers = max(1, int(writers))
        self.saved: dict[str, dict[str, Any]] = {}  # index -> the settings to restore (None = the default)
        self._previous_writers: int | None = None

    def __enter__(self) -> "BulkLoad":
        if getattr(self.writer, "bulk_loading", False):
            return self  # an outer load already holds the settings
        indices = self.aliases.load()
        if indices is None:
            return self
        names = [indices.images, indices.keypoints]
        client = self.transport.client
        found = self.transport.call("reading index settings", client.indices.get_settings, index=",".join(names),
                                    flat_settings=True)
        saved = {name: {key: found[name]["settings"].get(key) for key in BULK_SETTINGS} for name in names}
        logger.info("bulk load on %s: settings %s during the load, then back to %s", names, BULK_SETTINGS, saved)
        self.saved = {}
        try:
            for name in names:
                self.saved[name] = saved[name]  # before the change: a failed put is still undone
                self.transport.call(f"bulk settings of {name}", client.indices.put_settings, index=name,
                                    settings=dict(BULK_SETTINGS))
        except BaseException:
            self._restore()
            raise
        self._previous_writers = self.writer.writers
        self.writer.writers = self.writers
        self.writer.bulk_loading = True
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        if self._previous_writers is not None:
            self.writer.writers = self._previous_writers
            self.writer.bulk_loading = False
            self._previous_writers = None
        if not self.saved:
            return
        try:
            self._restore()
        except DelfEsError:
            if exc is None:
                raise
            # the load's own error is the one to report; the restore failure is logged
            logger.exception("bulk load: restoring the settings of %s failed after %r", sorted(self.saved), exc)

    def _restore(self) -> None:
        """Put back every saved setting (None resets it to the default), then refresh."""
        client = self.transport.client
        names, self.saved = self.saved, {}
        first: DelfEsError | None = None
        for name, values in names.items():  # every index is tried, the first failure raised after
            try:
                self.transport.call(f"restoring the settings of {name}", client.indices.put_settings, index=name,
                                    settings=values)
            except DelfEsError as error:
                first = first or error
        if first is not None:
            raise first
        if names:
            self.transport.call("refresh after the bulk load", client.indices.refresh, index=",".join(names))
        logger.info("bulk load on %s done: settings restored", sorted(names))
