"""Searches: keypoint kNN (one ``_msearch`` of kNN searches per batch of query descriptors) and
global kNN, with the generation check that hides keypoints of versions not (or no longer) live.

One document per keypoint was measured 4x cheaper per query descriptor than nested vectors in the
image document (``benchmarks/es_layout.py``), and it has no cliff on a live index.  The
``metadata`` copy on each keypoint makes the metadata filter a kNN pre-filter (correct ``k``
results among the allowed images); the ``image_ids`` restriction is a ``terms`` pre-filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from delf_es.errors import KeypointVectorsDisabled, UnsupportedFilter
from delf_es.index.base import GlobalHit, MetadataFilter, Neighbours
from delf_es.index.codes import int8_codes
from delf_es.index.es.codec import byte_vector, float_vector
from delf_es.index.es.templates import Aliases, paired_images_index
from delf_es.index.es.transport import Transport
from delf_es.index.records import check_descriptors, check_k, check_vector

#: ``num_candidates`` multiplier for a kNN restricted to ``image_ids``: HNSW search under a
#: selective filter loses recall (0.81 -> 0.99 at 100 of 300 images for x10, ~2 ms per descriptor).
RESTRICTED_CANDIDATES_FACTOR = 10
#: Elasticsearch's caps on kNN ``k`` / ``num_candidates``.
MAX_KNN = 10_000
#: Image ids per generation-check search.
CHECK_CHUNK = 5_000


@dataclass(frozen=True)
class KeypointHit:
    """One keypoint document a kNN search returned.

    Attributes:
        query: index of the query descriptor.
        similarity: cosine in [-1, 1] (Elasticsearch's score ``(1 + cos) / 2`` mapped back).
        keypoint: index into the image's stored keypoints.
        generation: the version of the image the keypoint belongs to.
        index: the concrete keypoints index it came from (its paired images index holds the
            generation to check it against).
    """

    query: int
    similarity: float
    image_id: str
    keypoint: int
    generation: int
    index: str


def metadata_filters(metadata_filter: MetadataFilter | None, image_ids: list[str] | None) -> list[Any]:
    filters: list[Any] = []
    if metadata_filter is not None:
        if not isinstance(metadata_filter, Mapping):
            raise UnsupportedFilter(f"a metadata filter is an Elasticsearch query object, got {metadata_filter!r}")
        filters.append(dict(metadata_filter))
    if image_ids is not None:
        filters.append({"terms": {"image_id": image_ids}})
    return filters


class Queries:
    """kNN searches on the indices behind ``aliases``: ``num_candidates`` HNSW candidates per
    keypoint search, ``global_num_candidates`` per global one (a single search per query, so it
    can afford more; None = ``num_candidates``)."""

    def __init__(self, transport: Transport, aliases: Aliases, num_candidates: int,
                 global_num_candidates: int | None = None) -> None:
        self.transport = transport
        self.aliases = aliases
        self.num_candidates = num_candidates
        self.global_num_candidates = num_candidates if global_num_candidates is None else global_num_candidates

    def knn(
        self,
        descriptors: np.ndarray,
        k: int,
        metadata_filter: MetadataFilter | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> Neighbours:
        """The ``k`` (at most 10 000) nearest live keypoints of each (Q, D) unit query row, grouped
        by query (ascending), best first within a query."""
        k = check_k(k)
        check_descriptors(descriptors)
        restrict = None if image_ids is None else list(dict.fromkeys(str(i) for i in image_ids))
        filters = metadata_filters(metadata_filter, restrict)
        indices = self.aliases.current()
        if indices is None:
            return Neighbours.empty()
        if not indices.keypoint_vectors:
            raise KeypointVectorsDisabled(
                f"index {indices.images} was created without keypoint vectors (keypoint_vectors=false): no keypoint "
                "kNN; search with shortlist_mode='global' and correspondences='matching'")
        check_descriptors(descriptors, indices.local_dims)
        if len(descriptors) == 0 or restrict == []:
            return Neighbours.empty()
        size = min(k, MAX_KNN)
        candidates = self.num_candidates * (RESTRICTED_CANDIDATES_FACTOR if restrict is not None else 1)
        search: dict[str, Any] = {"field": "vector", "k": size, "num_candidates": min(max(candidates, size), MAX_KNN)}
        if filters:
            search["filter"] = filters
        bodies = [
            {"knn": {**search, "query_vector": byte_vector(row)}, "_source": False, "stored_fields": "_none_",
             "size": size, "docvalue_fields": ["image_id", "keypoint", "generation"]}
            for row in int8_codes(descriptors)
        ]
        responses = self.transport.msearch(
            self.aliases.keypoints, bodies,
            ["responses.hits.hits._index", "responses.hits.hits._score", "responses.hits.hits.fields"],
        )
        hits = [
            KeypointHit(q, 2.0 * hit["_score"] - 1.0, hit["fields"]["image_id"][0], int(hit["fields"]["keypoint"][0]),
                        int(hit["fields"]["generation"][0]), hit.get("_index", ""))
            for q, response in enumerate(responses)
            for hit in response.get("hits", {}).get("hits", [])
        ]
        # Generations are read from the images index paired with the keypoints index a hit came
        # from: a search straddling an alias swap (reindex) checks old keypoints against old images.
        live: dict[tuple[str, str], int] = {}
        for source in {hit.index for hit in hits}:
            found = self.generations({hit.image_id for hit in hits if hit.index == source},
                                     paired_images_index(source, self.aliases.images))
            live.update({(source, image_id): generation for image_id, generation in found.items()})
        kept = [hit for hit in hits if live.get((hit.index, hit.image_id)) == hit.generation]
        if not kept:
            return Neighbours.empty()
        kept.sort(key=lambda hit: (hit.query, -hit.similarity, hit.image_id, hit.keypoint))
        return Neighbours(
            query_index=np.array([hit.query for hit in kept], np.int64),
            image_ids=np.array([hit.image_id for hit in kept], dtype=object),
            keypoint_index=np.array([hit.keypoint for hit in kept], np.int64),
            similarity=np.clip(np.array([hit.similarity for hit in kept], np.float32), -1.0, 1.0),
        )

    def generations(self, image_ids: set[str], index: str | None = None) -> dict[str, int]:
        """The live generation of each of ``image_ids`` that has an image document, as of the last
        refresh (the point in time kNN searched), read by ``terms`` searches of the images index
        (``index``, default the alias)."""
        wanted = sorted(image_ids)
        out: dict[str, int] = {}
        for start in range(0, len(wanted), CHECK_CHUNK):
            chunk = wanted[start : start + CHECK_CHUNK]
            body = {"query": {"terms": {"image_id": chunk}}, "size": len(chunk), "_source": False,
                    "stored_fields": "_none_", "docvalue_fields": ["image_id", "generation"]}
            (response,) = self.transport.msearch(index or self.aliases.images, [body], ["responses.hits.hits.fields"])
            for hit in response.get("hits", {}).get("hits", []):
                out[hit["fields"]["image_id"][0]] = int(hit["fields"].get("generation", [-1])[0])
        return out

    def global_knn(self, vector: np.ndarray, k: int, metadata_filter: MetadataFilter | None = None) -> list[GlobalHit]:
        """Images whose global descriptor is nearest to (G,) ``vector``, best first."""
        k = check_k(k)
        check_vector(vector)
        filters = metadata_filters(metadata_filter, None)
        indices = self.aliases.current()
        if indices is not None and indices.global_dims is None:  # no global vector yet when last read
            indices = self.aliases.load()
        if indices is None or indices.global_dims is None:
            return []
        check_vector(vector, indices.global_dims)
        size = min(k, MAX_KNN)
        search: dict[str, Any] = {"field": "global_vector", "query_vector": float_vector(vector), "k": size,
                                  "num_candidates": min(max(self.global_num_candidates, size), MAX_KNN)}
        if filters:
            search["filter"] = filters
        if indices.quantised_global:  # re-score the int8 candidates with the float vectors: exact cosines
            search["rescore_vector"] = {"oversample": 2.0}
        (response,) = self.transport.msearch(
            self.aliases.images,
            [{"knn": search, "_source": False, "stored_fields": "_none_", "docvalue_fields": ["image_id"], "size": size}],
            ["responses.hits.hits.fields.image_id", "responses.hits.hits._score"],
        )
        return [
            GlobalHit(hit["fields"]["image_id"][0], float(np.clip(2.0 * hit["_score"] - 1.0, -1.0, 1.0)))
            for hit in response.get("hits", {}).get("hits", [])
        ]
