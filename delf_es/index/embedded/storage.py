"""The embedded index's storage: the SQLite database (source of truth), the directory lock, the
readers-writer lock, and the blob encoding of arrays.  Mixed into
:class:`~delf_es.index.embedded.backend.EmbeddedBackend` (see the package docstring for the layout).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from delf_es.errors import IndexUnavailable, ModelMismatch

SCHEMA = "delf-es-embedded/1"
DATABASE_NAME = "images.sqlite3"
LOCK_NAME = "LOCK"
#: Host parameters per ``IN (...)`` query, below SQLite's limit.
SQL_CHUNK = 500

try:  # POSIX only; elsewhere the directory is not protected against a second process.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


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


class Storage:
    """SQLite and directory handling of the embedded backend (a mixin: the backend's state)."""

    def _acquire_directory(self) -> None:
        handle = open(self.directory / LOCK_NAME, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.close()
                raise IndexUnavailable(f"embedded index {self.directory} is already open elsewhere") from exc
        self._lock_file = handle

    def _release_directory(self) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "_db", None) is not None:
                self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.directory / DATABASE_NAME, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is durable before faiss reflects it
        return conn

    def _create_schema(self, model_id: str | None) -> None:
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
        self._index = self._load_snapshot()
        if self._index is None or self._needs_rebuild(self._index.ntotal):  # e.g. reopened with another exact_limit
            self._rebuild_index()
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
