"""Real features for the scale benchmarks, read straight from a ``delf-es eval`` feature cache (no model,
no extraction): the paris250 database photos + wallpaper distractors and the paris250 query crops,
through the default model.  Shared by keypoint_vectors.py, verify_speed.py and scale.py.

    data = load("/work/cache/features/efficientnet-lite2.expand-norm-pca40-e9632f93@9656183e")
    image = replica(data.database, 12345)   # photo 12345 mod P, perturbed copy 12345 // P

A larger database is the real photos replicated with perturbations (``search_speed.replica``: copy
``c >= 1`` of a photo adds Gaussian noise to its descriptors, cosine ~0.72, and to its global
descriptor, cosine ~0.7, and moves each keypoint by up to 2 px); copy 0 is the photo itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_speed import GLOBAL_NOISE_NORM, JITTER_PX, NOISE_SIGMA, replica  # noqa: E402,F401

from delf_es.index.base import ImageRecord  # noqa: E402
from delf_es.types import Features  # noqa: E402

#: The default model's paris250 cache (read-only): ~310 database photos and the query crops.
DEFAULT_CACHE = Path(os.environ.get(
    "DELF_ES_BENCH_FEATURES", "/work/cache/features/efficientnet-lite2.expand-norm-pca40-e9632f93@9656183e"))

REPLICATION = (f"image i = real photo i mod P, copy i // P; copy 0 = the photo, copy c >= 1 = its features with "
               f"Gaussian descriptor noise sigma {NOISE_SIGMA}/dim (cosine ~0.72), global noise norm "
               f"{GLOBAL_NOISE_NORM} (cosine ~0.7), keypoints moved by up to {JITTER_PX} px")


@dataclass(frozen=True)
class CachedData:
    """Real features: ``database`` (P photos, sorted by id) and ``queries`` (the query crops)."""

    database: list[Features]
    queries: list[Features]
    model_id: str
    source: str


def load(directory: Path = DEFAULT_CACHE) -> CachedData:
    """Every cached feature file of ``directory`` (``<2 hex>/<key>.npz``): ids ``query:*`` are queries."""
    files = sorted(Path(directory).glob("*/*.npz"))
    if not files:
        raise SystemExit(f"no cached features in {directory} (set DELF_ES_BENCH_FEATURES)")
    features = [Features.load(path) for path in files]
    database = sorted((f for f in features if not f.image_id.startswith("query:")), key=lambda f: f.image_id)
    queries = sorted((f for f in features if f.image_id.startswith("query:")), key=lambda f: f.image_id)
    models = {f.model_id for f in features}
    if len(models) != 1:
        raise SystemExit(f"{directory} mixes models {sorted(models)}")
    return CachedData(database, queries, models.pop(), str(directory))


def record_batches(data: CachedData, start: int, stop: int, size: int) -> Iterator[list[ImageRecord]]:
    """Images ``start`` .. ``stop - 1`` of the replicated database as index records (id = path =
    the replica's id, no metadata), ``size`` at a time (the last batch may be shorter)."""
    for first in range(start, stop, size):
        yield [ImageRecord(f.image_id, f.image_id, {}, f, "2026-12-01T00:00:00Z")
               for f in (replica(data.database, i) for i in range(first, min(first + size, stop)))]
