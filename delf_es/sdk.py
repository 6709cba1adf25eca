"""The public entry point, in the idiom of image-match's ``SignatureES`` so its users can switch.

    from delf_es import DelfEs
    engine = DelfEs()                                  # embedded index under ~/.local/share/delf-es
    engine.add_image("photos/eiffel.jpg", metadata={"city": "paris"})
    engine.search_image("query.jpg")                   # [{'id', 'path', 'score', 'dist', 'metadata', 'inliers', ...}]

With ``DELF_ES_ES_URL`` (and optionally ``DELF_ES_REDIS_URL``) set, the same calls go to
Elasticsearch (and cache keypoint locations in Redis).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from delf_es.cache import LocationCache, MemoryLocationCache, RedisLocationCache, codes_namespace
from delf_es.errors import BulkIndexFailed, ConfigurationError, DelfEsError, ImageNotFound, InvalidRequest, ItemFailure
from delf_es.imageio import LoadedImage, load_image, load_image_from_url
from delf_es.index.base import Backend, BulkReport, ImageRecord, MetadataFilter, StoredImage
from delf_es.index.writing import upsert_and_refresh_cache
from delf_es.items import MAX_ID_BYTES, check_count, check_filter, check_id, check_metadata, parse_item
from delf_es.search import Searcher
from delf_es.settings import Settings
from delf_es.types import Correspondences, Features, SearchHit

log = logging.getLogger(__name__)

__all__ = ["DelfEs", "MAX_ID_BYTES", "VerifiedMatch", "open_backend", "open_cache"]


def open_backend(settings: Settings, model_id: str | None = None) -> Backend:
    """Elasticsearch when ``es_url`` is set, else the embedded on-disk index."""
    if settings.es_url:
        from delf_es.index.es import ElasticsearchBackend

        return ElasticsearchBackend(settings, model_id=model_id)
    from delf_es.index.embedded import EmbeddedBackend

    return EmbeddedBackend(Path(settings.data_dir) / settings.index_alias, model_id=model_id)


def open_cache(settings: Settings) -> LocationCache:
    return RedisLocationCache(settings.redis_url) if settings.redis_url else MemoryLocationCache()


class DelfEs:
    """Add, search, get and delete images.  Build once and reuse: it holds the model."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backend: Backend | None = None,
        cache: LocationCache | None = None,
        extractor: Any = None,
    ) -> None:
        self.settings = settings or Settings()
        self._extractor = extractor
        self._backend = backend
        self.cache = cache or open_cache(self.settings)

    # ------------------------------------------------------------------ parts, built lazily

    @property
    def extractor(self):
        if self._extractor is None:
            from delf_es.features import Extractor

            self._extractor = Extractor(self.settings)
        return self._extractor

    @property
    def model_id(self) -> str:
        return self.extractor.model_id

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.settings, model_id=self.model_id)
        return self._backend

    def searcher(self) -> Searcher:
        return Searcher(self.backend, self.cache, self.settings, self.model_id)

    # ------------------------------------------------------------------ image-match API

    def add_image(
        self,
        path: str | bytes,
        img: str | bytes | None = None,
        bytestream: bool = False,
        metadata: Mapping[str, Any] | None = None,
        refresh_after: bool = False,
        wait: bool = True,
    ) -> str:
        """Index one image and return its id (the stored name); with ``wait=False``, queue it for
        the worker fleet (``delf_es/workers/``) and return the task id (follow it with :meth:`task_status`).

        Args:
            path: file path or http(s) URL of the image; with ``img`` given, the name it is
                stored under; with ``bytestream=True`` and no ``img``, the raw bytes.
            img: the image itself: a path/URL, or raw bytes when ``bytestream=True``.
            metadata: JSON-able mapping stored with the image and usable in ``pre_filter``.
            refresh_after: make the image searchable before returning.
            wait: False = hand the work to the workers (needs Redis; path/URL only, the workers
                must be able to read it).
        Re-adding an id replaces the image; it never duplicates.
        """
        if not wait:
            if bytestream or img is not None or not isinstance(path, (str, Path)):
                raise InvalidRequest("wait=False takes a path or URL the workers can read (no bytes, no img)")
            return self._submitter().submit_one(check_id(str(path)), check_metadata(metadata))
        name, image = self.load(path, img, bytestream)
        features = self.extractor.extract(image.pixels, image_id=name)
        return self.add_features(features, path=name, metadata=metadata, refresh_after=refresh_after)

    def add_features(
        self, features: Features, path: str | None = None, metadata: Mapping[str, Any] | None = None,
        refresh_after: bool = False,
    ) -> str:
        """Index precomputed features (their ``image_id`` is the id)."""
        record = ImageRecord(
            image_id=check_id(features.image_id),
            path=path or features.image_id,
            metadata=check_metadata(metadata),
            features=features,
            created_at=_now(),
        )
        report = upsert_and_refresh_cache(self.backend, self.cache, [record], refresh=refresh_after)
        if not report.ok:
            raise BulkIndexFailed(f"{record.image_id}: {report.failed[0].error}", report.failed)
        return record.image_id

    def add_features_bulk(
        self, items: Iterable[tuple[Features, str, Mapping[str, Any] | None]], batch_size: int = 32,
        refresh_after: bool = True,
    ) -> BulkReport:
        """Index precomputed ``(features, path, metadata)`` triples in batches."""
        succeeded: list[str] = []
        failed: list[ItemFailure] = []
        batch: list[ImageRecord] = []

        def flush() -> None:
            report = upsert_and_refresh_cache(self.backend, self.cache, batch)
            succeeded.extend(report.succeeded)
            failed.extend(report.failed)
            batch.clear()

        for features, path, metadata in items:
            batch.append(ImageRecord(check_id(features.image_id), path, check_metadata(metadata), features, _now()))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        if refresh_after:
            self.backend.refresh()
        return BulkReport(succeeded=succeeded, failed=failed)

    def search_image(
        self,
        path: str | bytes,
        all_orientations: bool = False,
        bytestream: bool = False,
        pre_filter: MetadataFilter | None = None,
        limit: int = 10,
        min_inliers: int | None = None,
    ) -> list[dict[str, Any]]:
        """Images showing the same object or place as the query, best first.

        Returns dicts with ``id``, ``path``, ``score`` (what ``rank_by`` ranks by), ``dist`` (share of
        the query's keypoints without a verified match: 0 = all, 1 = none), ``metadata``,
        ``inliers``, ``votes`` and ``global_similarity``; only hits with at least
        ``min_inliers`` (default: settings) verified inliers are matches.
        """
        return [match.result for match in self._search(path, all_orientations, bytestream, pre_filter, limit,
                                                        min_inliers)]

    def search_verified(
        self,
        path: str | bytes,
        all_orientations: bool = False,
        bytestream: bool = False,
        pre_filter: MetadataFilter | None = None,
        limit: int = 10,
        min_inliers: int | None = None,
    ) -> list[VerifiedMatch]:
        """:meth:`search_image` with what the search decided for each result: the query view that
        matched, the image's stored keypoints and the verified correspondences between them (so a
        figure draws exactly the inliers the search counted, never a re-match)."""
        matches = self._search(path, all_orientations, bytestream, pre_filter, limit, min_inliers)
        stored = self.backend.keypoints([m.result["id"] for m in matches]) if matches else {}
        return [replace(m, keypoints=stored.get(m.result["id"], m.keypoints)) for m in matches]

    def _search(self, path: str | bytes, all_orientations: bool, bytestream: bool, pre_filter: Any, limit: Any,
                min_inliers: Any) -> list[VerifiedMatch]:
        limit = check_count("limit", limit, minimum=1)
        if min_inliers is not None:
            min_inliers = check_count("min_inliers", min_inliers)
        pre_filter = check_filter(pre_filter)
        _, image = self.load(path, None, bytestream)
        pixels = [image.pixels] if not all_orientations else _orientations(image.pixels)
        best: dict[str, tuple[SearchHit, np.ndarray, Features]] = {}
        for variant in pixels:
            query = self.extractor.extract(variant, image_id="<query>")
            for hit in self.searcher().search(query, metadata_filter=pre_filter):
                if hit.image_id not in best or hit.score > best[hit.image_id][0].score:
                    best[hit.image_id] = (hit, variant, query)
        threshold = self.settings.min_inliers if min_inliers is None else min_inliers
        hits = sorted(best.values(), key=lambda p: (-p[0].score, -p[0].inliers, -p[0].votes, p[0].image_id))
        hits = [entry for entry in hits if entry[0].inliers >= threshold][:limit]
        stored = {h.image_id: self._get_or_none(h.image_id) for h, _, _ in hits}
        return [
            VerifiedMatch(_result(h, q.num_keypoints, stored[h.image_id]), variant, q.keypoints,
                          np.zeros((0, 2), np.float32), h.correspondences)
            for h, variant, q in hits if stored[h.image_id] is not None
        ]

    def search_features(self, query: Features, pre_filter: MetadataFilter | None = None, limit: int | None = None) -> list[SearchHit]:
        """The full ranked shortlist for precomputed query features (evaluation uses this)."""
        if limit is not None:
            limit = check_count("limit", limit, minimum=1)
        return self.searcher().search(query, limit=limit, metadata_filter=check_filter(pre_filter))

    def get_image(self, image_id: str) -> dict[str, Any]:
        """Stored fields of one image; :class:`~delf_es.errors.ImageNotFound` if unknown."""
        return _stored_dict(self.backend.get(check_id(image_id)))

    def delete_image(self, image_id: str, refresh_after: bool = False) -> None:
        """Remove an image; :class:`~delf_es.errors.ImageNotFound` if unknown."""
        image_id = check_id(image_id)
        report = self.backend.delete([image_id], refresh=refresh_after)
        self.cache.delete(self.model_id, [image_id])
        self.cache.delete(codes_namespace(self.model_id), [image_id])
        if not report.ok:
            raise ImageNotFound(image_id)

    def bulk_add(
        self,
        items: Iterable[str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]],
        progress: bool = True,
        skip_existing: bool = False,
        refresh_after: bool = True,
        batch_size: int = 16,
    ) -> BulkReport:
        """Index many images.  Items are paths/URLs, ``(path, metadata)`` pairs or dicts with
        ``path`` (and ``img``, ``bytestream``, ``metadata``).  Bad items are reported, never raised."""
        from tqdm import tqdm

        items = list(items)
        succeeded: list[str] = []
        failed: list[ItemFailure] = []
        existing: set[str] = set()
        parsed = [parse_item(item) for item in items]
        if skip_existing:
            existing = self.backend.existing([i.path for i in parsed if isinstance(i.path, str) and not i.invalid])
        batch: list[ImageRecord] = []

        def flush() -> None:
            if batch:
                report = upsert_and_refresh_cache(self.backend, self.cache, batch)
                succeeded.extend(report.succeeded)
                failed.extend(report.failed)
                batch.clear()

        for item in tqdm(parsed, disable=not progress, desc="indexing", unit="img"):
            label = item.path if isinstance(item.path, str) else "<bytes>"
            if label in existing:
                continue
            try:
                if item.invalid:
                    raise InvalidRequest(f"{label}: {item.invalid}")
                name, image = self.load(item.path, item.img, item.bytestream)
                features = self.extractor.extract(image.pixels, image_id=name)
                batch.append(ImageRecord(name, name, check_metadata(item.metadata), features, _now()))
            except DelfEsError as error:
                failed.append(ItemFailure(item_id=label, error=str(error)))
            if len(batch) >= batch_size:
                flush()
        flush()
        if refresh_after:
            self.backend.refresh()
        return BulkReport(succeeded=succeeded, failed=failed)

    def count(self) -> int:
        return self.backend.count()

    # ------------------------------------------------------------------ worker fleet

    def _submitter(self):
        if getattr(self, "_workers", None) is None:
            if not (self.settings.worker_redis_url or self.settings.redis_url):
                raise ConfigurationError(
                    "add_image(wait=False) queues the image for the worker fleet, which needs the workers' "
                    "Redis: set DELF_ES_REDIS_URL (or DELF_ES_WORKER_REDIS_URL) and start workers "
                    "(delf-es worker); or add with wait=True"
                )
            from delf_es.workers.app import make_submitter  # the fleet's side: loaded only when used

            self._workers = make_submitter(self.settings)
        return self._workers

    def task_status(self, task_id: str) -> dict[str, Any]:
        """State of an ``add_image(..., wait=False)`` task: ``{"state": "pending" | "indexed" |
        "failed", "error": str | None}`` (indexed = written; searchable after the next refresh)."""
        progress = self._submitter().progress(task_id)
        if progress.done:
            return {"state": "indexed", "error": None}
        if progress.failed:
            return {"state": "failed", "error": next(iter(progress.failed.values()))}
        return {"state": "pending", "error": None}

    def failures(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Images the workers could not index (undecodable, refused), newest first, with the error."""
        if not self.settings.es_url:
            return []
        from delf_es.index.es.failures import FailureLog, failures_index
        from delf_es.index.es.transport import Transport

        with Transport(self.settings) as transport:
            return [f.__dict__ for f in FailureLog(transport, failures_index(self.settings.index_alias)).list(limit)]

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        if getattr(self, "_workers", None) is not None:
            self._workers.close()
        close = getattr(self.cache, "close", None)
        if close:
            close()

    def __enter__(self) -> "DelfEs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def load(self, path: str | bytes, img: str | bytes | None, bytestream: bool) -> tuple[str, LoadedImage]:
        """(stored name, decoded image) from image-match style arguments."""
        if bytestream:
            data = img if img is not None else path
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidRequest("bytestream=True needs the image as bytes")
            name = path if img is not None and isinstance(path, str) else "sha1:" + hashlib.sha1(bytes(data)).hexdigest()
            return check_id(name), load_image(bytes(data), self.settings, name=name)
        source = img if img is not None else path
        if not isinstance(source, (str, Path)) or not isinstance(path, (str, Path)):
            raise InvalidRequest("path must be a file path or URL (or pass bytestream=True for bytes)")
        name = str(path)
        source = str(source)
        check_id(name)
        if "://" in source:
            return name, load_image_from_url(source, self.settings)
        return name, load_image(source, self.settings)

    def _get_or_none(self, image_id: str) -> StoredImage | None:
        try:
            return self.backend.get(image_id)
        except ImageNotFound:  # deleted between search and get
            return None


@dataclass(frozen=True)
class VerifiedMatch:
    """One result of :meth:`DelfEs.search_verified`.

    Attributes:
        result: the dict :meth:`DelfEs.search_image` returns for it.
        query_pixels: (H, W, 3) uint8, the query view that matched (an orientation of the query
            with ``all_orientations``).
        query_keypoints: (N, 2) float32 px of that view (side A of ``correspondences``).
        keypoints: (M, 2) float32 px, the image's stored keypoints (side B).
        correspondences: the verified matches and inlier mask (``num_inliers`` = ``result["inliers"]``),
            None when the image had nothing to verify.
    """

    result: dict[str, Any]
    query_pixels: np.ndarray
    query_keypoints: np.ndarray
    keypoints: np.ndarray
    correspondences: Correspondences | None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _orientations(pixels: np.ndarray) -> list[np.ndarray]:
    """The 8 orientations (4 rotations x mirror), the original first."""
    out = []
    for mirrored in (pixels, pixels[:, ::-1]):
        for turns in range(4):
            out.append(np.ascontiguousarray(np.rot90(mirrored, turns)))
    return out


def _stored_dict(stored: StoredImage) -> dict[str, Any]:
    return {
        "id": stored.image_id, "path": stored.path, "metadata": stored.metadata, "width": stored.width,
        "height": stored.height, "num_keypoints": stored.num_keypoints, "model_id": stored.model_id,
        "created_at": stored.created_at,
    }


def _result(hit: SearchHit, query_keypoints: int, stored: StoredImage) -> dict[str, Any]:
    return {
        "id": hit.image_id,
        "path": stored.path,
        "score": float(hit.score),
        "dist": 1.0 - min(1.0, (hit.inliers or 0) / max(1, query_keypoints)),
        "metadata": stored.metadata,
        "inliers": int(hit.inliers or 0),
        "votes": int(hit.votes),
        "global_similarity": None if np.isnan(hit.global_similarity) else float(hit.global_similarity),
    }
