"""The Elasticsearch backend: one document per image plus one document per keypoint.

    backend = ElasticsearchBackend(Settings(es_url="http://127.0.0.1:9200"), model_id=extractor.model_id)
    report = backend.upsert(records, refresh=True)   # BulkReport: per-item failures
    hits = backend.knn(query.descriptors, k=10)       # Neighbours, via _msearch
    backend.close()

Layout (chosen by ``benchmarks/es_layout.py``; numbers in ``benchmarks/results/es_layout.json``):

* the **images index** (template ``mappings/images-v1.json``, alias ``settings.index_alias``):
  one document per image with its path, metadata, size, model, global descriptor
  (``global_vector``), keypoint geometry as packed float32 arrays (``keypoint_xy`` ...), and
  ``generation`` / ``slot`` naming its live keypoints;
* the **keypoints index** (``mappings/keypoints-v1.json``, alias ``<alias>-keypoints``): one
  document per keypoint (``image_id``, ``keypoint`` index, ``generation``, a copy of the image's
  ``metadata``, ``vector`` as int8 codes: 40 bytes per 40-d descriptor instead of 160).

This module only composes the parts, one concern each: ``transport`` (the client, typed errors,
retries), ``templates`` (templates, aliases), ``codec`` (ids, vectors), ``writes`` (the two-slot
commit, sweep, delete) and ``queries`` (kNN).

Elasticsearch build notes (the integ-test-zip that ``delf-es services`` installs): no painless,
reindex, ``_delete_by_query``, ingest processors, ``constant_keyword`` or parent-join; ``GET /``
answers 405, so the client's ``info()``/``ping()`` fail (use ``cluster.health``); dense vectors
are left out of ``_source`` (``index.mapping.exclude_source_vectors``: a reindex must ask for them).
"""

from __future__ import annotations

import base64
from typing import Iterable

import numpy as np
from elasticsearch import Elasticsearch, NotFoundError

from delf_es.errors import ImageNotFound
from delf_es.index.base import BulkReport, GlobalHit, ImageRecord, MetadataFilter, Neighbours, StoredImage
from delf_es.index.es.bulk_load import BulkLoad
from delf_es.index.es.codec import BULKY_FIELDS, decode_float_vector, document_id, unpack, unpack_codes
from delf_es.index.es.queries import Queries
from delf_es.index.es.templates import Aliases
from delf_es.index.es.transport import MGET_CHUNK, Transport
from delf_es.index.es.writes import Writer
from delf_es.settings import Settings


class ElasticsearchBackend:
    """An image index on Elasticsearch (see the module docstring for the layout).

    Args:
        settings: ``es_url`` (required unless ``client`` is given), ``index_alias``,
            ``es_timeout`` (s per request), ``es_knn_num_candidates`` (keypoint kNN),
            ``es_global_knn_num_candidates`` (global kNN).
        model_id: the model whose features this index holds; records of another model are
            refused.  None: the model of the existing index, or of the first record written.
        client: an Elasticsearch client to use instead of one built from ``settings``
            (it is not closed by :meth:`close`).
    """

    def __init__(self, settings: Settings, model_id: str | None = None, client: Elasticsearch | None = None) -> None:
        self.settings = settings
        self.transport = Transport(settings, client=client)
        self.aliases = Aliases(self.transport, settings.index_alias, shards=settings.es_number_of_shards,
                               replicas=settings.es_number_of_replicas)
        self.alias = self.aliases.images
        self.keypoints_alias = self.aliases.keypoints
        self.model_id = model_id
        self.url = self.transport.url
        self.timeout = self.transport.timeout
        self.num_candidates = int(settings.es_knn_num_candidates)
        self._writer = Writer(self.transport, self.aliases, model_id, settings.index_keypoint_vectors())
        self._queries = Queries(self.transport, self.aliases, self.num_candidates,
                                int(settings.es_global_knn_num_candidates))

    # ------------------------------------------------------------------ writes

    def upsert(self, records: Iterable[ImageRecord], refresh: bool = False) -> BulkReport:
        """Write images, each replacing any image of the same id (all or nothing per image, as
        searches see it: the previous version stays whole until the new one is complete).

        Items are refused (failed, not raised) when :func:`~delf_es.index.records.record_problem`
        objects (another model_id, other dims, non-unit rows...) or Elasticsearch reports an error
        for the image or one of its keypoints; the previous version of a refused image is kept.
        Raises IndexUnavailable when the server cannot be reached or still answers 429 after the
        retries."""
        report = self._writer.upsert(records)
        if refresh and (report.succeeded or report.failed):
            self.refresh()
        return report

    def bulk_load(self) -> BulkLoad:
        """A context manager for a large load: refresh off, no replicas and
        ``settings.es_bulk_writers`` concurrent writers until it exits, then the indices' settings
        restored (also on error) and refreshed (:mod:`delf_es.index.es.bulk_load`).  Enter it
        after the first write: it changes nothing while the index does not exist."""
        return BulkLoad(self.transport, self.aliases, self._writer, self.settings.es_bulk_writers)

    def delete(self, image_ids: Iterable[str], refresh: bool = False) -> BulkReport:
        """Remove images (keypoints first, then the image document); an unknown id is a failed item."""
        report = self._writer.delete(image_ids)
        if refresh and (report.succeeded or report.failed):
            self.refresh()
        return report

    # ------------------------------------------------------------------ reads

    def get(self, image_id: str) -> StoredImage:
        """The stored document of ``image_id``; :class:`ImageNotFound` if unknown."""
        try:
            found = self.transport.call("get", self.transport.client.get, index=self.alias,
                                        id=document_id(image_id), source_excludes=BULKY_FIELDS)
        except NotFoundError:
            raise ImageNotFound(image_id) from None
        source = found["_source"]
        return StoredImage(
            image_id=source["image_id"],
            path=source["path"],
            metadata=source.get("metadata") or {},
            width=int(source["width"]),
            height=int(source["height"]),
            num_keypoints=int(source["num_keypoints"]),
            model_id=source["model_id"],
            created_at=source["created_at"],
            thumbnail_bytes=int(source.get("thumbnail_bytes") or 0),
        )

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored thumbnail JPEG, None if stored without; :class:`ImageNotFound` if unknown."""
        try:
            found = self.transport.call("get", self.transport.client.get, index=self.alias, id=document_id(image_id),
                                        source_includes=["thumbnail"])
        except NotFoundError:
            raise ImageNotFound(image_id) from None
        data = (found.get("_source") or {}).get("thumbnail")
        return base64.b64decode(data) if data else None

    def thumbnail_bytes(self) -> int:
        """Bytes of all stored thumbnails (a sum aggregation over ``thumbnail_bytes``)."""
        try:
            found = self.transport.call("stats", self.transport.client.search, index=self.alias, size=0,
                                        aggs={"thumbnails": {"sum": {"field": "thumbnail_bytes"}}})
        except NotFoundError:
            return 0
        return int((found.get("aggregations") or {}).get("thumbnails", {}).get("value") or 0)

    def _documents(self, image_ids: Iterable[str], fields: list[str]):
        wanted = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        return self.transport.mget(self.alias, [document_id(i) for i in wanted], ["image_id", *fields])

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """The subset of ``image_ids`` that is indexed."""
        return {doc["_source"]["image_id"] for doc in self._documents(image_ids, [])}

    def revisions(self, image_ids: Iterable[str]) -> dict[str, str]:
        """The current revision of each indexed id: its image document's random ``generation``
        (new at every write), read in real time with the locations' own ``mget``."""
        return {doc["_source"]["image_id"]: str(doc["_source"].get("generation", 0))
                for doc in self._documents(image_ids, ["generation"])}

    def count(self) -> int:
        """Number of indexed images."""
        try:
            return int(self.transport.call("count", self.transport.client.count, index=self.alias)["count"])
        except NotFoundError:
            return 0

    def keypoints(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint locations, (N, 2) float32 (x, y) px per image; unknown ids left out.
        One ``mget`` per 500 ids, reading only the packed locations."""
        return {doc["_source"]["image_id"]: unpack(doc["_source"].get("keypoint_xy"), 2)
                for doc in self._documents(image_ids, ["keypoint_xy"])}

    def keypoint_scales(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint pyramid scales, (N,) float32 per image; unknown ids left out (one ``mget``
        per 500 ids, reading only the packed scales)."""
        return {doc["_source"]["image_id"]: unpack(doc["_source"].get("keypoint_scale"), 1).reshape(-1)
                for doc in self._documents(image_ids, ["keypoint_scale"])}

    def global_descriptors(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored (G,) float32 global descriptors; unknown ids and images without one left out.
        Vectors are excluded from ``_source`` (index.mapping.exclude_source_vectors), so the
        ``mget`` asks for them back with ``_source_exclude_vectors=false``."""
        wanted = [document_id(i) for i in dict.fromkeys(str(image_id) for image_id in image_ids)]
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(wanted), MGET_CHUNK):
            try:
                found = self.transport.call(
                    "mget", self.transport.client.perform_request, "POST", f"/{self.alias}/_mget",
                    params={"_source_exclude_vectors": "false", "_source_includes": "image_id,global_vector"},
                    headers={"accept": "application/json", "content-type": "application/json"},
                    body={"ids": wanted[start : start + MGET_CHUNK]},
                )
            except NotFoundError:
                return out
            for doc in found["docs"]:
                vector = doc.get("_source", {}).get("global_vector") if doc.get("found") else None
                if vector is None:
                    continue
                out[doc["_source"]["image_id"]] = decode_float_vector(vector)
        return out

    def descriptor_codes(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored descriptors as (N, D) int8 codes (:func:`~delf_es.index.codes.int8_codes`) per
        image; unknown ids left out.  Read from the image documents (one ``mget`` per 500 ids),
        not from the keypoint documents: one document per image instead of N."""
        image_ids = list(image_ids)
        indices = self.aliases.current()
        if indices is None or not image_ids:
            return {}
        return {doc["_source"]["image_id"]: unpack_codes(doc["_source"].get("keypoint_codes"), indices.local_dims)
                for doc in self._documents(image_ids, ["keypoint_codes"])}

    # ------------------------------------------------------------------ search

    def has_keypoint_vectors(self) -> bool:
        """Whether :meth:`knn` works: the index's ``_meta.keypoint_vectors`` (an index without the
        key has them); before the first write, what the index will be created with."""
        indices = self.aliases.current()
        return indices.keypoint_vectors if indices is not None else self._writer.keypoint_vectors

    def knn(
        self,
        descriptors: np.ndarray,
        k: int,
        metadata_filter: MetadataFilter | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> Neighbours:
        """The ``k`` (at most 10 000) nearest stored keypoints of each query descriptor.

        Args:
            descriptors: (Q, D) float32 unit rows.
            k: neighbours per query (fewer when fewer keypoints are allowed).
            metadata_filter: an Elasticsearch query on ``metadata.*``; a pre-filter.
            image_ids: only these images (None: all).

        Returns:
            Neighbours grouped by query (ascending), best first within a query.

        Raises:
            KeypointVectorsDisabled: the index was created without keypoint vectors.
        """
        return self._queries.knn(descriptors, k, metadata_filter, image_ids)

    def global_knn(self, vector: np.ndarray, k: int, metadata_filter: MetadataFilter | None = None) -> list[GlobalHit]:
        """Images whose global descriptor is nearest to (G,) ``vector``: (image_id, cosine), best first."""
        return self._queries.global_knn(vector, k, metadata_filter)

    # ------------------------------------------------------------------ housekeeping

    def refresh(self) -> None:
        """Make all writes visible to search."""
        self.transport.call("refresh", self.transport.client.indices.refresh,
                            index=f"{self.alias},{self.keypoints_alias}", ignore_unavailable=True,
                            allow_no_indices=True)

    def close(self) -> None:
        """Close the client if this backend built it.  Idempotent."""
        self.transport.close()

    def __enter__(self) -> "ElasticsearchBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ElasticsearchBackend({self.url!r}, alias={self.alias!r}, model_id={self.model_id!r})"
