"""The embedded backend: the public :class:`~delf_es.index.base.Backend` API over the SQLite storage
(:mod:`~delf_es.index.embedded.storage`) and the faiss keypoint index
(:mod:`~delf_es.index.embedded.keypoint_index`); see the package docstring for the layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import faiss
import numpy as np

from delf_es.errors import (ConfigurationError, FeatureShapeError, ImageNotFound, IndexUnavailable, ItemFailure,
                            KeypointVectorsDisabled)
from delf_es.index.base import BulkReport, GlobalHit, ImageRecord, MetadataFilter, Neighbours, StoredImage
from delf_es.index.codes import int8_codes
from delf_es.index.embedded.keypoint_index import MAX_KEYPOINTS, KeypointIndex
from delf_es.index.embedded.storage import LOCK_NAME, Doc, ReadWriteLock, Storage, blob, unblob
from delf_es.index.embedded.structure import HNSW_QUANTIZER_FROM, SQ8_FROM
from delf_es.index.filters import compile_filter
from delf_es.index.records import check_descriptors, check_k, check_vector, record_problem
from delf_es.index.writer_lock import WriterLock

logger = logging.getLogger(__name__)


class _ItemRejected(Exception):
    """One record of a bulk write is invalid; becomes an ItemFailure."""


@dataclass(frozen=True)
class _Added:
    row: int
    doc: Doc
    descriptors: np.ndarray
    global_desc: np.ndarray


class EmbeddedBackend(Storage, KeypointIndex):
    """:class:`~delf_es.index.base.Backend` stored in one directory (SQLite + faiss).

    Args:
        directory: where the index lives; created if missing.
        model_id: the model whose features this index holds.  None = take it from the
            directory, or from the first record written.  Differs from the stored one:
            :class:`~delf_es.errors.ModelMismatch`.
        exact_limit: most keypoint vectors searched exactly (flat index); above it an
            IVF index is trained.  None = always exact; 0 = always IVF.
        nprobe: IVF lists visited per query (recall vs latency); None = auto, growing with the
            number of lists (:func:`~delf_es.index.embedded.keypoint_index.auto_nprobe`).
        keypoint_vectors: mirror every keypoint descriptor in the faiss index (the keypoint kNN);
            False saves its memory and upsert time when searches use only the global shortlist and
            matching.  Recorded in the directory when it is created; an existing directory keeps
            its own (one created before the setting has them).
        sq8_from: keypoint vectors from which an IVF stores them as 8-bit codes (4x less memory);
            None = always float32 (:mod:`~delf_es.index.embedded.structure`).
        hnsw_from: IVF lists from which the coarse quantizer is an HNSW graph (fast assignment).

    Raises:
        IndexUnavailable: the directory is open elsewhere or its database is unreadable.
        ModelMismatch: ``model_id`` differs from the one stored in the directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        model_id: str | None = None,
        *,
        exact_limit: int | None = 200_000,
        nprobe: int | None = None,
        keypoint_vectors: bool = True,
        sq8_from: int | None = SQ8_FROM,
        hnsw_from: int = HNSW_QUANTIZER_FROM,
    ) -> None:
        if exact_limit is not None and exact_limit < 0:
            raise ConfigurationError(f"exact_limit must be >= 0 or None, got {exact_limit}")
        if nprobe is not None and nprobe < 1:
            raise ConfigurationError(f"nprobe must be >= 1, got {nprobe}")
        if (sq8_from is not None and sq8_from < 0) or hnsw_from < 1:
            raise ConfigurationError(f"sq8_from must be >= 0 or None and hnsw_from >= 1, got {sq8_from}, {hnsw_from}")
        self.directory = Path(directory)
        self.exact_limit = exact_limit
        self.nprobe = nprobe
        self.sq8_from = sq8_from
        self.hnsw_from = hnsw_from
        self._rw = ReadWriteLock()
        self._write_mutex = threading.Lock()
        self._local = threading.local()
        self._read_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = True
        self._broken: str | None = None  # set when faiss could not be brought in step with SQLite
        self._writer = WriterLock(self.directory / LOCK_NAME)
        # In-memory state, changed only under the exclusive lock.
        self._model_id: str | None = None
        self._local_dim: int | None = None
        self._global_dim: int | None = None
        self._generation = 0
        self._snapshot_generation = -1
        self._row_of: dict[str, int] = {}
        self._docs: dict[int, Doc] = {}
        self._globals: dict[int, np.ndarray] = {}
        self._global_matrix: tuple[np.ndarray, np.ndarray] | None = None
        self._index: Any = None
        self._ivf_trained_on = 0
        self._keypoint_vectors = keypoint_vectors  # the directory's own, once _create_schema has read it
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
            self._create_schema(model_id, keypoint_vectors)
            self._load_snapshot_state()
        except sqlite3.Error as exc:
            self._release_directory()
            raise IndexUnavailable(f"cannot open embedded index {self.directory}: {exc}") from exc
        except BaseException:
            self._release_directory()
            raise
        self._closed = False

    @property
    def model_id(self) -> str | None:
        """The model whose features this index holds (None until set)."""
        return self._model_id

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction of the writer: rolled back on any exception, and a
        SQLite error becomes ``IndexUnavailable`` naming ``action`` ("write", "delete")."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            yield
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise IndexUnavailable(f"embedded index {self.directory}: {action} failed: {exc}") from exc
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def upsert(self, records: Iterable[ImageRecord], refresh: bool = False) -> BulkReport:
        """Write images, replacing any with the same id (document and keypoints together).

        An invalid record (another model_id, another descriptor dimension, non-unit
        descriptors, metadata that is not a JSON object...) is a failed item; the others
        are written.  Writes are searchable on return whatever ``refresh`` says.
        """
        succeeded: list[str] = []
        failed: list[ItemFailure] = []
        with self._write_mutex:
            self._check_open()
            self._become_writer()
            db = self._db
            pending = {"model_id": self._model_id, "local_dim": self._local_dim, "global_dim": self._global_dim}
            added: dict[int, _Added] = {}
            removed: dict[int, int] = {}  # row -> num_keypoints, rows that existed before this call
            with self._transaction("write"):
                for record in records:
                    item_id = str(getattr(record, "image_id", record))
                    db.execute("SAVEPOINT item")
                    try:
                        item_id, values, doc, descriptors, global_desc, binds = self._validate(record, pending)
                        old = db.execute("SELECT row, num_keypoints FROM images WHERE image_id = ?", (item_id,)).fetchone()
                        if old is not None:
                            db.execute("DELETE FROM images WHERE row = ?", (old[0],))
                        cursor = db.execute(
                            "INSERT INTO images (image_id, path, metadata, width, height, num_keypoints, model_id,"
                            " created_at, keypoints, descriptors, global_desc, scales) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            values,
                        )
                        db.execute("DELETE FROM thumbnails WHERE image_id = ?", (item_id,))
                        if record.thumbnail:
                            db.execute("INSERT INTO thumbnails VALUES (?, ?)", (item_id, bytes(record.thumbnail)))
                        db.execute("RELEASE item")
                    except (_ItemRejected, FeatureShapeError, sqlite3.IntegrityError) as exc:
                        db.execute("ROLLBACK TO item")
                        db.execute("RELEASE item")
                        failed.append(ItemFailure(item_id, str(exc)))
                        continue
                    # the item is in: only now bind the model/dims and record what faiss and memory must mirror
                    pending.update(binds)
                    if old is not None and added.pop(old[0], None) is None:
                        removed[old[0]] = old[1]
                    added[cursor.lastrowid] = _Added(cursor.lastrowid, doc, descriptors, global_desc)
                    succeeded.append(item_id)
                if added or removed:
                    for key, value in pending.items():
                        if value is not None:
                            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))
                    db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                with self._rw.write():
                    db.execute("COMMIT")
                    if added or removed:
                        self._apply(pending, added, removed)
        return BulkReport(succeeded=succeeded, failed=failed)

    def _validate(
        self, record: Any, pending: Mapping[str, Any]
    ) -> tuple[str, tuple[Any, ...], Doc, np.ndarray, np.ndarray, dict[str, Any]]:
        """Check one record against the index's (pending) model and dims with the rules both
        backends share (delf_es/index/records.py); raise _ItemRejected.

        Returns the row values, the in-memory doc, the arrays and the model/dims it binds."""
        problem = record_problem(record, model_id=pending["model_id"], local_dims=pending["local_dim"],
                                 global_dims=pending["global_dim"], index_name=f"embedded index {self.directory}")
        if problem:
            raise _ItemRejected(problem)
        image_id, features = record.image_id, record.features
        n = features.num_keypoints
        if n >= MAX_KEYPOINTS:
            raise _ItemRejected(f"{n} keypoints; at most {MAX_KEYPOINTS - 1} per image")
        metadata_json = json.dumps(dict(record.metadata), allow_nan=False)
        descriptors, global_desc = features.descriptors, features.global_desc
        local_dim = features.descriptor_dim if n else None
        global_dim = len(global_desc) or None
        binds = {
            "model_id": features.model_id,
            "local_dim": pending["local_dim"] or local_dim,
            "global_dim": pending["global_dim"] or global_dim,
        }
        width, height = features.image_size
        values = (
            image_id,
            record.path,
            metadata_json,
            int(width),
            int(height),
            n,
            features.model_id,
            record.created_at,
            blob(features.keypoints),
            blob(descriptors),
            blob(global_desc),
            blob(features.scales),
        )
        doc = Doc(image_id, json.loads(metadata_json), n)
        return image_id, values, doc, descriptors, global_desc, binds

    def _apply(self, pending: dict[str, Any], added: dict[int, _Added], removed: dict[int, int]) -> None:
        """Mirror a committed write in memory and faiss (exclusive lock held)."""
        self._model_id = pending["model_id"]
        self._local_dim = pending["local_dim"]
        self._global_dim = pending["global_dim"]
        self._generation += 1
        for row in removed:
            doc = self._docs.pop(row)
            self._globals.pop(row, None)
            if self._row_of.get(doc.image_id) == row:
                del self._row_of[doc.image_id]
        for item in added.values():
            self._docs[item.row] = item.doc
            self._row_of[item.doc.image_id] = item.row
            if len(item.global_desc):
                self._globals[item.row] = np.array(item.global_desc, np.float32)
        self._global_matrix = None
        try:
            self._update_index(added, removed)
        except Exception:  # faiss must never disagree with the committed database
            logger.exception("keypoint index update failed; rebuilding it from SQLite")
            try:
                self._rebuild_index()
            except Exception as exc:
                self._index = None
                self._broken = f"keypoint index rebuild failed: {exc}"
                raise IndexUnavailable(f"embedded index {self.directory}: {self._broken}") from exc

    def delete(self, image_ids: Iterable[str], refresh: bool = False) -> BulkReport:
        """Remove images; an unknown id is a failed item."""
        succeeded: list[str] = []
        failed: list[ItemFailure] = []
        with self._write_mutex:
            self._check_open()
            self._become_writer()
            db = self._db
            removed: dict[int, int] = {}
            with self._transaction("delete"):
                for image_id in image_ids:
                    old = db.execute(
                        "SELECT row, num_keypoints FROM images WHERE image_id = ?", (str(image_id),)
                    ).fetchone()
                    if old is None:
                        failed.append(ItemFailure(str(image_id), "not found"))
                        continue
                    db.execute("DELETE FROM images WHERE row = ?", (old[0],))
                    db.execute("DELETE FROM thumbnails WHERE image_id = ?", (str(image_id),))
                    removed[old[0]] = old[1]
                    succeeded.append(str(image_id))
                if removed:
                    db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                with self._rw.write():
                    db.execute("COMMIT")
                    if removed:
                        pending = {"model_id": self._model_id, "local_dim": self._local_dim, "global_dim": self._global_dim}
                        self._apply(pending, {}, removed)
        return BulkReport(succeeded=succeeded, failed=failed)

    def get(self, image_id: str) -> StoredImage:
        """The stored document of ``image_id``; :class:`ImageNotFound` if unknown."""
        with self._reading():
            row = self._reader().execute(
                "SELECT image_id, path, metadata, width, height, num_keypoints, model_id, created_at,"
                " (SELECT length(jpeg) FROM thumbnails t WHERE t.image_id = images.image_id)"
                " FROM images WHERE image_id = ?",
                (image_id,),
            ).fetchone()
        if row is None:
            raise ImageNotFound(image_id)
        image_id, path, metadata, width, height, num_keypoints, model_id, created_at, thumbnail = row
        return StoredImage(image_id, path, json.loads(metadata), width, height, num_keypoints, model_id, created_at,
                           thumbnail_bytes=int(thumbnail or 0))

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored thumbnail JPEG, None if stored without; :class:`ImageNotFound` if unknown."""
        with self._reading():
            if image_id not in self._row_of:
                raise ImageNotFound(image_id)
            row = self._reader().execute("SELECT jpeg FROM thumbnails WHERE image_id = ?", (image_id,)).fetchone()
        return bytes(row[0]) if row else None

    def thumbnail_bytes(self) -> int:
        """Bytes of all stored thumbnails."""
        with self._reading():
            return int(self._reader().execute("SELECT COALESCE(SUM(length(jpeg)), 0) FROM thumbnails").fetchone()[0])

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """The subset of ``image_ids`` that is indexed."""
        with self._reading():
            return {image_id for image_id in image_ids if image_id in self._row_of}

    def revisions(self, image_ids: Iterable[str]) -> dict[str, str]:
        """The current revision of each indexed id: its SQLite row, new at every write (a
        replaced image gets a new row; rows are never reused)."""
        with self._reading():
            return {i: str(self._row_of[i]) for i in image_ids if i in self._row_of}

    def count(self) -> int:
        """Number of indexed images."""
        with self._reading():
            return len(self._row_of)

    def keypoints(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint locations, (N, 2) float32 (x, y) px per image; unknown ids left out."""
        return {image_id: unblob(blob, 2) for image_id, blob in self._blobs("keypoints", image_ids)}

    def keypoint_scales(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint pyramid scales, (N,) float32 per image, rows in keypoint order; unknown
        ids and images indexed before scales were stored are left out."""
        return {image_id: unblob(blob, 1).reshape(-1) for image_id, blob in self._blobs("scales", image_ids)
                if blob is not None}

    def global_descriptors(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored (G,) float32 global descriptors; unknown ids and images without one left out."""
        with self._reading():
            rows = {image_id: self._row_of[image_id] for image_id in map(str, image_ids) if image_id in self._row_of}
            return {image_id: self._globals[row].copy() for image_id, row in rows.items() if row in self._globals}

    def descriptor_codes(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored descriptors as (N, D) int8 codes (as the Elasticsearch backend stores them, so
        both backends match alike); unknown ids left out."""
        return {image_id: int8_codes(unblob(blob, self._local_dim or 0))
                for image_id, blob in self._blobs("descriptors", image_ids)}

    def _matching_rows(
        self, metadata_filter: MetadataFilter | None, image_ids: Iterable[str] | None = None
    ) -> list[int] | None:
        """Rows of the images passing the filter and among ``image_ids``; None when unrestricted."""
        predicate = compile_filter(metadata_filter)  # validates the filter even on an empty index
        if metadata_filter is None and image_ids is None:
            return None
        if image_ids is None:
            candidates: Iterable[int] = self._docs
        else:
            candidates = sorted({self._row_of[i] for i in map(str, image_ids) if i in self._row_of})
        return [row for row in candidates if predicate(self._docs[row].metadata)]

    def has_keypoint_vectors(self) -> bool:
        """Whether the keypoint kNN works (the directory's ``keypoint_vectors``)."""
        return self._keypoint_vectors

    def knn(
        self,
        descriptors: np.ndarray,
        k: int,
        metadata_filter: MetadataFilter | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> Neighbours:
        """The ``k`` nearest stored keypoints of each query descriptor.

        Raises :class:`KeypointVectorsDisabled` on an index created without keypoint vectors.

        Args:
            descriptors: (Q, D) float32 unit rows.
            k: neighbours per query (fewer when fewer keypoints match).
            metadata_filter: only images matching this query may appear.
            image_ids: only these images may appear (unknown ids are ignored); None = all.

        Returns:
            Neighbours grouped by query (ascending), best first within a query.
        """
        queries = self._check_query(descriptors, k)
        if not self._keypoint_vectors:
            raise KeypointVectorsDisabled(
                f"embedded index {self.directory} was created without keypoint vectors (keypoint_vectors=false): "
                "no keypoint kNN; search with shortlist_mode='global' and correspondences='matching'")
        with self._reading():
            selected = self._matching_rows(metadata_filter, image_ids)
            index = self._index
            if index is None or index.ntotal == 0 or len(queries) == 0:
                return Neighbours.empty()
            if queries.shape[1] != self._local_dim:
                raise FeatureShapeError("descriptors", f"(Q, {self._local_dim})", str(queries.shape))
            if selected is None or len(selected) == len(self._docs):
                similarity, labels = self._search_all(queries, k)
            else:
                rows = np.array([r for r in selected if self._docs[r].num_keypoints], np.int64)
                if len(rows) == 0:
                    return Neighbours.empty()
                counts = np.array([self._docs[r].num_keypoints for r in rows], np.int64)
                if isinstance(index, faiss.IndexIVF) and (self.exact_limit is None or counts.sum() > self.exact_limit):
                    similarity, labels = self._search_ivf_subset(queries, k, rows, counts)
                else:
                    similarity, labels = self._search_exact_subset(queries, k, rows, counts)
            return self._neighbours(similarity, labels)

    def _check_query(self, descriptors: np.ndarray, k: int) -> np.ndarray:
        check_k(k)
        return check_descriptors(descriptors)

    def global_knn(
        self, vector: np.ndarray, k: int, metadata_filter: MetadataFilter | None = None
    ) -> list[GlobalHit]:
        """Images whose global descriptor is nearest to (G,) ``vector``: (image_id, cosine), best first.

        Exact (a matrix product); images without a global descriptor never appear.
        """
        k = check_k(k)
        check_vector(vector)
        with self._reading():
            selected = self._matching_rows(metadata_filter)
            if not self._globals:
                return []
            check_vector(vector, self._global_dim)
            rows, matrix = self._global_stack()
            if selected is not None:
                keep = np.isin(rows, np.array(selected, np.int64))
                rows, matrix = rows[keep], matrix[keep]
            if len(rows) == 0:
                return []
            scores = matrix @ vector.astype(np.float32)
            order = np.argsort(-scores, kind="stable")[:k]
            return [GlobalHit(self._docs[int(rows[i])].image_id, float(np.clip(scores[i], -1.0, 1.0))) for i in order]

    def _global_stack(self) -> tuple[np.ndarray, np.ndarray]:
        stacked = self._global_matrix
        if stacked is None:  # rebuilt lazily after a write; concurrent readers may both build it
            rows = np.array(sorted(self._globals), np.int64)
            matrix = np.stack([self._globals[int(r)] for r in rows]).astype(np.float32)
            stacked = self._global_matrix = (rows, matrix)
        return stacked

    def refresh(self) -> None:
        """Writes are searchable as soon as they return; this also checkpoints the keypoint
        index to disk so the next open skips the rebuild."""
        if not self._writer.held:
            self._catch_up()  # a reader: see what the writer committed
            return
        with self._write_mutex:
            with self._reading():
                self._write_snapshot()

    def close(self) -> None:
        """Checkpoint the keypoint index and release the directory.  Idempotent."""
        with self._write_mutex:
            with self._rw.write():
                if self._closed:
                    return
                try:
                    self._checkpoint_if_free()
                    self._write_snapshot()
                finally:
                    self._closed = True
                    with self._connections_lock:
                        for conn in self._read_connections:
                            with contextlib.suppress(sqlite3.Error):
                                conn.close()
                        self._read_connections.clear()
                    self._release_directory()
                    self._index = None

    def __enter__(self) -> "EmbeddedBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._docs)} images"
        return f"EmbeddedBackend({str(self.directory)!r}, model_id={self._model_id!r}, {state})"
