"""The search pipeline on the real embedded backend with synthetic features (no model):
shortlists, one-to-one pairs, cache-aside locations, ranking by inliers."""

from __future__ import annotations

import numpy as np
import pytest

from delf_es.cache import revision_key, MemoryLocationCache, codes_namespace
from delf_es.index.base import ImageRecord
from delf_es.index.embedded import EmbeddedBackend
from delf_es.index.codes import int8_codes
from delf_es.search import Searcher, _interleave, mutual_matches, one_to_one
from delf_es.settings import Settings
from delf_es.types import Features

MODEL = "synthetic@test"


def unit(rng, n, d):
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def features(image_id, keypoints, descriptors, global_desc):
    n = len(keypoints)
    return Features(image_id, MODEL, (640, 480), keypoints.astype(np.float32), np.ones(n, np.float32),
                    np.linspace(2, 1, n).astype(np.float32), descriptors, global_desc)


@pytest.fixture()
def scene(tmp_path):
    """Five database images of 200 random keypoints; the query sees image 'target' moved by a
    homography, with noise on the descriptors, plus 100 clutter keypoints."""
    rng = np.random.default_rng(0)
    backend = EmbeddedBackend(tmp_path / "index", model_id=MODEL)
    records, images = [], {}
    for name in ("a", "b", "target", "c", "d"):
        kp = rng.uniform([0, 0], [640, 480], (200, 2))
        desc = unit(rng, 200, 40)
        images[name] = (kp, desc)
        records.append(ImageRecord(name, f"/photos/{name}.jpg", {"group": name}, features(name, kp, desc, unit(rng, 1, 16)[0]),
                                   "2026-11-22T00:00:00Z"))
    backend.upsert(records)
    kp, desc = images["target"]
    homography = np.array([[0.9, 0.1, 30], [-0.05, 1.1, 10], [0, 0, 1]])
    moved = (np.c_[kp, np.ones(200)] @ homography.T)
    moved = moved[:, :2] / moved[:, 2:]
    noisy = desc + 0.05 * rng.standard_normal(desc.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    query_kp = np.r_[moved, rng.uniform([0, 0], [640, 480], (100, 2))]
    query_desc = np.r_[noisy, unit(rng, 100, 40)]
    target_global = records[2].features.global_desc
    query = features("<query>", query_kp, query_desc, target_global)
    yield backend, query
    backend.close()


def searcher(backend, **overrides):
    settings = Settings(**{"knn_k": 5, "shortlist_size": 3, "ransac_px": 4.0, **overrides})
    return Searcher(backend, MemoryLocationCache(), settings, MODEL)


@pytest.mark.parametrize("correspondences", ["knn", "matching"])
@pytest.mark.parametrize("mode", ["local", "global", "hybrid"])
def test_target_is_ranked_first_with_most_inliers(scene, mode, correspondences):
    backend, query = scene
    hits = searcher(backend, shortlist_mode=mode, correspondences=correspondences).search(query)
    assert hits[0].image_id == "target"
    assert hits[0].inliers >= 150, hits[0]
    assert all(h.inliers < 20 for h in hits[1:])


@pytest.mark.parametrize("correspondences", ["knn", "matching"])
def test_parallel_verification_gives_the_same_hits_in_the_same_order(scene, correspondences):
    backend, query = scene
    plan = {"shortlist_mode": "hybrid", "correspondences": correspondences, "shortlist_size": 5}
    serial = searcher(backend, verify_threads=1, **plan).search(query)
    parallel = searcher(backend, verify_threads=3, **plan).search(query)
    assert len(serial) == 5
    assert parallel == serial


def test_global_shortlist_gets_correspondences_from_a_restricted_knn(scene):
    backend, query = scene
    hits = searcher(backend, shortlist_mode="global", shortlist_size=1).search(query)
    assert [h.image_id for h in hits] == ["target"] and hits[0].votes > 100


def test_global_shortlist_with_matching_runs_no_keypoint_knn(scene, monkeypatch):
    backend, query = scene
    search = searcher(backend, shortlist_mode="global", correspondences="matching")

    def no_knn(*args, **kwargs):
        raise AssertionError("keypoint kNN called")

    monkeypatch.setattr(backend, "knn", no_knn)
    hits = search.search(query)
    assert hits[0].image_id == "target" and hits[0].inliers >= 150
    # the codes were cached on the miss, under their own namespace and the image's revision
    key = revision_key("target", backend.revisions(["target"])["target"])
    cached = search.cache.get_many(codes_namespace(MODEL), [key])[key]
    np.testing.assert_array_equal(cached, backend.descriptor_codes(["target"])["target"])
    assert search.search(query)[0].inliers == hits[0].inliers  # from the cache now


def test_mutual_matches_equal_the_definition_with_exact_ties():
    """Against the literal definition (argmax both ways).  The database rows are the 40 unit
    axes, so every cosine is exactly one query component whatever the BLAS summation order,
    and the duplicated query rows tie exactly: ties go to the lowest query row, as argmax."""
    from delf_es.index.codes import decode_codes

    rng = np.random.default_rng(1)
    codes = int8_codes(np.eye(40, dtype=np.float32))
    query = unit(rng, 60, 40) ** 3
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    query = np.r_[query, query[:20]]
    similarity = query @ decode_codes(codes).T
    to_db, to_query = similarity.argmax(axis=1), similarity.argmax(axis=0)
    expected = [(q, k) for q, k in enumerate(to_db) if to_query[k] == q and similarity[q, k] >= 0.595]
    q_idx, db_idx = mutual_matches(query, codes, 0.595)
    assert list(zip(q_idx.tolist(), db_idx.tolist())) == expected
    assert len(expected) >= 5 and set(q_idx.tolist()) & set(range(20))  # the originals of the tied rows win


def test_mutual_matches_in_blocks_equal_the_whole_product():
    """The blocked product (``block_rows`` query rows at a time) against the definition on the whole
    (Q, N) product, with 1000 query rows so that blocks of 1, 7, 256 and 1000 rows all cut through
    it, and exact ties across blocks (rows 600-999 repeat rows 0-399: the earlier row must win).  The
    database rows are unit axes, so every cosine is exact whatever the BLAS does with a block (on
    real features the blocks differ from the whole product by <= 2 ulp; the real-photo check of the
    same hits is test_verify_threads_real.py)."""
    from delf_es.index.codes import decode_codes

    rng = np.random.default_rng(7)
    codes = int8_codes(np.eye(40, dtype=np.float32))
    query = unit(rng, 600, 40) ** 3
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    query = np.r_[query, query[:400]].astype(np.float32)
    similarity = query @ decode_codes(codes).T
    to_db, to_query = similarity.argmax(axis=1), similarity.argmax(axis=0)
    expected = [(q, k) for q, k in enumerate(to_db) if to_query[k] == q and similarity[q, k] >= 0.595]
    assert len(expected) >= 10
    for block_rows in (1, 7, 256, 1000, 5000):
        q_idx, db_idx = mutual_matches(query, codes, 0.595, block_rows=block_rows)
        assert list(zip(q_idx.tolist(), db_idx.tolist())) == expected, block_rows
        assert (q_idx < 600).all()  # a repeated row never beats its original


def test_mutual_matches_keeps_mutual_pairs_above_the_threshold():
    rng = np.random.default_rng(0)
    db = unit(rng, 50, 40)
    query = np.r_[db[[3, 7, 7]], unit(rng, 5, 40)]  # 7 twice: only one of the two is mutual
    q, d = mutual_matches(query, int8_codes(db), 0.9)
    assert list(zip(q.tolist(), d.tolist())) == [(0, 3), (1, 7)]
    assert mutual_matches(query, None, 0.9)[0].size == 0
    assert mutual_matches(query, np.zeros((0, 40), np.int8), 0.9)[0].size == 0


def test_metadata_filter_excludes_the_target(scene):
    backend, query = scene
    hits = searcher(backend).search(query, metadata_filter={"bool": {"must_not": {"term": {"metadata.group": "target"}}}})
    assert "target" not in [h.image_id for h in hits]


def _key(backend, image_id: str) -> str:
    return revision_key(image_id, backend.revisions([image_id])[image_id])


def test_locations_come_from_the_cache_and_misses_are_written_back(scene):
    backend, query = scene
    search = searcher(backend)
    search.search(query)
    key = _key(backend, "target")
    cached = search.cache.get_many(MODEL, [key])[key]
    np.testing.assert_array_equal(cached, backend.keypoints(["target"])["target"])


def test_a_write_back_racing_a_writer_keeps_the_writers_locations(scene, monkeypatch):
    """Another process rewrites 'target' while this search reads its old locations from the
    index (simulated inside the backend read): the cache must keep the rewritten ones."""
    backend, query = scene
    search = searcher(backend)
    rewritten = np.full((7, 2), 5.0, np.float32)
    read = backend.keypoints
    key = _key(backend, "target")

    def read_then_lose_the_race(image_ids):
        old = read(image_ids)
        search.cache.put_many(MODEL, {key: rewritten})  # the writer commits and caches
        return old

    monkeypatch.setattr(backend, "keypoints", read_then_lose_the_race)
    search.search(query)
    np.testing.assert_array_equal(search.cache.get_many(MODEL, [key])[key], rewritten)
    assert search.cache.get_many(MODEL, [_key(backend, i) for i in "abcd"])  # the other shortlisted images were filled


def test_a_cached_entry_of_another_revision_is_never_served(scene):
    """Stale locations cached for a previous write of 'target' (a writer's invalidation lost to
    a paused Redis) are not read: the index's revision is part of the key."""
    backend, query = scene
    search = searcher(backend)
    stale = np.zeros((len(backend.keypoints(["target"])["target"]), 2), np.float32)
    old = revision_key("target", str(int(backend.revisions(["target"])["target"]) - 1))
    search.cache.put_many(MODEL, {old: stale, "target": stale, "target@0": stale})
    assert search.search(query)[0].inliers >= 150


def test_query_without_keypoints_returns_only_global_hits(scene):
    backend, query = scene
    empty = Features("<q>", MODEL, (10, 10), np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                     np.zeros(0, np.float32), np.zeros((0, 40), np.float32), query.global_desc)
    assert searcher(backend, shortlist_mode="local").search(empty) == []
    hits = searcher(backend, shortlist_mode="hybrid").search(empty)
    assert hits[0].image_id == "target" and hits[0].inliers == 0


def test_empty_index_returns_no_hits(tmp_path, scene):
    _, query = scene
    with EmbeddedBackend(tmp_path / "empty", model_id=MODEL) as backend:
        assert searcher(backend, shortlist_mode="hybrid").search(query) == []


def test_one_to_one_keeps_the_most_similar_pair_per_keypoint():
    q = np.array([0, 0, 1, 2, 2])
    d = np.array([5, 6, 5, 7, 8])
    s = np.array([0.9, 0.8, 0.95, 0.7, 0.75])
    q_out, d_out = one_to_one(q, d, s)
    pairs = set(zip(q_out.tolist(), d_out.tolist()))
    assert pairs == {(1, 5), (2, 8)}
    assert len(set(q_out)) == len(q_out) and len(set(d_out)) == len(d_out)


def test_interleave_merges_rankings_without_duplicates():
    assert _interleave([["a", "b", "c"], ["b", "d"]], 3) == ["a", "b", "d"]
    assert _interleave([[], []], 5) == []


def _hits():
    from delf_es.types import SearchHit

    return [
        SearchHit("many-inliers", 30.0, 30, 5, 0.2),
        SearchHit("few-inliers-close-globally", 5.0, 5, 9, 0.9),
        SearchHit("just-verified", 13.0, 13, 1, 0.1),
        SearchHit("nothing-known", 0.0, 0, 0, float("nan")),
        SearchHit("chance-inliers", 11.0, 11, 3, 0.5),
    ]


@pytest.mark.parametrize(
    "rank_by, weight, expected",
    [
        ("inliers", 0.0, ["many-inliers", "just-verified", "chance-inliers", "few-inliers-close-globally", "nothing-known"]),
        # verified (>= 12 inliers) by inliers, then the rest by global similarity, unknown last
        ("verified-then-global", 0.0,
         ["many-inliers", "just-verified", "few-inliers-close-globally", "chance-inliers", "nothing-known"]),
        # 5 + 20 * 0.9 = 23 beats 11 + 20 * 0.5 = 21 and 13 + 20 * 0.1 = 15; unknown = lowest known (0.1)
        ("inliers+global", 20.0,
         ["many-inliers", "few-inliers-close-globally", "chance-inliers", "just-verified", "nothing-known"]),
    ],
)
def test_rank_by_orders_the_final_hits(rank_by, weight, expected):
    from delf_es.search import rank_hits

    settings = Settings(rank_by=rank_by, rank_global_weight=weight, min_inliers=12)
    ranked = rank_hits(_hits(), settings)
    assert [h.image_id for h in ranked] == expected
    if rank_by == "inliers+global":
        assert [h.score for h in ranked] == [34.0, 23.0, 21.0, 15.0, 2.0]
    else:
        assert [h.score for h in ranked] == [float(h.inliers) for h in ranked]


def test_unknown_global_similarity_counts_as_the_lowest_returned():
    from delf_es.search import rank_hits
    from delf_es.types import SearchHit

    hits = [SearchHit("local-only", 20.0, 20, 50, float("nan")), SearchHit("global", 0.0, 0, 0, 0.3),
            SearchHit("global-low", 0.0, 0, 0, 0.25)]
    ranked = rank_hits(hits, Settings(rank_by="inliers+global", rank_global_weight=50.0))
    # 20 + 50 * 0.25 = 32.5 > 50 * 0.3 = 15: a verified image outside the global top list is not buried
    assert [h.image_id for h in ranked] == ["local-only", "global", "global-low"]


def test_unknown_rank_by_is_refused():
    with pytest.raises(ValueError, match="rank_by"):
        Settings(rank_by="votes")


def test_unset_search_plan_is_the_backends_measured_best():
    assert Settings().search_plan() == ("hybrid", "knn")
    assert Settings(es_url="http://127.0.0.1:9200").search_plan() == ("global", "matching")
    explicit = Settings(es_url="http://127.0.0.1:9200", shortlist_mode="hybrid", correspondences="knn")
    assert explicit.search_plan() == ("hybrid", "knn")
    assert Settings(correspondences="matching").search_plan() == ("hybrid", "matching")
    with pytest.raises(ValueError):
        Settings(correspondences="nearest")


def test_the_embedded_default_plan_follows_the_index_size():
    limit = Settings().embedded_hybrid_max_images
    assert Settings().search_plan(images=limit) == ("hybrid", "knn")
    assert Settings().search_plan(images=limit + 1) == ("global", "matching")
    assert Settings(embedded_hybrid_max_images=None).search_plan(images=10**9) == ("hybrid", "knn")
    # a plan the user set is kept at any size; Elasticsearch's default does not depend on it
    assert Settings(shortlist_mode="hybrid", correspondences="knn").search_plan(images=10**9) == ("hybrid", "knn")
    assert Settings(shortlist_mode="local").search_plan(images=10**9) == ("local", "matching")
    assert Settings(es_url="http://127.0.0.1:9200").search_plan(images=1) == ("global", "matching")


@pytest.mark.parametrize("limit, knn_calls", [(5, True), (4, False)])
def test_a_searcher_over_a_larger_embedded_index_runs_no_keypoint_knn(scene, monkeypatch, limit, knn_calls):
    backend, query = scene  # five images
    calls = []
    real_knn = backend.knn
    monkeypatch.setattr(backend, "knn", lambda *a, **k: calls.append(a) or real_knn(*a, **k))
    hits = searcher(backend, embedded_hybrid_max_images=limit).search(query)
    assert hits[0].image_id == "target" and hits[0].inliers >= 150, hits[0]
    assert bool(calls) is knn_calls


# ---- verified query expansion and the scale rule ---------------------------------------------


def _axis(d, *weights):
    vector = np.zeros(d, np.float32)
    vector[: len(weights)] = weights
    return vector / np.linalg.norm(vector)


@pytest.fixture()
def twin_scene(tmp_path):
    """The query's global descriptor is e1.  'target' (cos 0.89) and its 'twin' (same keypoints,
    cos 0.29) show the query's object; four distractors sit at cos 0.5.  A global shortlist of
    two finds the target and a distractor; only the expanded query reaches the twin."""
    rng = np.random.default_rng(1)
    backend = EmbeddedBackend(tmp_path / "index", model_id=MODEL)
    kp = rng.uniform([0, 0], [640, 480], (200, 2))
    desc = unit(rng, 200, 40)
    globals_ = {"target": _axis(16, 1.0, 0.5), "twin": _axis(16, 0.3, 1.0)}
    for k, name in enumerate("abcd"):
        globals_[name] = _axis(16, *([1.0, 0.0] + [0.0] * k + [1.732]))
    records = []
    for name, vector in globals_.items():
        same = name in ("target", "twin")
        points = kp if same else rng.uniform([0, 0], [640, 480], (200, 2))
        descriptors = desc if same else unit(rng, 200, 40)
        records.append(ImageRecord(name, f"/p/{name}.jpg", {}, features(name, points, descriptors, vector), "2026-11-22T00:00:00Z"))
    backend.upsert(records)
    query = features("<query>", kp + 5.0, desc, _axis(16, 1.0))
    yield backend, query
    backend.close()


@pytest.mark.parametrize("correspondences", ["knn", "matching"])
def test_query_expansion_reaches_a_positive_the_first_shortlist_missed(twin_scene, correspondences):
    backend, query = twin_scene
    plan = {"shortlist_mode": "global", "correspondences": correspondences, "shortlist_size": 2, "qe_alpha": 0.0}
    plain = searcher(backend, query_expansion=0, **plan).search(query)
    assert [h.image_id for h in plain][0] == "target" and "twin" not in {h.image_id for h in plain}
    expanded = searcher(backend, query_expansion=1, qe_min_inliers=20, **plan).search(query)
    by_id = {h.image_id: h for h in expanded}
    assert [h.image_id for h in expanded][:2] == ["target", "twin"]
    assert by_id["twin"].inliers >= 150


def test_query_expansion_is_on_by_default_and_only_above_every_chance_match():
    # paris250 +4.5 mAP (benchmarks/results/eval/quality-qe-5.json); it changes no pair's verification.
    # A hit joins the expansion only with more inliers than any different-scene pair of the pairs check got.
    import json
    from pathlib import Path

    pairs = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/chance_inliers.json").read_text())
    assert Settings().query_expansion == 5
    assert Settings().qe_min_inliers > pairs["summary"]["false"]["max"] and pairs["false_pairs"] >= 500


def test_query_expansion_needs_a_verified_hit(twin_scene):
    backend, query = twin_scene
    plan = {"shortlist_mode": "global", "shortlist_size": 2, "qe_alpha": 0.0, "query_expansion": 1}
    hits = searcher(backend, qe_min_inliers=10_000, **plan).search(query)
    assert "twin" not in {h.image_id for h in hits}


def test_alpha_query_expansion_weights_hits_by_cosine_power():
    from delf_es.search import alpha_query_expansion

    q, hit, opposite = _axis(4, 1.0), _axis(4, 1.0, 1.0), _axis(4, -1.0)
    expected = q + (0.5**0.5) ** 3 * hit  # opposite has cos < 0: weight 0
    np.testing.assert_allclose(alpha_query_expansion(q, [hit, opposite], 3.0), expected / np.linalg.norm(expected), rtol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(q, [], 3.0), q)


def test_scale_rule_rejects_inliers_whose_pyramid_scales_disagree(tmp_path, scene):
    backend, query = scene
    plan = {"shortlist_mode": "global", "correspondences": "matching"}
    before = searcher(backend, **plan).search(query)[0]
    assert before.image_id == "target" and before.inliers >= 150
    # same scales on both sides and a zoom of ~1: every inlier is consistent
    assert searcher(backend, ransac_scale_tolerance=0.5, **plan).search(query)[0].inliers == before.inliers
    # store the target again with its keypoints claimed 4x finer (2 octaves): none agrees
    from dataclasses import replace

    stored = backend.keypoints(["target"])["target"]
    codes = backend.descriptor_codes(["target"])["target"].astype(np.float32)
    finer = Features("target", MODEL, (640, 480), stored, np.full(len(stored), 4.0, np.float32),
                     np.ones(len(stored), np.float32), codes / np.linalg.norm(codes, axis=1, keepdims=True),
                     backend.global_descriptors(["target"])["target"])
    backend.upsert([ImageRecord("target", "/photos/target.jpg", {}, finer, "2026-11-22T00:00:00Z")])
    hits = {h.image_id: h for h in searcher(backend, ransac_scale_tolerance=0.5, **plan).search(query)}
    assert hits["target"].inliers == 0
    assert {h.image_id: h for h in searcher(backend, **plan).search(query)}["target"].inliers >= 150


def test_spread_fraction_rule_checks_the_query_by_its_size_and_the_database_image_by_its_keypoints(scene):
    """The target's inliers spread ~138 px (uniform over 640 x 480) in both images."""
    from dataclasses import replace

    backend, query = scene
    plan = {"shortlist_mode": "global", "correspondences": "matching", "min_inlier_spread": 0.0}

    def target_inliers(q, fraction):
        hits = {h.image_id: h for h in searcher(backend, min_inlier_spread_fraction=fraction, **plan).search(q)}
        return hits["target"].inliers

    assert target_inliers(query, 0.2) >= 150  # 96 px needed in a 480 px short side
    assert target_inliers(query, 0.4) == 0  # 192 px needed
    # a query claimed 100 px small passes its side at 0.4 (40 px); the database image, whose
    # stored keypoints span ~640 x 480, still needs ~192 px and fails
    small = replace(query, image_size=(100, 100))
    assert target_inliers(small, 0.4) == 0 and target_inliers(small, 0.2) >= 150
