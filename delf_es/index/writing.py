"""The write step every writer shares (the SDK and the workers): upsert, then cache what was written.

The cache is cache-aside for searches (``delf_es/cache.py``): after a write, the new keypoint
locations are put under the new revision's key (``<id>@<revision>``, the revision read back from
the index), so the next search needs no index read, and entries of a replaced revision are never
read again (another key): a cache that missed this write (paused, down) cannot serve them.  Only
images the index accepted touch the cache.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from delf_es.cache import LocationCache, image_revisions, revision_key
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
    by_model: dict[str, dict[str, np.ndarray]] = {}
    for record in records:
        if record.image_id in written:
            by_model.setdefault(record.features.model_id, {})[record.image_id] = record.features.keypoints
    for model_id, locations in by_model.items():
        revisions = image_revisions(backend, list(locations))
        cache.put_many(model_id, {revision_key(i, revisions[i]): a for i, a in locations.items() if i in revisions})
    return report
