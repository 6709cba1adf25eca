"""Embedded index: in-process, on disk, no server.

Usage::

    backend = EmbeddedBackend(settings.data_dir / "index")
    backend.upsert(records)                      # BulkReport; writes are visible on return
    hits = backend.knn(query.descriptors, k=10)  # Neighbours
    backend.close()                              # checkpoints the faiss index

Storage layout of ``directory``:

* ``images.sqlite3`` (WAL mode): the source of truth.  Table ``images`` holds one row
  per image: id, path, metadata JSON, size, model_id, created_at and, as little-endian
  float32 blobs, the keypoint locations (N, 2), the local descriptors (N, D) and the
  global descriptor (G,).  Table ``meta`` holds the schema version, the index's
  model_id, D, G and ``generation``, a counter bumped in the same transaction as every
  write.
* ``keypoints.<generation>.faiss``: a snapshot of the keypoint index, written at
  :meth:`~EmbeddedBackend.refresh` / :meth:`~EmbeddedBackend.close` to a temp file,
  fsynced and renamed.  It is only a cache: on open it is used when its generation
  equals the database's and its vector count matches, otherwise the keypoint index
  is rebuilt from the descriptors in SQLite.  A crash anywhere (between the SQLite
  commit and the faiss update, or while writing the snapshot) therefore leaves at
  worst a stale or partial snapshot, which is ignored.
* ``LOCK``: the single-writer lock (:mod:`delf_es.index.writer_lock`): ``flock`` taken at the
  first write and held until close, with the holder's PID, command and start time written in
  it, so a second writer is refused with :class:`~delf_es.errors.IndexLocked` naming them.
  Readers never take it: any number of processes search, get and count while one writes.
  Each reader works on a snapshot: its in-memory state is loaded inside one SQLite read
  transaction (WAL gives it a consistent view while the writer commits), and before each read
  it compares the database's ``generation`` with its own and reloads when another process
  wrote (a faiss snapshot of that generation is used if the writer left one, else the keypoint
  index is rebuilt from SQLite: the price of a reader that outlives many writes).

Keypoint search: faiss ids encode ``(row << KEYPOINT_BITS) | keypoint_index``, where
``row`` is the image's SQLite rowid (never reused: replacing an image gets a new row).
Up to ``exact_limit`` vectors the index is an exact ``IndexIDMap(IndexFlatIP)``; above
it an IVF index (nlist = 4 sqrt(n), ``nprobe`` lists searched) trained on a sample of the stored
descriptors, because exact search over 1M keypoints costs ~6 s per 1000-query search on one core
against ~0.07 s for IVF at 0.98 recall (benchmarks/embedded_index.py).  The IVF's coarse quantizer
is an HNSW graph from 8192 lists and its vectors 8-bit codes (SQ8) from ``sq8_from`` vectors, so
100,000 images of 1000 keypoints fit in ~4.8 GB (:mod:`~delf_es.index.embedded.structure`); the
structure is chosen at each (re)build, and a rebuild streams the descriptors from SQLite in
chunks.  The IVF is retrained when it holds 4x the vectors it was trained on.
Filtered searches are exact over the matching images' keypoints (read from SQLite)
when those are at most ``exact_limit``; otherwise IVF over-fetches and filters, and a
query left with fewer than ``k`` allowed results is searched exactly over the subset.

Metadata filters: the Elasticsearch query subset described in :func:`compile_filter`.

Thread safety: one process.  Writers are serialised by a mutex; the SQLite commit and
the in-memory/faiss update happen under the exclusive side of a readers-writer lock,
searches under its shared side, so searches run in parallel and always see a state
where SQLite and faiss agree.
"""

from delf_es.index.embedded.backend import EmbeddedBackend
from delf_es.index.embedded.keypoint_index import KEYPOINT_BITS
from delf_es.index.embedded.storage import SCHEMA
from delf_es.index.filters import compile_filter

__all__ = ["EmbeddedBackend", "compile_filter", "KEYPOINT_BITS", "SCHEMA"]
