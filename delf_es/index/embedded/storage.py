"""The embedded index's storage: the SQLite database (source of truth), the writer lock and the
reader snapshots, the readers-writer lock, and the blob encoding of arrays.  Mixed into
:class:`~delf_es.index.embedded.backend.EmbeddedBackend` (see the package docstring for the layout).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from delf_es.errors import IndexLocked, IndexUnavailable, ModelMismatch

logger = logging.getLogger(__name__)

SCHEMA = "delf-es-embedded/1"
DATABASE_NAME = "images.sqlite3"
LOCK_NAME = "LOCK"  # the writer lock (delf_es/index/writer_lock.py)
#: Host parameters per ``IN (...)`` query, below SQLite's limit.
SQL_CHUNK = 500


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers.  Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass(frozen=True)
class Doc:
    """What search needs in memory about one image."""

    image_id: str
    metadata: dict[str, Any]
    num_keypoints: int


def blob(array: np.ndarray) -> bytes:
    """An array as little-endian float32 bytes (a SQLite BLOB)."""
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def unblob(data: bytes, columns: int) -> np.ndarray:
    """The (N, columns) float32 array :func:`blob` wrote."""
    flat = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return flat.reshape(-1, columns) if columns else flat.reshape(0, 0)


@dataclass(frozen=True)
class DescriptorChunk:
    """Consecutive stored images' keypoint descriptors: SQLite ``rows`` (R,) int64 with their
    ``counts`` (R,) keypoints and ``image_ids``; ``vectors`` (sum(counts), D) float32, image by image."""

    rows: np.ndarray
    counts: np.ndarray
    image_ids: list[str]
    vectors: np.ndarray


def descriptor_chunks(connection: sqlite3.Connection, columns: int, chunk_vectors: int) -> Iterator[DescriptorChunk]:
    """Every image's descriptors in row order, whole images of at least ``chunk_vectors`` vectors per
    chunk (the last one fewer): a pass over the whole store with one chunk in memory (the keypoint
    index's rebuild; exact searches in benchmarks)."""
    rows: list[int] = []
    counts: list[int] = []
    names: list[str] = []
    blocks: list[np.ndarray] = []
    buffered = 0
    query = "SELECT row, image_id, num_keypoints, descriptors FROM images WHERE num_keypoints > 0 ORDER BY row"
    for row, image_id, count, data in connection.execute(query):
        rows.append(row)
        names.append(image_id)
        counts.append(count)
        blocks.append(unblob(data, columns))
        buffered += count
        if buffered >= chunk_vectors:
            yield DescriptorChunk(np.array(rows, np.int64), np.array(counts, np.int64), names,
                                  np.ascontiguousarray(np.concatenate(blocks)))
            rows, counts, names, blocks, buffered = [], [], [], [], 0
    if blocks:
        yield DescriptorChunk(np.array(rows, np.int64), np.array(counts, np.int64), names,
                              np.ascontiguousarray(np.concatenate(blocks)))


class Storage:
    """SQLite, lock and snapshot handling of the embedded backend (a mixin: the backend's state)."""

    def _release_directory(self) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "_db", None) is not None:
                self._db.close()
        self._writer.release()  # the kernel drops the flock with the descriptor

    def _load_snapshot_state(self) -> None:
        """(Re)load the in-memory state inside one read transaction: a consistent snapshot
        even while another process commits (WAL)."""
        self._row_of, self._docs, self._globals = {}, {}, {}
        self._global_matrix = None
        self._snapshot_generation = -1
        self._db.execute("BEGIN")
        try:
            self._load()
        finally:
            self._db.execute("COMMIT")

    def _database_generation(self) -> int:
        row = self._reader().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _catch_up(self) -> None:
        """A reader (not the writer): reload if another process wrote since our snapshot."""
        if self._writer.held or self._closed:
            return
        if self._database_generation() == self._generation:
            return
        with self._write_mutex:
            with self._rw.write():
                if not self._closed and self._database_generation() != self._generation:
                    logger.info("embedded index %s changed on disk: reloading", self.directory)
                    self._load_snapshot_state()

    def _checkpoint_if_free(self) -> None:
        """A reader closing: if no one is writing and our state is the database's, take the
        writer lock for the checkpoint (the next opener then skips a rebuild); never waits."""
        if self._writer.held or self._index is None:
            return
        try:
            self._writer.acquire(str(self.directory))
        except IndexLocked:
            return
        if self._database_generation() != self._generation:
            self._writer.release()  # another process wrote after our snapshot: not ours to save
            return
        self._remove_stale_snapshots()  # leftovers of a crashed writer (no writer is running now)

    def _become_writer(self) -> None:
        """Before a write (write mutex held): take the writer lock (IndexLocked names the holder)
        and catch up with what other writers committed before we got it."""
        if self._writer.held:
            return
        self._writer.acquire(str(self.directory))
        if self._database_generation() != self._generation:
            with self._rw.write():
                self._load_snapshot_state()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.directory / DATABASE_NAME, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is durable before faiss reflects it
        return conn

    def _create_schema(self, model_id: str | None, keypoint_vectors: bool = True) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                """CREATE TABLE IF NOT EXISTS images (
                    row INTEGER PRIMARY KEY AUTOINCREMENT,
                    image_id TEXT NOT NULL UNIQUE,
                    path TEXT NOT NULL,
                    metadata TEXT NOT NULL,
                    width INTEGER NOT NULL,
                    height INTEGER NOT NULL,
                    num_keypoints INTEGER NOT NULL,
                    model_id TEXT NOT NULL,
                    created_at TEXT NOT NULL,
                    keypoints BLOB NOT NULL,
                    descriptors BLOB NOT NULL,
                    global_desc BLOB NOT NULL)"""
            )
            # keypoint pyramid scales (scale-consistent verification) came after schema 1's first
            # release: older files get the column with NULLs (their scales read as unknown)
            if "scales" not in {row[1] for row in db.execute("PRAGMA table_info(images)")}:
                db.execute("ALTER TABLE images ADD COLUMN scales BLOB")
            # Thumbnails in their own table: indexes written before they existed need no migration.
            db.execute("CREATE TABLE IF NOT EXISTS thumbnails (image_id TEXT PRIMARY KEY, jpeg BLOB NOT NULL)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('generation', '0')", (SCHEMA,))
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta["schema"] != SCHEMA:
                raise IndexUnavailable(f"{self.directory}: schema {meta['schema']!r}, this code reads {SCHEMA!r}")
            stored = meta.get("model_id")
            if model_id is not None and stored is not None and stored != model_id:
                raise ModelMismatch(
                    f"{self.directory} holds features of model {stored!r}, not {model_id!r}; "
                    "use another directory for another model"
                )
            if model_id is not None and stored is None:
                db.execute("INSERT INTO meta VALUES ('model_id', ?)", (model_id,))
            if "keypoint_vectors" not in meta:
                # a new index records what it was asked for; one written before the setting has them
                empty = stored is None and db.execute("SELECT 1 FROM images LIMIT 1").fetchone() is None
                meta["keypoint_vectors"] = "1" if keypoint_vectors or not empty else "0"
                db.execute("INSERT INTO meta VALUES ('keypoint_vectors', ?)", (meta["keypoint_vectors"],))
            self._keypoint_vectors = meta["keypoint_vectors"] == "1"
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _load(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self._model_id = meta.get("model_id")
        self._local_dim = int(meta["local_dim"]) if "local_dim" in meta else None
        self._global_dim = int(meta["global_dim"]) if "global_dim" in meta else None
        self._generation = int(meta["generation"])
        for row, image_id, metadata, num_keypoints, global_blob in self._db.execute(
            "SELECT row, image_id, metadata, num_keypoints, global_desc FROM images"
        ):
            self._row_of[image_id] = row
            self._docs[row] = Doc(image_id, json.loads(metadata), num_keypoints)
            if global_blob:
                self._globals[row] = np.frombuffer(global_blob, dtype="<f4").astype(np.float32)
        if not self._keypoint_vectors:  # no keypoint kNN: nothing to mirror in faiss
            self._index = None
            return
        self._index = self._load_snapshot()
        if self._index is None or self._needs_rebuild(self._index.ntotal):  # e.g. reopened with another exact_limit
            self._rebuild_index()
        if self._writer.held:  # a reader must not delete the snapshot a writer just wrote
            self._remove_stale_snapshots()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._connections_lock:
                self._read_connections.append(conn)
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise IndexUnavailable(f"embedded index {self.directory} is closed")
        if self._broken:
            raise IndexUnavailable(f"embedded index {self.directory} is unusable, reopen it: {self._broken}")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            self._catch_up()
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"embedded index {self.directory}: {exc}") from exc
        with self._rw.read():
            self._check_open()
            try:
                yield
            except sqlite3.Error as exc:
                raise IndexUnavailable(f"embedded index {self.directory}: {exc}") from exc

    def _blobs(self, column: str, image_ids: Iterable[str]) -> list[tuple[str, bytes]]:
        """(image id, ``column`` blob) of the stored images among ``image_ids``."""
        wanted = list(dict.fromkeys(image_ids))
        out: list[tuple[str, bytes]] = []
        with self._reading():
            conn = self._reader()
            for start in range(0, len(wanted), SQL_CHUNK):
                chunk = wanted[start : start + SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                out += conn.execute(f"SELECT image_id, {column} FROM images WHERE image_id IN ({marks})", chunk).fetchall()
        return out
