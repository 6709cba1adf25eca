"""Shortlist verification on real features (issue 13 item 2): the threaded path (``verify_threads``
2 and auto) returns exactly the hits, order, inliers and inlier pairs of the one-thread path and of
a plain reference (mutual matches + RANSAC of each image in turn, then :func:`rank_hits`).  Real
paris250 photos through a small model (lite0, 3 scales: ~1 s per image)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared
from delf_es.cache import MemoryLocationCache
from delf_es.imageio import load_image
from delf_es.index.base import ImageRecord
from delf_es.index.embedded import EmbeddedBackend
from delf_es.index.codes import decode_codes
from delf_es.search import Searcher, mutual_matches, rank_hits, verify_thread_count
from delf_es.settings import Settings
from delf_es.types import SearchHit
from delf_es.verify import estimate_model

FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))
PHOTOS = [
    "paris250/db/defense/paris_defense_000000.jpg",
    "paris250/db/defense/paris_defense_000002.jpg",
    "paris250/db/eiffel_tower/paris_eiffel_000000.jpg",
    "paris250/db/louvre/paris_louvre_000004.jpg",
    "paris250/db/louvre/paris_louvre_000015.jpg",
    "paris250/db/invalides/paris_invalides_000002.jpg",
    "paris250/db/moulinrouge/paris_moulinrouge_000003.jpg",
]
QUERY = "paris250/db/defense/paris_defense_000056.jpg"  # query defense_4's photo, cropped to its box
QUERY_BOX = (8, 104, 707, 913)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from delf_es.features import Extractor

    settings = Settings(**FAST)
    extractor = Extractor(settings)
    backend = EmbeddedBackend(tmp_path_factory.mktemp("real") / "index", keypoint_vectors=False)
    records = []
    for path in PHOTOS:
        features = extractor.extract(load_image(shared(path), settings).pixels, path)
        records.append(ImageRecord(path, path, {}, features, "2026-12-01T00:00:00Z"))
    assert backend.upsert(records).ok
    x0, y0, x1, y1 = QUERY_BOX
    pixels = load_image(shared(QUERY), settings).pixels[y0:y1, x0:x1]
    query = extractor.extract(np.ascontiguousarray(pixels), "query")
    yield backend, query, extractor.model_id
    backend.close()


def whole_product_matches(descriptors: np.ndarray, codes: np.ndarray, min_similarity: float):
    """Mutual nearest neighbours from the whole (Q, N) product at once, as before the product was
    computed in blocks of rows (search.MATCH_BLOCK_ROWS)."""
    similarity = descriptors @ decode_codes(codes).T
    best_keypoint = similarity.argmax(axis=1)
    best = similarity[np.arange(len(descriptors)), best_keypoint]
    keep = (best >= similarity.max(axis=0)[best_keypoint]) & (best >= min_similarity)
    q, keypoint = np.flatnonzero(keep), best_keypoint[keep]
    _, first = np.unique(keypoint, return_index=True)
    first.sort()
    return q[first], keypoint[first]


def reference(backend, query, s: Settings) -> list[SearchHit]:
    """The plain path: shortlist, then each image matched (the whole product, not blocks) and
    verified in turn."""
    descriptors = query.descriptors[: s.query_max_descriptors]
    shortlist = backend.global_knn(query.global_desc, s.shortlist_size)
    codes = backend.descriptor_codes([i for i, _ in shortlist])
    locations = backend.keypoints([i for i, _ in shortlist])
    hits = []
    for image_id, similarity in shortlist:
        q, d = whole_product_matches(descriptors, codes[image_id], s.knn_min_similarity)
        blocked = mutual_matches(descriptors, codes[image_id], s.knn_min_similarity)
        assert np.array_equal(blocked[0], q) and np.array_equal(blocked[1], d), image_id
        _, mask = estimate_model(query.keypoints[q], locations[image_id][d], s.ransac_model, s.ransac_px,
                                 s.ransac_confidence, s.ransac_max_iters, s.ransac_seed, s.min_inlier_spread)
        pairs = np.hstack([query.keypoints[q][mask], locations[image_id][d][mask]]).astype(np.float32)
        hits.append(SearchHit(image_id=image_id, score=float(len(pairs)), inliers=len(pairs), votes=len(q),
                              global_similarity=similarity, inlier_pairs=pairs))
    return rank_hits(hits, s)


def comparable(hits: list[SearchHit]) -> list[tuple]:
    return [(h.image_id, h.inliers, h.votes, round(float(h.score), 5), h.inlier_pairs.tobytes()) for h in hits]


@pytest.mark.parametrize("threads", [2, 0])
def test_threaded_verification_returns_the_hits_of_the_plain_path_on_real_photos(real, threads):
    backend, query, model_id = real
    # the reference has no query expansion; with it (the default) both paths are compared below
    base = Settings(**FAST, shortlist_mode="global", correspondences="matching", shortlist_size=len(PHOTOS),
                    query_expansion=0)
    expected = comparable(reference(backend, query, base))
    one = Searcher(backend, MemoryLocationCache(), base.model_copy(update={"verify_threads": 1}), model_id).search(query)
    many = Searcher(backend, MemoryLocationCache(), base.model_copy(update={"verify_threads": threads}), model_id)
    assert comparable(one) == expected
    assert comparable(many.search(query)) == expected
    assert comparable(many.search(query)) == expected  # codes and locations from the cache now
    assert one[0].image_id.startswith("paris250/db/defense/") and one[0].inliers >= base.min_inliers
    assert len(one) == len(PHOTOS)
    qe = base.model_copy(update={"query_expansion": Settings().query_expansion, "shortlist_size": 4})
    plain = Searcher(backend, MemoryLocationCache(), qe.model_copy(update={"verify_threads": 1}), model_id).search(query)
    threaded = Searcher(backend, MemoryLocationCache(), qe.model_copy(update={"verify_threads": threads}), model_id)
    assert comparable(threaded.search(query)) == comparable(plain)


def test_auto_threads_are_the_cores_the_load_leaves_free():
    assert verify_thread_count(3) == 3  # set: used as is
    assert verify_thread_count(0, cpu_count=2, load=0.2) == 2  # idle: every core
    assert verify_thread_count(0, cpu_count=2, load=1.0) == 2  # only this search running
    assert verify_thread_count(0, cpu_count=2, load=1.2) == 2  # this search and a little more: 1.8 cores free
    assert verify_thread_count(0, cpu_count=2, load=1.6) == 1
    assert verify_thread_count(0, cpu_count=2, load=7.0) == 1  # busy: never fewer than one
    assert verify_thread_count(0, cpu_count=8, load=3.0) == 6
