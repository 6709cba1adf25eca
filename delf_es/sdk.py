"""The public entry point, in the idiom of image-match's ``SignatureES`` so its users can switch.

    from delf_es import DelfEs
    engine = DelfEs()                                  # embedded index under ~/.local/share/delf-es
    engine.add_image("photos/eiffel.jpg", metadata={"city": "paris"})
    engine.search_image("query.jpg")                   # [{'id', 'path', 'score', 'dist', 'metadata', 'inliers', ...}]

With ``DELF_ES_ES_URL`` (and optionally ``DELF_ES_REDIS_URL``) set, the same calls go to
Elasticsearch (and cache keypoint locations in Redis).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from delf_es.cache import LocationCache, MemoryLocationCache, RedisLocationCache, codes_namespace
from delf_es.errors import BulkIndexFailed, ConfigurationError, DelfEsError, ImageNotFound, InvalidRequest, ItemFailure
from delf_es.ids import file_image_id, is_url
from delf_es.imageio import LoadedImage, load_image, load_image_from_url
from delf_es.index.base import Backend, BulkReport, ImageRecord, MetadataFilter, StoredImage
from delf_es.index.writing import upsert_and_refresh_cache
from delf_es.items import MAX_ID_BYTES, check_count, check_filter
from delf_es.items import check_id as _check_id  # the one id rule (SDK, CLI, workers, API)
from delf_es.items import check_metadata as _check_metadata
from delf_es.parallel import ExtractorPool, process_plan
from delf_es.sdk_parts import (QueryResult, crop, interrupts_deferred, item_fields, item_label, orientations, result_dict,
                               stored_dict, utc_now)
from delf_es.search import Searcher
from delf_es.settings import Settings
from delf_es.types import Features, SearchHit

log = logging.getLogger(__name__)

__all__ = ["DelfEs", "MAX_ID_BYTES", "QueryResult", "open_backend", "open_cache"]


def open_backend(settings: Settings, model_id: str | None = None) -> Backend:
    """The backend ``settings.backend`` names ('auto': Elasticsearch when ``es_url`` is set, else
    the embedded on-disk index, with its ``embedded_*`` knobs)."""
    if settings.index_backend() == "elasticsearch":
        if not settings.es_url:
            raise ConfigurationError("backend 'elasticsearch' needs DELF_ES_ES_URL (settings.es_url)")
        from delf_es.index.es import ElasticsearchBackend

        return ElasticsearchBackend(settings, model_id=model_id)
    from delf_es.index.embedded import EmbeddedBackend

    return EmbeddedBackend(Path(settings.data_dir) / settings.index_alias, model_id=model_id,
                           exact_limit=settings.embedded_exact_limit, nprobe=settings.embedded_nprobe,
                           keypoint_vectors=settings.index_keypoint_vectors(), sq8_from=settings.embedded_sq8_from)


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
        self._spec = None
        self._backend = backend
        self.cache = cache or open_cache(self.settings)

    # ------------------------------------------------------------------ parts, built lazily

    @property
    def extractor(self):
        if self._extractor is None:
            from delf_es.features import Extractor

            self._extractor = Extractor(self.settings, self._spec)
        return self._extractor

    @property
    def model_spec(self):
        """The model (:class:`~delf_es.model.spec.ModelSpec`): the extractor's, else the settings'."""
        if self._extractor is not None and getattr(self._extractor, "spec", None) is not None:
            return self._extractor.spec
        if self._spec is None:
            from delf_es.model.spec import ModelSpec

            self._spec = ModelSpec.from_settings(self.settings)
        return self._spec

    @property
    def model_id(self) -> str:
        """The id every index and cache key of this model carries (commands that only read or
        delete never load the network for it)."""
        if self._extractor is not None:
            return self._extractor.model_id
        return self.model_spec.model_id

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.settings, model_id=self.model_id)
        return self._backend

    def extract(self, pixels: np.ndarray, image_id: str) -> Features:
        """Features of (H, W, 3) uint8 ``pixels`` as added or searched: keypoints on flat pixels
        dropped (``settings.min_keypoint_contrast``, delf_es/degenerate.py)."""
        from delf_es.degenerate import drop_flat_keypoints

        features = self.extractor.extract(pixels, image_id=image_id)
        return drop_flat_keypoints(features, pixels, self.settings.min_keypoint_contrast, self.settings.max_image_size)

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
        The id of a file added without a chosen name is its canonical path (absolute, symlinks
        resolved: ``dir/a.jpg``, ``./dir/a.jpg`` and the absolute path are one image), or
        ``sha256:<hex>`` of its bytes with ``settings.id_from="content"`` (delf_es/ids.py).
        Re-adding an id replaces the image; it never duplicates.
        """
        if not wait:
            if bytestream or img is not None or not isinstance(path, (str, Path)):
                raise InvalidRequest("wait=False takes a path or URL the workers can read (no bytes, no img)")
            source = str(path)  # the workers key by canonical path (id_from=content: synchronous adds only)
            return self._submitter().submit_one(_check_id(source if is_url(source) else os.path.realpath(source)),
                                                _check_metadata(metadata))
        name, image = self.load(path, img, bytestream)
        self.add_loaded(name, image, metadata=metadata, refresh_after=refresh_after)
        return name

    def add_loaded(
        self, image_id: str, image: LoadedImage, metadata: Mapping[str, Any] | None = None,
        refresh_after: bool = False,
    ) -> Features:
        """Index a decoded image under ``image_id`` (also its stored path); returns its features."""
        _check_id(image_id)
        _check_metadata(metadata)  # before the model runs: a bad request costs no CPU
        features = self.extract(image.pixels, image_id=image_id)
        self.add_features(features, path=image_id, metadata=metadata, refresh_after=refresh_after,
                          thumbnail=self._thumbnail(image))
        return features

    def add_features(
        self, features: Features, path: str | None = None, metadata: Mapping[str, Any] | None = None,
        refresh_after: bool = False, thumbnail: bytes | None = None,
    ) -> str:
        """Index precomputed features (their ``image_id`` is the id), with an optional
        thumbnail JPEG (:func:`delf_es.thumbnails.make_thumbnail`)."""
        record = ImageRecord(
            image_id=_check_id(features.image_id),
            path=path or features.image_id,
            metadata=_check_metadata(metadata),
            features=features,
            created_at=utc_now(),
            thumbnail=thumbnail,
        )
        report = upsert_and_refresh_cache(self.backend, self.cache, [record], refresh=refresh_after)
        if not report.ok:
            raise BulkIndexFailed(f"{record.image_id}: {report.failed[0].error}", report.failed)
        return record.image_id

    def add_features_bulk(
        self, items: Iterable[tuple[Features, str, Mapping[str, Any] | None]], batch_size: int = 32,
        refresh_after: bool = True,
    ) -> BulkReport:
        """Index precomputed ``(features, path, metadata)`` triples in batches.

        Once ``settings.es_bulk_load_images`` images (0 = never) have been written, the rest of the
        load runs as an Elasticsearch bulk load (refresh off, no replicas, several writers), the
        index settings restored when it ends, also on error (``ElasticsearchBackend.bulk_load``;
        the embedded backend has no such mode)."""
        succeeded: list[str] = []
        failed: list[ItemFailure] = []
        batch: list[ImageRecord] = []
        seen = 0
        entered = False
        threshold = self.settings.es_bulk_load_images
        bulk_load = getattr(self.backend, "bulk_load", None)

        with contextlib.ExitStack() as loading:

            def flush() -> None:
                nonlocal entered
                report = upsert_and_refresh_cache(self.backend, self.cache, batch)
                succeeded.extend(report.succeeded)
                failed.extend(report.failed)
                batch.clear()
                # entered after a write, so the index exists; left (settings restored) by the stack
                if bulk_load is not None and threshold and seen >= threshold and not entered:
                    loading.enter_context(bulk_load())
                    entered = True

            for features, path, metadata in items:
                batch.append(ImageRecord(_check_id(features.image_id), path, _check_metadata(metadata), features,
                                         utc_now()))
                seen += 1
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
        # Checked before any work: limit=-1 used to drop the last hit silently (hits[:-1]).
        limit = check_count("limit", limit, minimum=1)
        if min_inliers is not None:
            min_inliers = check_count("min_inliers", min_inliers)
        pre_filter = check_filter(pre_filter)  # a mapping, nested at most MAX_DEPTH deep
        _, image = self.load(path, None, bytestream)
        return self.search_loaded(image, all_orientations=all_orientations, pre_filter=pre_filter, limit=limit,
                                  min_inliers=min_inliers).hits

    def search_loaded(
        self,
        image: LoadedImage,
        *,
        bbox: tuple[float, float, float, float] | None = None,
        all_orientations: bool = False,
        pre_filter: MetadataFilter | None = None,
        limit: int = 10,
        min_inliers: int | None = None,
        matches: bool = False,
    ) -> QueryResult:
        """:meth:`search_image` on a decoded image, with what a server shows about the query.

        Args:
            bbox: ``(x1, y1, x2, y2)`` px of ``image``: search with that region only.
            matches: give each hit ``matches``, its verified pairs ``[[qx, qy, x, y], ...]``
                in px of the original query image and of the original database image.
        """
        pixels = image.pixels
        offset = (0.0, 0.0)
        if bbox is not None:
            pixels, offset = crop(pixels, bbox, self.settings.min_image_side)
        if matches and all_orientations:
            raise InvalidRequest("matches are given in the query's own orientation: not with all_orientations")
        variants = [pixels] if not all_orientations else orientations(pixels)
        best: dict[str, tuple[SearchHit, int]] = {}
        keypoints = 0
        for variant in variants:
            query = self.extract(variant, image_id="<query>")
            keypoints = keypoints or query.num_keypoints
            for hit in self.searcher().search(query, metadata_filter=pre_filter):
                if hit.image_id not in best or hit.score > best[hit.image_id][0].score:
                    best[hit.image_id] = (hit, query.num_keypoints)
        threshold = self.settings.min_inliers if min_inliers is None else min_inliers
        hits = sorted(best.values(), key=lambda p: (-p[0].score, -p[0].inliers, -p[0].votes, p[0].image_id))
        hits = [(h, n) for h, n in hits if h.inliers >= threshold][:limit]
        stored = {i: self._get_or_none(i) for i in (h.image_id for h, _ in hits)}
        results = []
        for hit, n in hits:
            if stored[hit.image_id] is None:
                continue
            result = result_dict(hit, n, stored[hit.image_id])
            if matches:
                pairs = hit.inlier_pairs if hit.inlier_pairs is not None else np.zeros((0, 4), np.float32)
                shifted = pairs.astype(np.float64) + np.array([offset[0], offset[1], 0.0, 0.0])
                result["matches"] = np.round(shifted, 1).tolist()
            results.append(result)
        width, height = image.size
        return QueryResult(width=width, height=height, keypoints=keypoints, hits=results)

    def search_indexed(
        self, image_id: str, *, pre_filter: MetadataFilter | None = None, limit: int = 10,
        min_inliers: int | None = None, matches: bool = False,
    ) -> QueryResult:
        """Search with an indexed image, from what the index stores of it (keypoints, their
        scales, int8 descriptor codes and the global descriptor; the original file is never
        read).  Descriptors are the int8 codes decoded, so scores can differ slightly from a
        search with the original photo.  Without a stored global descriptor the shortlist is
        the local one (keypoint votes).  The image itself is normally the first hit."""
        from delf_es.index.codes import decode_codes

        stored = self.backend.get(image_id)
        locations = self.backend.keypoints([image_id]).get(image_id)
        codes = self.backend.descriptor_codes([image_id]).get(image_id)
        if locations is None or codes is None or not len(codes):
            raise InvalidRequest(f"{image_id!r} has no stored keypoints to search with")
        n = len(locations)
        scales = self.backend.keypoint_scales([image_id]).get(image_id)
        global_desc = self.backend.global_descriptors([image_id]).get(image_id)
        query = Features(
            image_id="<query>", model_id=stored.model_id, image_size=(stored.width, stored.height),
            keypoints=np.asarray(locations, np.float32),
            scales=np.asarray(scales, np.float32) if scales is not None and len(scales) == n else np.ones(n, np.float32),
            scores=np.linspace(1.0, 0.0, n, dtype=np.float32), descriptors=decode_codes(codes),
            global_desc=np.asarray(global_desc, np.float32) if global_desc is not None else np.zeros(0, np.float32),
        )
        settings = self.settings
        if not query.global_desc.size:
            settings = settings.model_copy(update={"shortlist_mode": "local"})
        found = Searcher(self.backend, self.cache, settings, self.model_id).search(query, metadata_filter=pre_filter)
        threshold = self.settings.min_inliers if min_inliers is None else min_inliers
        results = []
        for hit in [h for h in found if h.inliers >= threshold][:limit]:
            record = self._get_or_none(hit.image_id)
            if record is None:
                continue
            result = result_dict(hit, n, record)
            if matches:
                pairs = hit.inlier_pairs if hit.inlier_pairs is not None else np.zeros((0, 4), np.float32)
                result["matches"] = np.round(pairs.astype(np.float64), 1).tolist()
            results.append(result)
        return QueryResult(width=stored.width, height=stored.height, keypoints=n, hits=results)

    def search_features(self, query: Features, pre_filter: MetadataFilter | None = None, limit: int | None = None) -> list[SearchHit]:
        """The full ranked shortlist for precomputed query features (evaluation uses this)."""
        return self.searcher().search(query, limit=limit, metadata_filter=pre_filter)

    def get_image(self, image_id: str) -> dict[str, Any]:
        """Stored fields of one image; :class:`~delf_es.errors.ImageNotFound` if unknown."""
        return stored_dict(self.backend.get(_check_id(image_id)))

    def delete_image(self, image_id: str, refresh_after: bool = False) -> None:
        """Remove an image; :class:`~delf_es.errors.ImageNotFound` if unknown."""
        image_id = _check_id(image_id)
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
        ``path`` (and ``img``, ``bytestream``, ``metadata``).  Bad items are reported, never raised.

        Extracted images are committed in batches of at most ``batch_size``, and at the latest
        ``settings.commit_seconds`` after the extraction of the batch's first image began, so a
        crash loses at most that much finished work (at ~5 s per image on a CPU: none, every
        image is committed as soon as it is extracted) plus the image in progress.  An item
        whose id was already handled in this call is skipped (one file, several spellings).
        On Ctrl-C (KeyboardInterrupt) what is extracted is committed first, then
        :class:`~delf_es.errors.Interrupted` (a KeyboardInterrupt) carries the report."""
        import time

        from tqdm import tqdm

        from delf_es.errors import Interrupted

        items = list(items)
        succeeded: list[str] = []
        failed: list[ItemFailure] = []
        existing: set[str] = set()
        ids = [self._default_id(item_fields(i)) for i in items]
        if skip_existing:
            existing = self.backend.existing([n for n in ids if n is not None])
        batch: list[ImageRecord] = []
        batch_started = 0.0
        handled: set[str] = set()

        def flush() -> None:
            if batch:
                with interrupts_deferred():  # a Ctrl-C mid-write would leave the report unsure
                    report = upsert_and_refresh_cache(self.backend, self.cache, batch)
                    succeeded.extend(report.succeeded)
                    failed.extend(report.failed)
                    written = set(report.succeeded)
                    batch.clear()
                log.info("committed %d image(s): %s", len(written), json.dumps(sorted(written)))

        processes, threads = process_plan(self.settings)
        if processes > 1 and len(items) > 1:
            return self._bulk_add_in_processes(items, ids, existing, skip_existing, flush, batch, handled, succeeded,
                                               failed, processes, threads, progress, batch_size, refresh_after)
        try:
            for item, known_id in zip(tqdm(items, disable=not progress, desc="indexing", unit="img"), ids):
                fields = item_fields(item)
                label = fields["path"] if isinstance(fields["path"], str) else "<bytes>"
                if known_id is not None and (known_id in handled or (skip_existing and known_id in existing)):
                    continue
                if not batch:  # the batch's age counts from the start of its first extraction
                    batch_started = time.monotonic()
                try:
                    name, image = self.load(fields["path"], fields.get("img"), fields.get("bytestream", False))
                    features = self.extract(image.pixels, image_id=name)
                    log.info("extracted %s (%d keypoints)", name, features.num_keypoints)
                    batch.append(ImageRecord(name, name, _check_metadata(fields.get("metadata")), features, utc_now(),
                                             thumbnail=self._thumbnail(image)))
                    handled.add(name)
                except DelfEsError as error:
                    failed.append(ItemFailure(item_id=label, error=str(error)))
                if batch and (len(batch) >= batch_size
                              or time.monotonic() - batch_started >= self.settings.commit_seconds):
                    flush()
            flush()
            if refresh_after:  # inside: a Ctrl-C after the last commit is still reported as one
                self.backend.refresh()
        except KeyboardInterrupt:
            flush()  # what is extracted is saved; a second Ctrl-C here aborts one atomic write
            raise Interrupted(BulkReport(succeeded=succeeded, failed=failed)) from None
        return BulkReport(succeeded=succeeded, failed=failed)

    def _bulk_add_in_processes(self, items, ids, existing, skip_existing, flush, batch, handled, succeeded, failed,
                               processes, threads, progress, batch_size, refresh_after) -> BulkReport:
        """``bulk_add`` with decode + extraction in ``processes`` worker processes of ``threads``
        threads each (delf_es/parallel.py); writes, commit timing and Ctrl-C as in ``bulk_add``.
        Items are deduplicated by id before they are sent (one file, several spellings)."""
        import time

        from tqdm import tqdm

        from delf_es.errors import Interrupted

        work = []
        for item, known_id in zip(items, ids):
            if known_id is not None and (known_id in handled or (skip_existing and known_id in existing)):
                continue
            if known_id is not None:
                handled.add(known_id)
            work.append(item_fields(item))
        batch_started = time.monotonic()
        try:
            with ExtractorPool(self.settings, min(processes, max(1, len(work))), threads, engine=pool_engine) as pool:
                results = zip(work, pool.extract(work))
                for fields, result in tqdm(results, total=len(work), disable=not progress, unit="img",
                                           desc=f"indexing ({pool.processes} processes)"):
                    if not batch:
                        batch_started = time.monotonic()
                    if isinstance(result, ItemFailure):
                        failed.append(result)
                        continue
                    name, features, thumbnail = result
                    try:
                        batch.append(ImageRecord(name, name, _check_metadata(fields.get("metadata")), features, utc_now(),
                                                 thumbnail=thumbnail))
                    except DelfEsError as error:
                        failed.append(ItemFailure(item_id=item_label(fields), error=str(error)))
                    if batch and (len(batch) >= batch_size
                                  or time.monotonic() - batch_started >= self.settings.commit_seconds):
                        flush()
            flush()
            if refresh_after:
                self.backend.refresh()
        except KeyboardInterrupt:
            flush()
            raise Interrupted(BulkReport(succeeded=succeeded, failed=failed)) from None
        return BulkReport(succeeded=succeeded, failed=failed)

    def count(self) -> int:
        return self.backend.count()

    def thumbnail(self, image_id: str) -> bytes | None:
        """The small JPEG stored with the image (None when stored without one);
        :class:`~delf_es.errors.ImageNotFound` if unknown."""
        return self.backend.thumbnail(_check_id(image_id))

    def thumbnail_bytes(self) -> int:
        """Bytes of all stored thumbnails."""
        return self.backend.thumbnail_bytes()

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
        if self.settings.index_backend() != "elasticsearch":
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
            return _check_id(name), load_image(bytes(data), self.settings, name=name)
        source = img if img is not None else path
        if not isinstance(source, (str, Path)) or not isinstance(path, (str, Path)):
            raise InvalidRequest("path must be a file path or URL (or pass bytestream=True for bytes)")
        source = str(source)
        # A name the caller chose is kept; a file's own id is canonical (delf_es/ids.py).
        name = str(path) if img is not None else self._file_id(source)
        if is_url(source):
            return _check_id(name), load_image_from_url(source, self.settings)
        return _check_id(name), load_image(source, self.settings, name=source)

    def _file_id(self, source: str) -> str:
        """The id a file or URL gets when added without a chosen name (``settings.id_from``)."""
        from delf_es.errors import InvalidImage, UnreadableFile

        try:
            return file_image_id(source, self.settings.id_from, self.settings.max_file_bytes)
        except UnreadableFile as error:
            raise InvalidImage(error.message, source) from None

    def _default_id(self, fields: Mapping[str, Any]) -> str | None:
        """The id :meth:`load` will give an item, or None if it cannot be known before loading."""
        path = fields.get("path")
        if fields.get("invalid") or not isinstance(path, (str, Path)):
            return None
        if fields.get("img") is not None:
            return str(path)
        if fields.get("bytestream"):
            return None
        try:
            return self._file_id(str(path))
        except DelfEsError:
            return None

    def _thumbnail(self, image: LoadedImage) -> bytes | None:
        if not self.settings.thumbnails:
            return None
        from delf_es.thumbnails import make_thumbnail

        return make_thumbnail(image.pixels)

    def _get_or_none(self, image_id: str) -> StoredImage | None:
        try:
            return self.backend.get(image_id)
        except ImageNotFound:  # deleted between search and get
            return None


def pool_engine(settings: Settings) -> DelfEs:
    """The engine of one :class:`~delf_es.parallel.ExtractorPool` process: loads and extracts,
    with an in-process cache (it never searches)."""
    return DelfEs(settings, cache=MemoryLocationCache())
