"""One contract, every backend: the ``backend`` fixture is parametrized over
``BACKEND_FACTORIES`` (tests/index/conftest.py).  Synthetic features only, no model.

Metadata keeps one type per field across images, as an Elasticsearch mapping requires.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from delf_es.errors import BulkIndexFailed, FeatureShapeError, ImageNotFound
from delf_es.index.base import Backend, BulkReport, Neighbours
from delf_es.index.codes import int8_codes

# ---- helpers ---------------------------------------------------------------------------


def _rows_per_query(neighbours: Neighbours, num_queries: int) -> np.ndarray:
    return np.bincount(neighbours.query_index, minlength=num_queries)


FILTER_IMAGES = {  # image_id -> metadata; 30 keypoints each
    "a": {"source": "flickr", "year": 2018, "tags": ["bridge", "night"], "rating": 3.5},
    "b": {"source": "flickr", "year": 2020, "tags": ["bridge"], "rating": 4.0},
    "c": {"source": "web", "year": 2021, "tags": ["tower"], "rating": 2.5},
    "d": {"source": "web", "year": 2023, "rating": 5.0},
    "e": {"source": "museum", "year": 2019, "tags": ["tower", "night"]},
    "f": {},
}
FILTER_KEYPOINTS = 30


@pytest.fixture()
def filter_records(backend, synth):
    records = [
        synth.record(image_id, FILTER_KEYPOINTS, seed=i, metadata=metadata)
        for i, (image_id, metadata) in enumerate(FILTER_IMAGES.items())
    ]
    assert backend.upsert(records, refresh=True).ok
    return records


def _assert_filter_selects(backend, records, metadata_filter, expected: set[str]) -> None:
    """knn and global_knn return exactly the ``expected`` images, and no fewer results than exist."""
    queries = np.concatenate([r.features.descriptors for r in records])
    total = len(queries)
    # k = every stored keypoint: each query must get exactly the keypoints of the expected images.
    neighbours = backend.knn(queries, total, metadata_filter)
    assert set(neighbours.image_ids) == expected
    assert (_rows_per_query(neighbours, total) == FILTER_KEYPOINTS * len(expected)).all()
    # small k: still k rows per query when enough matching keypoints exist, each allowed.
    neighbours = backend.knn(queries, 5, metadata_filter)
    assert set(neighbours.image_ids) <= expected
    assert (_rows_per_query(neighbours, total) == (5 if expected else 0)).all()
    # a query descriptor of an allowed image finds itself first.
    for record in records:
        if record.image_id in expected:
            own = backend.knn(record.features.descriptors, 1, metadata_filter)
            assert (own.image_ids == record.image_id).all()
            np.testing.assert_array_equal(own.keypoint_index, np.arange(FILTER_KEYPOINTS))
    hits = backend.global_knn(records[0].features.global_desc, 100, metadata_filter)
    assert {image_id for image_id, _ in hits} == expected


# ---- basics ----------------------------------------------------------------------------


def test_backend_satisfies_protocol(backend):
    assert isinstance(backend, Backend)


def test_empty_index_counts_nothing_and_finds_nothing(backend, synth):
    assert backend.count() == 0
    assert backend.existing(["a", "b"]) == set()
    assert backend.keypoints(["a"]) == {}
    assert backend.global_knn(synth.unit_rows(np.random.default_rng(0), 1, synth.GLOBAL_DIM)[0], 5) == []


def test_knn_on_empty_index_returns_empty_neighbours(backend, synth):
    neighbours = backend.knn(synth.unit_rows(np.random.default_rng(0), 4, synth.LOCAL_DIM), 10)
    assert len(neighbours) == 0
    assert neighbours.query_index.dtype == np.int64
    assert neighbours.keypoint_index.dtype == np.int64
    assert neighbours.similarity.dtype == np.float32
    assert neighbours.image_ids.dtype == object


def test_upsert_then_get_round_trips_the_document(backend, synth):
    metadata = {
        "source": "flickr",
        "year": 2021,
        "rating": 4.5,
        "public": True,
        "tags": ["bridge", "night"],
        "camera": {"make": "Canon", "iso": 200},
        "note": None,
    }
    record = synth.record(
        "img-1", 37, seed=3, metadata=metadata, path="/photos/été 1.jpg", created_at="2026-01-02T03:04:05+00:00",
        size=(800, 533),
    )
    report = backend.upsert([record], refresh=True)
    assert report == BulkReport(succeeded=["img-1"], failed=[])
    stored = backend.get("img-1")
    assert stored.image_id == "img-1"
    assert stored.path == "/photos/été 1.jpg"
    assert stored.metadata == metadata
    assert (stored.width, stored.height) == (800, 533)
    assert stored.num_keypoints == 37
    assert stored.model_id == synth.MODEL_ID
    assert stored.created_at == "2026-01-02T03:04:05+00:00"
    assert backend.count() == 1
    assert backend.existing(["img-1", "other"]) == {"img-1"}


def test_keypoints_returns_stored_locations_and_leaves_out_unknown_ids(backend, synth):
    records = [synth.record("a", 20, seed=1), synth.record("b", 5, seed=2)]
    backend.upsert(records, refresh=True)
    locations = backend.keypoints(["a", "b", "missing"])
    assert set(locations) == {"a", "b"}
    for record in records:
        assert locations[record.image_id].dtype == np.float32
        np.testing.assert_allclose(locations[record.image_id], record.features.keypoints)


def test_descriptor_codes_are_the_int8_codes_of_the_stored_descriptors(backend, synth):
    records = [synth.record("a", 20, seed=1), synth.record("b", 5, seed=2), synth.record("blank", 0, seed=3)]
    backend.upsert(records, refresh=True)
    codes = backend.descriptor_codes(["a", "b", "blank", "missing"])
    assert set(codes) == {"a", "b", "blank"}
    for record in records[:2]:
        assert codes[record.image_id].dtype == np.int8
        np.testing.assert_array_equal(codes[record.image_id], int8_codes(record.features.descriptors))
    assert codes["blank"].shape[0] == 0
    replaced = synth.record("a", 7, seed=9)
    backend.upsert([replaced], refresh=True)
    np.testing.assert_array_equal(backend.descriptor_codes(["a"])["a"], int8_codes(replaced.features.descriptors))


def test_keypoint_scales_are_the_stored_pyramid_scales_in_keypoint_order(backend, synth):
    from dataclasses import replace

    record = synth.record("a", 12, seed=1)
    scales = np.array([0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0] * 2, np.float32)[:12]
    record = replace(record, features=replace(record.features, scales=scales))
    backend.upsert([record, synth.record("blank", 0, seed=3)], refresh=True)
    found = backend.keypoint_scales(["a", "blank", "missing"])
    assert set(found) == {"a", "blank"}
    assert found["a"].dtype == np.float32
    np.testing.assert_array_equal(found["a"], scales)
    assert found["blank"].shape == (0,)


def test_global_descriptors_are_the_stored_vectors_and_leave_out_unknown_ids(backend, synth):
    records = [synth.record("a", 5, seed=1), synth.record("b", 5, seed=2)]
    backend.upsert(records, refresh=True)
    found = backend.global_descriptors(["a", "b", "missing"])
    assert set(found) == {"a", "b"}
    for record in records:
        assert found[record.image_id].dtype == np.float32
        np.testing.assert_allclose(found[record.image_id], record.features.global_desc, atol=1e-6)


def test_get_unknown_id_raises_image_not_found(backend):
    with pytest.raises(ImageNotFound):
        backend.get("never-added")


# ---- knn -------------------------------------------------------------------------------


def test_knn_finds_each_stored_keypoint_as_its_own_nearest_neighbour(backend, synth):
    records = [synth.record("a", 300, seed=1), synth.record("b", 120, seed=2), synth.record("c", 1, seed=3)]
    backend.upsert(records, refresh=True)
    for record in records:
        n = record.features.num_keypoints
        neighbours = backend.knn(record.features.descriptors, 1)
        np.testing.assert_array_equal(neighbours.query_index, np.arange(n))
        assert (neighbours.image_ids == record.image_id).all()
        np.testing.assert_array_equal(neighbours.keypoint_index, np.arange(n))
        np.testing.assert_allclose(neighbours.similarity, 1.0, atol=1e-4)
        assert (neighbours.similarity <= 1.0).all()


def test_knn_returns_k_neighbours_per_query_best_first(backend, synth):
    records = [synth.record(f"img-{i}", 40, seed=i) for i in range(5)]
    backend.upsert(records, refresh=True)
    queries = synth.unit_rows(np.random.default_rng(99), 6, synth.LOCAL_DIM)
    neighbours = backend.knn(queries, 7)
    np.testing.assert_array_equal(neighbours.query_index, np.repeat(np.arange(6), 7))
    similarity = neighbours.similarity.reshape(6, 7)
    assert (np.diff(similarity, axis=1) <= 1e-6).all()
    # the similarities are the true top 7 cosines, to within the stored precision: the
    # Elasticsearch backend stores int8 codes (cosines within 0.01, tests/unit/test_int8_codes.py)
    stored = np.concatenate([record.features.descriptors for record in records])
    expected = np.sort(queries @ stored.T, axis=1)[:, ::-1][:, :7]
    exact = "Embedded" in type(backend).__name__
    np.testing.assert_allclose(similarity, expected, atol=1e-5 if exact else 0.01)


def test_knn_returns_fewer_rows_when_fewer_keypoints_than_k_exist(backend, synth):
    backend.upsert([synth.record("tiny", 3, seed=1)], refresh=True)
    neighbours = backend.knn(synth.unit_rows(np.random.default_rng(0), 4, synth.LOCAL_DIM), 10)
    assert (_rows_per_query(neighbours, 4) == 3).all()


def test_knn_with_zero_query_descriptors_returns_empty_neighbours(backend, synth):
    backend.upsert([synth.record("a", 10, seed=1)], refresh=True)
    assert len(backend.knn(np.zeros((0, synth.LOCAL_DIM), np.float32), 5)) == 0


def test_knn_rejects_query_descriptors_of_another_dimension(backend, synth):
    backend.upsert([synth.record("a", 10, seed=1)], refresh=True)
    with pytest.raises(FeatureShapeError):
        backend.knn(synth.unit_rows(np.random.default_rng(0), 3, synth.LOCAL_DIM + 8), 5)


# ---- replace and delete ----------------------------------------------------------------


def test_reupserting_an_id_replaces_its_keypoints_without_duplicating(backend, synth):
    old = synth.record("a", 100, seed=1, metadata={"version": 1})
    new = synth.record("a", 60, seed=2, metadata={"version": 2})
    backend.upsert([old], refresh=True)
    for _ in range(3):
        assert backend.upsert([new], refresh=True).ok
    assert backend.count() == 1
    stored = backend.get("a")
    assert stored.num_keypoints == 60
    assert stored.metadata == {"version": 2}
    np.testing.assert_allclose(backend.keypoints(["a"])["a"], new.features.keypoints)
    # old descriptors are gone: none of them finds an (almost) identical vector any more
    assert backend.knn(old.features.descriptors, 1).similarity.max() < 0.99
    found = backend.knn(new.features.descriptors, 1)
    np.testing.assert_array_equal(found.keypoint_index, np.arange(60))
    np.testing.assert_allclose(found.similarity, 1.0, atol=1e-4)
    # each new keypoint is stored exactly once: its second neighbour is another keypoint
    second = backend.knn(new.features.descriptors, 2).similarity.reshape(60, 2)[:, 1]
    assert second.max() < 0.99


def test_reupserting_an_id_twice_in_one_batch_keeps_the_last(backend, synth):
    first, last = synth.record("a", 10, seed=1), synth.record("a", 20, seed=2)
    backend.upsert([first, last], refresh=True)
    assert backend.count() == 1
    assert backend.get("a").num_keypoints == 20
    assert len(backend.knn(first.features.descriptors, 30)) == 10 * 20


def test_delete_removes_the_image_from_count_get_and_knn(backend, synth):
    records = [synth.record(name, 25, seed=i) for i, name in enumerate("abc")]
    backend.upsert(records, refresh=True)
    report = backend.delete(["b"], refresh=True)
    assert report == BulkReport(succeeded=["b"], failed=[])
    assert backend.count() == 2
    assert backend.existing(["a", "b", "c"]) == {"a", "c"}
    with pytest.raises(ImageNotFound):
        backend.get("b")
    assert backend.keypoints(["b"]) == {}
    neighbours = backend.knn(records[1].features.descriptors, 50)
    assert "b" not in set(neighbours.image_ids)
    assert (_rows_per_query(neighbours, 25) == 50).all()
    assert "b" not in {image_id for image_id, _ in backend.global_knn(records[1].features.global_desc, 10)}


def test_delete_unknown_id_is_a_failed_item_and_others_are_deleted(backend, synth):
    backend.upsert([synth.record("a", 5, seed=1)], refresh=True)
    report = backend.delete(["a", "nope"], refresh=True)
    assert report.succeeded == ["a"]
    assert [failure.item_id for failure in report.failed] == ["nope"]
    assert report.failed[0].error
    assert not report.ok
    assert backend.count() == 0
    assert len(backend.knn(synth.unit_rows(np.random.default_rng(0), 2, synth.LOCAL_DIM), 3)) == 0


def test_deleted_id_can_be_added_again(backend, synth):
    backend.upsert([synth.record("a", 5, seed=1)], refresh=True)
    backend.delete(["a"], refresh=True)
    again = synth.record("a", 7, seed=2)
    assert backend.upsert([again], refresh=True).ok
    assert backend.get("a").num_keypoints == 7
    np.testing.assert_array_equal(backend.knn(again.features.descriptors, 1).keypoint_index, np.arange(7))


# ---- zero keypoints and global search --------------------------------------------------


def test_image_with_zero_keypoints_is_stored_and_found_by_global_knn_only(backend, synth):
    blank = synth.record("blank", 0, seed=1)
    backend.upsert([blank, synth.record("other", 10, seed=2)], refresh=True)
    stored = backend.get("blank")
    assert stored.num_keypoints == 0
    assert backend.keypoints(["blank"])["blank"].shape == (0, 2)
    assert "blank" not in set(backend.knn(synth.unit_rows(np.random.default_rng(0), 5, synth.LOCAL_DIM), 20).image_ids)
    best_id, best_score = backend.global_knn(blank.features.global_desc, 1)[0]
    assert best_id == "blank"
    assert best_score == pytest.approx(1.0, abs=1e-5)


def test_global_knn_ranks_images_by_cosine(backend, synth):
    dim = synth.GLOBAL_DIM
    e1, e2 = np.eye(dim, dtype=np.float32)[:2]
    cosines = {"far": -0.3, "best": 0.9, "mid": 0.5, "low": 0.1}
    records = [
        synth.record(name, 5, seed=i, global_desc=c * e1 + np.sqrt(1 - c * c) * e2)
        for i, (name, c) in enumerate(cosines.items())
    ]
    backend.upsert(records, refresh=True)
    hits = backend.global_knn(e1, 3)
    assert [image_id for image_id, _ in hits] == ["best", "mid", "low"]
    np.testing.assert_allclose([score for _, score in hits], [0.9, 0.5, 0.1], atol=1e-5)
    assert [image_id for image_id, _ in backend.global_knn(e1, 10)] == ["best", "mid", "low", "far"]


# ---- metadata filters ------------------------------------------------------------------


def test_term_filter_restricts_results_to_matching_images(backend, filter_records):
    _assert_filter_selects(backend, filter_records, {"term": {"metadata.source": "flickr"}}, {"a", "b"})


def test_term_filter_matches_any_element_of_an_array(backend, filter_records):
    _assert_filter_selects(backend, filter_records, {"term": {"metadata.tags": "night"}}, {"a", "e"})


def test_terms_filter_matches_any_listed_value(backend, filter_records):
    _assert_filter_selects(backend, filter_records, {"terms": {"metadata.source": ["web", "museum"]}}, {"c", "d", "e"})


def test_range_filter_applies_its_bounds(backend, filter_records):
    _assert_filter_selects(backend, filter_records, {"range": {"metadata.year": {"gte": 2019, "lt": 2021}}}, {"b", "e"})
    _assert_filter_selects(backend, filter_records, {"range": {"metadata.rating": {"gt": 3.5}}}, {"b", "d"})


def test_exists_filter_keeps_images_having_the_field(backend, filter_records):
    _assert_filter_selects(backend, filter_records, {"exists": {"field": "metadata.tags"}}, {"a", "b", "c", "e"})


def test_bool_must_not_filter_excludes_matching_images(backend, filter_records):
    _assert_filter_selects(
        backend, filter_records, {"bool": {"must_not": [{"term": {"metadata.source": "flickr"}}]}}, {"c", "d", "e", "f"}
    )


def test_bool_filter_combines_filter_must_not_and_should(backend, filter_records):
    query = {
        "bool": {
            "filter": [{"terms": {"metadata.tags": ["bridge", "tower"]}}],
            "must_not": {"term": {"metadata.source": "museum"}},
            "should": [{"range": {"metadata.year": {"gte": 2021}}}, {"term": {"metadata.tags": "night"}}],
            "minimum_should_match": 1,
        }
    }
    _assert_filter_selects(backend, filter_records, query, {"a", "c"})


def test_bool_should_alone_requires_one_match(backend, filter_records):
    query = {"bool": {"should": [{"term": {"metadata.year": 2023}}, {"term": {"metadata.tags": "bridge"}}]}}
    _assert_filter_selects(backend, filter_records, query, {"a", "b", "d"})


def test_filter_matching_nothing_returns_no_results(backend, filter_records):
    _assert_filter_selects(backend, filter_records, {"term": {"metadata.source": "nowhere"}}, set())


def test_filter_returns_k_results_from_a_small_matching_set(backend, filter_records, synth):
    """Queries far from the only allowed image still get k results, all from it."""
    queries = synth.unit_rows(np.random.default_rng(5), 50, synth.LOCAL_DIM)
    neighbours = backend.knn(queries, 10, {"term": {"metadata.year": 2023}})
    assert set(neighbours.image_ids) == {"d"}
    assert (_rows_per_query(neighbours, 50) == 10).all()


def test_knn_restricted_to_image_ids_returns_only_those_images(backend, filter_records, synth):
    queries = np.concatenate([r.features.descriptors[:4] for r in filter_records])  # 24 queries
    neighbours = backend.knn(queries, 40, image_ids=["b", "d", "not-indexed"])
    assert set(neighbours.image_ids) == {"b", "d"}
    assert (_rows_per_query(neighbours, 24) == 40).all()
    own = backend.knn(filter_records[1].features.descriptors, 1, image_ids=iter(["b"]))
    np.testing.assert_array_equal(own.keypoint_index, np.arange(FILTER_KEYPOINTS))
    assert len(backend.knn(queries, 5, image_ids=[])) == 0
    assert len(backend.knn(queries, 5, image_ids=["not-indexed"])) == 0


def test_knn_image_ids_and_metadata_filter_both_apply(backend, filter_records):
    queries = np.concatenate([r.features.descriptors[:4] for r in filter_records])
    neighbours = backend.knn(queries, 100, {"term": {"metadata.source": "web"}}, image_ids=["a", "b", "c"])
    assert set(neighbours.image_ids) == {"c"}
    assert (_rows_per_query(neighbours, 24) == FILTER_KEYPOINTS).all()


# ---- rejected items --------------------------------------------------------------------


def test_upsert_with_another_model_id_is_a_failed_item(backend, synth):
    backend.upsert([synth.record("a", 10, seed=1)], refresh=True)
    report = backend.upsert(
        [synth.record("b", 10, seed=2, model_id="other-model@ffff"), synth.record("c", 10, seed=3)], refresh=True
    )
    assert report.succeeded == ["c"]
    assert [failure.item_id for failure in report.failed] == ["b"]
    assert "model" in report.failed[0].error.lower()
    assert backend.existing(["a", "b", "c"]) == {"a", "c"}
    with pytest.raises(ImageNotFound):
        backend.get("b")


def test_upsert_with_another_descriptor_dimension_fails_only_that_item(backend, synth):
    backend.upsert([synth.record("a", 10, seed=1)], refresh=True)
    wrong = synth.record("b", 10, seed=2, local_dim=synth.LOCAL_DIM - 8)
    report = backend.upsert([wrong, synth.record("c", 10, seed=3)], refresh=True)
    assert report.succeeded == ["c"]
    assert [failure.item_id for failure in report.failed] == ["b"]
    assert backend.count() == 2
    assert "b" not in set(backend.knn(synth.unit_rows(np.random.default_rng(0), 3, synth.LOCAL_DIM), 30).image_ids)


def test_failed_replacement_keeps_the_previous_version(backend, synth):
    original = synth.record("a", 10, seed=1)
    backend.upsert([original], refresh=True)
    report = backend.upsert([synth.record("a", 10, seed=2, model_id="other-model@ffff")], refresh=True)
    assert [failure.item_id for failure in report.failed] == ["a"]
    assert backend.get("a").model_id == synth.MODEL_ID
    np.testing.assert_allclose(backend.knn(original.features.descriptors, 1).similarity, 1.0, atol=1e-4)


def test_bulk_report_lists_each_failed_item_with_its_error(backend, synth):
    backend.upsert([synth.record("seed", 5, seed=0)], refresh=True)
    report = backend.upsert(
        [
            synth.record("good-1", 5, seed=1),
            synth.record("bad-model", 5, seed=2, model_id="other-model@ffff"),
            synth.record("bad-local", 5, seed=3, local_dim=synth.LOCAL_DIM + 1),
            synth.record("good-2", 5, seed=4),
            synth.record("bad-global", 5, seed=5, global_dim=synth.GLOBAL_DIM + 3),
        ],
        refresh=True,
    )
    assert report.succeeded == ["good-1", "good-2"]
    assert [failure.item_id for failure in report.failed] == ["bad-model", "bad-local", "bad-global"]
    assert all(isinstance(failure.error, str) and failure.error for failure in report.failed)
    assert len({failure.error for failure in report.failed}) == 3
    assert backend.count() == 3


# ---- errors ----------------------------------------------------------------------------


def test_exceptions_raised_by_the_backend_survive_pickling(backend, synth):
    backend.upsert([synth.record("a", 5, seed=1)], refresh=True)
    raised = []
    with pytest.raises(ImageNotFound) as not_found:
        backend.get("missing")
    raised.append(not_found.value)
    with pytest.raises(FeatureShapeError) as bad_shape:
        backend.knn(np.zeros((2, 3), np.float32), 5)
    raised.append(bad_shape.value)
    report = backend.delete(["missing"])
    raised.append(BulkIndexFailed("1 item failed", report.failed))
    for exc in raised:
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc)
        assert str(copy) == str(exc)
        assert copy.args == exc.args
    assert pickle.loads(pickle.dumps(raised[-1])).failures == report.failed


# ---- search on top of the backend -----------------------------------------------------------


def test_verified_query_expansion_reaches_an_image_the_first_shortlist_missed(backend, synth):
    # The query's global descriptor is e1; 'target' (cos 0.9) and its 'twin' (cos 0.3, the same
    # keypoints and descriptors) show the query's object, four distractors sit at cos 0.5.  A
    # global shortlist of two holds the target and a distractor; only the query expanded with the
    # verified target (global vector read back from this backend) reaches the twin.
    from delf_es.cache import MemoryLocationCache
    from delf_es.search import Searcher
    from delf_es.settings import Settings

    e1, e2, e3 = np.eye(synth.GLOBAL_DIM, dtype=np.float32)[:3]
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)  # noqa: E731
    vectors = {"target": unit(0.9 * e1 + 0.436 * e2), "twin": unit(0.3 * e1 + 0.954 * e2)}
    vectors.update({name: unit(0.5 * e1 + 0.866 * e3) for name in "abcd"})
    records = [synth.record(name, 200, seed=7 if name in ("target", "twin") else 20 + i, global_desc=vector)
               for i, (name, vector) in enumerate(vectors.items())]
    backend.upsert(records, refresh=True)
    same = synth.features("<query>", 200, seed=7, global_desc=e1)
    query = dataclasses.replace(same, keypoints=same.keypoints + 5.0)
    plan = dict(shortlist_mode="global", correspondences="matching", shortlist_size=2, ransac_px=4.0,
                qe_alpha=0.0, qe_min_inliers=20)

    def search(expansion: int) -> dict:
        settings = Settings(**plan, query_expansion=expansion)
        return {h.image_id: h for h in Searcher(backend, MemoryLocationCache(), settings, synth.MODEL_ID).search(query)}

    assert "target" in search(0) and "twin" not in search(0)
    expanded = search(1)
    assert expanded["target"].inliers >= 150 and expanded["twin"].inliers >= 150
