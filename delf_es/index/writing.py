"""The write step every writer shares (the SDK and the workers): upsert, then refresh the search
cache for what was written.

The cache is cache-aside for searches (``delf_es/cache.py``): after a write, the new keypoint
locations are put (so the next search needs no index read) and cached int8 codes of a replaced
version are dropped (read again on demand: they are 5x the locations' size, so not cached on
write).  Only images the index accepted touch the cache.
"""

from __future__ import annotations

from typing import Iterable

from delf_es.cache import LocationCache, codes_namespace
from delf_es.index.base import Backend, BulkReport, ImageRecord


def upsert_and_refresh_cache(
    backend: Backend, cache: LocationCache | None, records: Iterable[ImageRecord], refresh: bool = False
) -> BulkReport:
    """``backend.upsert(records)``, then the cache update for the records it wrote (grouped by
    model id).  IndexUnavailable from the backend propagates before the cache is touched."""
    records = list(records)
    report = backend.upsert(records, refresh=refresh)
    if cache is None or not report.succeeded:
        return report
    written = set(report.succeeded)
    by_model: dict[str, dict] = {}
    for record in records:
        if record.image_id in written:
            by_model.setdefault(record.features.model_id, {})[record.image_id] = record.features.keypoints
    for model_id, locations in by_model.items():
        cache.put_many(model_id, locations)
        cache.delete(codes_namespace(model_id), list(locations))
    return report
