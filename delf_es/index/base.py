"""What every index backend does, and the records it stores and returns.

Both backends (``elasticsearch.py``, ``embedded.py``) implement :class:`Backend` with
the same semantics, checked by one contract test suite run against each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, runtime_checkable

import numpy as np

from delf_es.errors import ItemFailure
from delf_es.types import Features


@dataclass(frozen=True)
class ImageRecord:
    """One image as written to the index.

    Attributes:
        image_id: unique id; writing the same id again replaces the image (never duplicates).
        path: file path, URL or custom name given at add time.
        metadata: JSON-able mapping; string values are keyword fields, numbers numeric.
        features: extracted local + global features (model_id, keypoints, descriptors...).
        created_at: ISO-8601 UTC timestamp of the write.
        thumbnail: small JPEG (:mod:`delf_es.thumbnails`) stored with the image, or None.
    """

    image_id: str
    path: str
    metadata: Mapping[str, Any]
    features: Features
    created_at: str
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class StoredImage:
    """An indexed image without its descriptors (what ``get`` returns).

    Attributes:
        width, height: original image size, px.
        num_keypoints: keypoints stored for it.
        model_id, pca_id: what produced its features.
        thumbnail_bytes: size of the stored thumbnail, 0 when there is none.
    """

    image_id: str
    path: str
    metadata: dict[str, Any]
    width: int
    height: int
    num_keypoints: int
    model_id: str
    created_at: str
    thumbnail_bytes: int = 0


@dataclass(frozen=True)
class Neighbours:
    """Approximate nearest database keypoints of a batch of query descriptors.

    Row ``r`` says: query descriptor ``query_index[r]`` is near keypoint
    ``keypoint_index[r]`` of image ``image_ids[r]`` with cosine ``similarity[r]``.

    Attributes:
        query_index: (M,) int64, index into the query's descriptors.
        image_ids: (M,) object array of str.
        keypoint_index: (M,) int64, index into that image's stored keypoints.
        similarity: (M,) float32, dot product of unit descriptors, in [-1, 1].
    """

    query_index: np.ndarray
    image_ids: np.ndarray
    keypoint_index: np.ndarray
    similarity: np.ndarray

    @classmethod
    def empty(cls) -> "Neighbours":
        return cls(
            np.zeros(0, np.int64), np.zeros(0, dtype=object), np.zeros(0, np.int64), np.zeros(0, np.float32)
        )

    def __len__(self) -> int:
        return int(len(self.query_index))


class GlobalHit(NamedTuple):
    """An image whose global descriptor is near the query's: ``similarity`` is the cosine in
    [-1, 1].  A named tuple, so ``for image_id, similarity in hits`` keeps working."""

    image_id: str
    similarity: float


@dataclass(frozen=True)
class BulkReport:
    """Outcome of a bulk write: ids written and each failed item with its error."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[ItemFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


#: An Elasticsearch query on metadata, e.g. {"term": {"metadata.source": "flickr"}}; the
#: embedded backend supports the subset term / terms / range / bool(filter, must, must_not).
MetadataFilter = Mapping[str, Any]


@runtime_checkable
class Backend(Protocol):
    """An index of image features.  All methods raise :class:`~delf_es.errors.IndexUnavailable`
    when the store cannot be reached, never hang past the configured timeout."""

    def upsert(self, records: Iterable[ImageRecord], refresh: bool = False) -> BulkReport:
        """Write images (replacing any with the same id, keypoints and image document together)."""
        ...

    def delete(self, image_ids: Iterable[str], refresh: bool = False) -> BulkReport:
        """Remove images; an unknown id is a failed item, not an exception."""
        ...

    def get(self, image_id: str) -> StoredImage:
        """Raises :class:`~delf_es.errors.ImageNotFound` for an unknown id."""
        ...

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """The subset of ``image_ids`` that is indexed."""
        ...

    def count(self) -> int:
        """Number of indexed images."""
        ...

    def knn(
        self,
        descriptors: np.ndarray,
        k: int,
        metadata_filter: MetadataFilter | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> Neighbours:
        """Approximate k nearest database keypoints of each query descriptor, (Q, D) float32 unit rows.

        ``image_ids`` restricts the search to those images (used to get correspondences
        for images shortlisted by the global descriptor); ``None`` means all images.
        """
        ...

    def global_knn(
        self, vector: np.ndarray, k: int, metadata_filter: MetadataFilter | None = None
    ) -> list[GlobalHit]:
        """Images whose global descriptor is nearest to (G,) ``vector``, best first."""
        ...

    def has_keypoint_vectors(self) -> bool:
        """Whether the index holds keypoint vectors, i.e. :meth:`knn` works (the ``keypoint_vectors``
        setting the index was created with; otherwise ``knn`` raises
        :class:`~delf_es.errors.KeypointVectorsDisabled`)."""
        ...

    def revisions(self, image_ids: Iterable[str]) -> dict[str, str]:
        """A token per indexed id that changes at every write of that image (missing ids left
        out); search caches are keyed by it, so a cached entry of another write is a miss."""
        ...

    def keypoints(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint locations, (N, 2) float32 px per image (missing ids are left out)."""
        ...

    def keypoint_scales(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint pyramid scales, (N,) float32 per image in keypoint order (missing ids and
        images stored without scales are left out)."""
        ...

    def global_descriptors(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored (G,) float32 unit global descriptors per image (missing ids are left out)."""
        ...

    def descriptor_codes(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored descriptors as (N, D) int8 codes (:func:`~delf_es.index.codes.int8_codes`) per
        image, rows in keypoint order (missing ids are left out)."""
        ...

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored thumbnail JPEG, None if stored without; :class:`~delf_es.errors.ImageNotFound` if unknown."""
        ...

    def thumbnail_bytes(self) -> int:
        """Bytes of all stored thumbnails."""
        ...

    def refresh(self) -> None:
        """Make all writes visible to search."""
        ...

    def close(self) -> None:
        ...
