"""The embedded index's keypoint search: a faiss index (exact flat, or IVF above ``exact_limit``:
structure.py chooses the layout by size)
mirroring the descriptors in SQLite, its on-disk snapshot, and the filtered searches.  Mixed into
:class:`~delf_es.index.embedded.backend.EmbeddedBackend`.

faiss ids encode ``(row << KEYPOINT_BITS) | keypoint_index``, where ``row`` is the image's SQLite
rowid (never reused: replacing an image gets a new row).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from delf_es.index.base import Neighbours
from delf_es.index.embedded.storage import SQL_CHUNK, descriptor_chunks, unblob
from delf_es.index.embedded.structure import (TRAIN_POINTS_PER_LIST, KeypointStructure, choose_structure,
                                              new_index, search_parameters, structure_of, training_picks)

logger = logging.getLogger(__name__)

#: faiss id = (row << KEYPOINT_BITS) | keypoint index, so an image holds < 2**24 keypoints.
KEYPOINT_BITS = 24
MAX_KEYPOINTS = 1 << KEYPOINT_BITS
_SNAPSHOT_RE = re.compile(r"^keypoints\.(\d+)\.faiss$")
#: auto nprobe = max(AUTO_NPROBE_MIN, AUTO_NPROBE_FACTOR * nlist ** AUTO_NPROBE_POWER) (see auto_nprobe)
AUTO_NPROBE_FACTOR = 0.14
AUTO_NPROBE_POWER = 0.7
AUTO_NPROBE_MIN = 16
#: the factor for SQ8 codes: their rounding swaps near-tied neighbours, so reaching the same recall
#: takes ~1.35x the lists (1M vectors, 4000 lists: 0.956 at nprobe 64 with SQ8, Flat 0.955 at ~47)
AUTO_NPROBE_SQ8_FACTOR = 0.19
#: vectors read from SQLite and added per chunk by a rebuild (160 MB of float32 at D = 40)
REBUILD_CHUNK_VECTORS = 1_000_000


def keypoint_ids(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """faiss ids of every keypoint of ``rows`` (with ``counts`` keypoints each), (sum(counts),) int64."""
    rows = np.asarray(rows, np.int64)
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(rows << KEYPOINT_BITS, counts) + (np.arange(total, dtype=np.int64) - starts)


def auto_nprobe(nlist: int, sq8: bool = False) -> int:
    """IVF lists to visit when ``nprobe`` is unset: ``AUTO_NPROBE_FACTOR`` nlist^``AUTO_NPROBE_POWER``
    (``AUTO_NPROBE_SQ8_FACTOR`` for SQ8 codes), at least ``AUTO_NPROBE_MIN``.  A fixed nprobe loses
    recall as the index grows (recall@10 with 16 lists: 0.90 at 250 images, 0.86 at 1000, 0.80 at
    3000 and 10,000); the nprobe that reaches 0.95 on real features grew as nlist^0.7 (27 at nlist
    2000, ~42 at 4000, ~62 at 6928: 0.13 nlist^0.7, benchmarks/results/embedded_recall.json), so the
    rule is that with a margin; SQ8 needs ~1.35x more (benchmarks/results/embedded_structure.json),
    and how it holds at 10,000-100,000 images is in benchmarks/results/scale_embedded.json
    (docs/scale.md).  The vectors scanned per query still grow slower than the index (~n^0.85)."""
    factor = AUTO_NPROBE_SQ8_FACTOR if sq8 else AUTO_NPROBE_FACTOR
    return max(AUTO_NPROBE_MIN, math.ceil(factor * nlist**AUTO_NPROBE_POWER))


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class KeypointIndex:
    """faiss handling of the embedded backend (a mixin: the backend's state)."""

    def _snapshot_path(self, generation: int) -> Path:
        return self.directory / f"keypoints.{generation}.faiss"

    def _expected_vectors(self) -> int:
        return sum(doc.num_keypoints for doc in self._docs.values())

    def _load_snapshot(self) -> Any:
        path = self._snapshot_path(self._generation)
        if not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            logger.warning("ignoring unreadable keypoint snapshot %s: %s", path, exc)
            return None
        if index.ntotal != self._expected_vectors() or index.d != self._local_dim:
            logger.warning("ignoring keypoint snapshot %s: it does not match the database", path)
            return None
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = self._nprobe_for(index.nlist, structure_of(index).sq8)
            self._ivf_trained_on = index.ntotal
        self._snapshot_generation = self._generation
        logger.info("loaded keypoint index %s (%d vectors)", path.name, index.ntotal)
        return index

    def _remove_stale_snapshots(self) -> None:
        for path in self.directory.iterdir():
            match = _SNAPSHOT_RE.match(path.name)
            stale = match is not None and int(match.group(1)) != self._snapshot_generation
            if stale or path.name.endswith(".faiss.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _rebuild_index(self, chunk_vectors: int = REBUILD_CHUNK_VECTORS) -> None:
        """Build the keypoint index from the descriptors stored in SQLite (exclusive lock held).

        The structure is chosen by the number of vectors (:func:`choose_structure`); an IVF is
        trained on :func:`training_picks` read from a sample of images, then every image is read
        and added ``chunk_vectors`` at a time, so memory holds the index plus one chunk (the old
        index is dropped first), never the whole float32 matrix."""
        self._index = None
        self._ivf_trained_on = 0
        if not self._keypoint_vectors or self._local_dim is None:
            return
        rows = np.array(sorted(row for row, doc in self._docs.items() if doc.num_keypoints), np.int64)
        counts = np.array([self._docs[int(row)].num_keypoints for row in rows], np.int64)
        total = int(counts.sum())
        structure = choose_structure(total, self.exact_limit, sq8_from=self.sq8_from, hnsw_from=self.hnsw_from)
        index = new_index(structure, self._local_dim)
        if structure.nlist:
            picked, positions = training_picks(counts, TRAIN_POINTS_PER_LIST * structure.nlist)
            sample = self._read_descriptors(rows[picked], positions)
            index.train(sample)
            del sample
            index.nprobe = self._nprobe_for(structure.nlist, structure.sq8)
            self._ivf_trained_on = total
        for chunk in descriptor_chunks(self._db, self._local_dim, chunk_vectors):
            index.add_with_ids(chunk.vectors, keypoint_ids(chunk.rows, chunk.counts))
        if index.ntotal != total:
            raise RuntimeError(f"keypoint index rebuilt with {index.ntotal} vectors, the database has {total}")
        self._index = index
        logger.info("rebuilt keypoint index from SQLite: %s, %d vectors", structure.factory, index.ntotal)

    def _read_descriptors(self, rows: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
        """The descriptors at ``positions`` (one array of keypoint positions per row) of ``rows``,
        stacked in that order: (sum of positions, D) float32, read from SQLite."""
        wanted = dict(zip(rows.tolist(), positions))
        blocks: dict[int, np.ndarray] = {}
        row_list = list(wanted)
        for start in range(0, len(row_list), SQL_CHUNK):
            chunk = row_list[start : start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row, data in self._db.execute(f"SELECT row, descriptors FROM images WHERE row IN ({marks})", chunk):
                blocks[row] = unblob(data, self._local_dim)[wanted[row]]
        return np.ascontiguousarray(np.concatenate([blocks[row] for row in row_list]), np.float32)

    def _nprobe_for(self, nlist: int, sq8: bool = False) -> int:
        """The backend's ``nprobe``, or :func:`auto_nprobe` of ``nlist`` (and codes) when it is None."""
        return self.nprobe if self.nprobe is not None else auto_nprobe(nlist, sq8)

    def _new_flat(self) -> Any:
        return new_index(KeypointStructure(), self._local_dim)

    def _update_index(self, added: dict[int, Any], removed: dict[int, int]) -> None:
        """Mirror added rows (``_Added``: row, doc, descriptors) and removed rows (row -> keypoints) in faiss."""
        if not self._keypoint_vectors:
            return
        if self._index is None and self._local_dim is not None:
            self._index = self._new_flat()
        gone = {row: count for row, count in removed.items() if count}
        if gone:
            ids = keypoint_ids(np.fromiter(gone, np.int64), np.fromiter(gone.values(), np.int64))
            if self._index.remove_ids(ids) != len(ids):
                raise RuntimeError("keypoint index out of step with the database")
        fresh = [item for item in added.values() if item.doc.num_keypoints]
        if fresh:
            vectors = np.concatenate([item.descriptors for item in fresh]).astype(np.float32, copy=False)
            ids = keypoint_ids(
                np.array([item.row for item in fresh]), np.array([item.doc.num_keypoints for item in fresh])
            )
            self._index.add_with_ids(np.ascontiguousarray(vectors), ids)
        if self._index is not None and self._needs_rebuild(self._index.ntotal):
            self._rebuild_index()

    def _needs_rebuild(self, n: int) -> bool:
        """True when ``n`` vectors call for the other structure, or an IVF outgrew its training.

        Flat -> IVF above ``exact_limit``; IVF -> flat at half of it (hysteresis); IVF is
        retrained once it holds 4x the vectors it was trained on (nlist grows 2x)."""
        if isinstance(self._index, faiss.IndexIVF):
            return self.exact_limit is None or n <= self.exact_limit // 2 or n > 4 * self._ivf_trained_on
        return self.exact_limit is not None and n > self.exact_limit

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._index
        k = min(k, index.ntotal)
        similarity, labels = index.search(queries, k, params=search_parameters(index))
        if isinstance(index, faiss.IndexIVF):  # a query whose probed lists were short: scan every list
            short = np.flatnonzero((labels < 0).any(axis=1))
            if len(short):
                params = search_parameters(index, index.nlist)
                similarity[short], labels[short] = index.search(queries[short], k, params=params)
        return similarity, labels

    def _search_ivf_subset(
        self, queries: np.ndarray, k: int, rows: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF search over-fetching 2 k / (matching fraction) neighbours, filtered here.

        Measured 7x faster than a faiss ``IDSelectorBatch`` (whose bloom prefilter hashes
        the low id bits, i.e. the keypoint index, so every probe hits its hash set).
        Queries left with fewer than ``k`` allowed results are searched exactly over
        the matching images, so results are never fewer than exist.
        """
        index = self._index
        selected = int(counts.sum())
        k = min(k, selected)
        fetch = min(index.ntotal, math.ceil(2 * k * index.ntotal / selected))
        found_similarity, found_labels = index.search(queries, fetch, params=search_parameters(index))
        allowed = np.zeros(int(rows.max()) + 1, bool)
        allowed[rows] = True
        found_rows = found_labels >> KEYPOINT_BITS
        keep = (found_labels >= 0) & allowed[np.clip(found_rows, 0, len(allowed) - 1)] & (found_rows < len(allowed))
        rank = np.cumsum(keep, axis=1)  # faiss sorts each query's results best first
        take = keep & (rank <= k)
        similarity = np.full((len(queries), k), -np.inf, np.float32)
        labels = np.full((len(queries), k), -1, np.int64)
        query, column = np.nonzero(take)
        similarity[query, rank[take] - 1] = found_similarity[query, column]
        labels[query, rank[take] - 1] = found_labels[query, column]
        short = np.flatnonzero(take.sum(axis=1) < k)
        if len(short):
            similarity[short], labels[short] = self._search_exact_subset(queries[short], k, rows, counts)
        return similarity, labels

    def _search_exact_subset(
        self, queries: np.ndarray, k: int, rows: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the descriptors of ``rows``, read from SQLite."""
        conn = self._reader()
        blocks: dict[int, np.ndarray] = {}
        row_list = rows.tolist()
        for start in range(0, len(row_list), SQL_CHUNK):
            chunk = row_list[start : start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row, blob in conn.execute(f"SELECT row, descriptors FROM images WHERE row IN ({marks})", chunk):
                blocks[row] = unblob(blob, self._local_dim)
        vectors = np.ascontiguousarray(np.concatenate([blocks[row] for row in row_list]))
        ids = keypoint_ids(rows, counts)
        similarity, positions = faiss.knn(queries, vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        return similarity, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def _neighbours(self, similarity: np.ndarray, labels: np.ndarray) -> Neighbours:
        valid = labels >= 0
        query_index = np.nonzero(valid)[0].astype(np.int64)
        found = labels[valid].astype(np.int64)
        rows = found >> KEYPOINT_BITS
        unique_rows, inverse = np.unique(rows, return_inverse=True)
        names = np.array([self._docs[int(r)].image_id for r in unique_rows], dtype=object)
        return Neighbours(
            query_index=query_index,
            image_ids=names[inverse] if len(found) else np.zeros(0, dtype=object),
            keypoint_index=found & (MAX_KEYPOINTS - 1),
            similarity=np.clip(similarity[valid], -1.0, 1.0).astype(np.float32),
        )

    def _write_snapshot(self) -> None:
        if self._snapshot_generation == self._generation or self._index is None or not self._writer.held:
            return  # only the writer writes snapshots
        generation = self._generation
        final = self._snapshot_path(generation)
        temporary = final.with_name(final.name + ".tmp")
        faiss.write_index(self._index, str(temporary))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        _fsync_directory(self.directory)
        self._snapshot_generation = generation
        self._remove_stale_snapshots()
        logger.info("checkpointed keypoint index to %s", final.name)
