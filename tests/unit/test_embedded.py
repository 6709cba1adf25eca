"""Embedded-backend behaviour beyond the shared contract (tests/index/test_backend_contract.py):
persistence and crash recovery, the IVF mode, filter details, threads."""

from __future__ import annotations

import logging
import pickle
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest

from delf_es.errors import ImageNotFound, IndexUnavailable, ModelMismatch, UnsupportedFilter
from delf_es.index.base import ImageRecord
from delf_es.index.embedded import KEYPOINT_BITS, EmbeddedBackend, compile_filter
from delf_es.index.embedded.keypoint_index import auto_nprobe
from delf_es.index.embedded.keypoint_index import keypoint_ids as _keypoint_ids
from delf_es.types import Features

REPO = Path(__file__).resolve().parents[2]
MODEL = "synthetic-model@0000"


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _record(image_id: str, n: int = 20, seed: int = 0, metadata: dict | None = None, model_id: str = MODEL) -> ImageRecord:
    rng = np.random.default_rng(seed)
    features = Features(
        image_id=image_id,
        model_id=model_id,
        image_size=(320, 240),
        keypoints=(rng.random((n, 2)) * 200).astype(np.float32),
        scales=np.ones(n, np.float32),
        scores=np.ones(n, np.float32),
        descriptors=_unit(rng, n, 40),
        global_desc=_unit(rng, 1, 16)[0],
    )
    return ImageRecord(image_id, f"{image_id}.jpg", metadata or {}, features, "2026-11-22T00:00:00+00:00")


def _snapshots(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("keypoints.*"))


def _assert_finds_itself(backend: EmbeddedBackend, record: ImageRecord) -> None:
    neighbours = backend.knn(record.features.descriptors, 1)
    assert (neighbours.image_ids == record.image_id).all()
    np.testing.assert_array_equal(neighbours.keypoint_index, np.arange(record.features.num_keypoints))
    np.testing.assert_allclose(neighbours.similarity, 1.0, atol=1e-4)


# ---- persistence -------------------------------------------------------------------------


def test_reopen_keeps_documents_keypoints_and_search_results(tmp_path):
    records = [_record(f"img-{i}", 30, seed=i, metadata={"i": i}) for i in range(4)] + [_record("blank", 0, seed=9)]
    queries = _unit(np.random.default_rng(7), 12, 40)
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert(records)
        backend.delete(["img-3"])
        before = backend.knn(queries, 5)
        global_before = backend.global_knn(records[0].features.global_desc, 10)
    with EmbeddedBackend(tmp_path) as backend:
        assert backend.count() == 4
        assert backend.model_id == MODEL
        assert backend.get("img-1").metadata == {"i": 1}
        assert backend.get("blank").num_keypoints == 0
        with pytest.raises(ImageNotFound):
            backend.get("img-3")
        np.testing.assert_allclose(backend.keypoints(["img-2"])["img-2"], records[2].features.keypoints)
        after = backend.knn(queries, 5)
        for field in ("query_index", "image_ids", "keypoint_index"):
            np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
        np.testing.assert_allclose(after.similarity, before.similarity)
        assert backend.global_knn(records[0].features.global_desc, 10) == global_before


def test_reopen_loads_the_snapshot_when_its_generation_matches(tmp_path, caplog):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])
        backend.upsert([_record("b", 10, seed=2)])
    assert _snapshots(tmp_path) == ["keypoints.2.faiss"]
    with caplog.at_level(logging.INFO, logger="delf_es.index.embedded"):
        with EmbeddedBackend(tmp_path) as backend:
            _assert_finds_itself(backend, _record("b", 10, seed=2))
    assert "loaded keypoint index keypoints.2.faiss" in caplog.text
    assert "rebuilt" not in caplog.text


def test_refresh_checkpoints_the_index_and_removes_older_snapshots(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])
        assert _snapshots(tmp_path) == []
        backend.refresh()
        assert _snapshots(tmp_path) == ["keypoints.1.faiss"]
        backend.upsert([_record("b", 10, seed=2)])
        backend.refresh()
        assert _snapshots(tmp_path) == ["keypoints.2.faiss"]


def test_crash_after_commit_before_snapshot_rebuilds_the_index_from_sqlite(tmp_path, caplog):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 15, seed=1)])
    assert _snapshots(tmp_path) == ["keypoints.1.faiss"]
    payload = tmp_path.parent / "payload.pkl"
    payload.write_bytes(pickle.dumps([_record("b", 25, seed=2), _record("a", 5, seed=3)]))
    crash = textwrap.dedent(
        f"""
        import os, pickle
        from delf_es.index.embedded import EmbeddedBackend
        backend = EmbeddedBackend({str(tmp_path)!r})
        report = backend.upsert(pickle.load(open({str(payload)!r}, "rb")))
        assert report.ok, report
        os._exit(0)  # a crash: no close(), no snapshot
        """
    )
    subprocess.run([sys.executable, "-c", crash], cwd=REPO, check=True, timeout=120)
    assert _snapshots(tmp_path) == ["keypoints.1.faiss"]  # stale: the database is at generation 2
    with caplog.at_level(logging.INFO, logger="delf_es.index.embedded"):
        with EmbeddedBackend(tmp_path) as backend:
            assert backend.count() == 2
            assert backend.get("a").num_keypoints == 5
            _assert_finds_itself(backend, _record("b", 25, seed=2))
            _assert_finds_itself(backend, _record("a", 5, seed=3))
            assert backend.knn(_record("a", 15, seed=1).features.descriptors, 1).similarity.max() < 0.99
    assert "rebuilt keypoint index from SQLite" in caplog.text
    assert _snapshots(tmp_path) == ["keypoints.2.faiss"]


def test_stale_snapshot_with_the_same_vector_count_is_not_used(tmp_path):
    """Only the generation tells this snapshot apart: same ids, same count, old vectors."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    backend = EmbeddedBackend(live)
    try:
        backend.upsert([_record("a", 10, seed=1)])
        backend.refresh()
        backend.upsert([_record("a", 10, seed=2)])  # committed, not checkpointed
        shutil.copytree(live, crashed)  # what a crash leaves on disk: database + WAL + old snapshot
    finally:
        backend.close()
    assert _snapshots(crashed) == ["keypoints.1.faiss"]
    with EmbeddedBackend(crashed) as recovered:
        _assert_finds_itself(recovered, _record("a", 10, seed=2))


def test_unreadable_snapshot_is_ignored_and_rebuilt(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])
    (tmp_path / "keypoints.1.faiss").write_bytes(b"not a faiss index")
    with EmbeddedBackend(tmp_path) as backend:
        _assert_finds_itself(backend, _record("a", 10, seed=1))


def test_snapshot_that_disagrees_with_the_database_is_ignored(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])
        backend.refresh()
        stale = (tmp_path / "keypoints.1.faiss").read_bytes()
        backend.upsert([_record("b", 10, seed=2)])
    (tmp_path / "keypoints.2.faiss").write_bytes(stale)  # right name, wrong content
    with EmbeddedBackend(tmp_path) as backend:
        _assert_finds_itself(backend, _record("b", 10, seed=2))


def test_leftover_temporary_snapshot_is_removed_on_open(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])
    (tmp_path / "keypoints.7.faiss.tmp").write_bytes(b"half written")
    with EmbeddedBackend(tmp_path):  # a reader leaves it (a writer could be writing it) ...
        pass
    assert _snapshots(tmp_path) == ["keypoints.1.faiss"]  # ... and removes it at close when no one writes
    assert not (tmp_path / "keypoints.7.faiss.tmp").exists()


def test_failed_faiss_update_is_repaired_from_sqlite(tmp_path, monkeypatch):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])

        def broken(*args, **kwargs):
            raise RuntimeError("simulated faiss failure")

        monkeypatch.setattr(backend, "_update_index", broken)
        assert backend.upsert([_record("b", 10, seed=2)]).ok
        monkeypatch.undo()
        _assert_finds_itself(backend, _record("a", 10, seed=1))
        _assert_finds_itself(backend, _record("b", 10, seed=2))


def test_item_whose_insert_fails_keeps_its_previous_version(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("boom", 10, seed=1)])
        injector = sqlite3.connect(tmp_path / "images.sqlite3")
        injector.execute(
            "CREATE TRIGGER fail_boom BEFORE INSERT ON images WHEN NEW.image_id = 'boom'"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        injector.commit()
        injector.close()
        report = backend.upsert([_record("boom", 5, seed=2), _record("other", 5, seed=3)])
        assert report.succeeded == ["other"]
        assert [failure.item_id for failure in report.failed] == ["boom"]
        assert "injected failure" in report.failed[0].error
        assert backend.get("boom").num_keypoints == 10  # the delete of the old version was rolled back
        _assert_finds_itself(backend, _record("boom", 10, seed=1))
    with EmbeddedBackend(tmp_path) as backend:
        assert backend.get("boom").num_keypoints == 10


def test_first_item_failing_at_insert_does_not_bind_the_model(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend._db.execute(
            "CREATE TRIGGER fail_first BEFORE INSERT ON images WHEN NEW.image_id = 'first'"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        report = backend.upsert([_record("first", 5, seed=1, model_id="other-model@1"), _record("second", 5, seed=2)])
        assert report.succeeded == ["second"]
        assert backend.model_id == MODEL


# ---- model, directory, lifecycle ---------------------------------------------------------


def test_opening_with_another_model_id_raises_model_mismatch(tmp_path):
    with EmbeddedBackend(tmp_path, model_id=MODEL):
        pass
    with pytest.raises(ModelMismatch, match="other-model"):
        EmbeddedBackend(tmp_path, model_id="other-model@1")
    with EmbeddedBackend(tmp_path) as backend:  # the failed open released the directory
        assert backend.model_id == MODEL


def test_model_id_given_at_open_binds_an_empty_index(tmp_path):
    with EmbeddedBackend(tmp_path, model_id="other-model@1") as backend:
        report = backend.upsert([_record("a", 5, seed=1)])
    assert [failure.item_id for failure in report.failed] == ["a"]
    assert "other-model@1" in report.failed[0].error


def test_first_record_binds_the_model_for_the_rest_of_the_batch(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        report = backend.upsert([_record("a", 5, seed=1), _record("b", 5, seed=2, model_id="other-model@1")])
        assert report.succeeded == ["a"]
        assert [failure.item_id for failure in report.failed] == ["b"]


def test_a_second_writer_is_refused_naming_the_holder_and_readers_still_work(tmp_path):
    """Issue 15 item 10 (in one process: two instances; test_embedded_concurrency.py runs
    separate processes)."""
    import os

    from delf_es.errors import IndexLocked

    with EmbeddedBackend(tmp_path) as writer:
        writer.upsert([_record("a", 10, seed=1)])
        with EmbeddedBackend(tmp_path) as reader:
            assert reader.count() == 1 and reader.get("a").num_keypoints == 10
            with pytest.raises(IndexLocked, match=f"PID {os.getpid()}") as refused:
                reader.upsert([_record("b", 10, seed=2)])
            assert isinstance(refused.value, IndexUnavailable) and "searches and stats work" in str(refused.value)
            writer.upsert([_record("c", 10, seed=3)])
            assert reader.count() == 2 and reader.existing(["a", "b", "c"]) == {"a", "c"}  # caught up
            _assert_finds_itself(reader, _record("c", 10, seed=3))
    with EmbeddedBackend(tmp_path) as again:  # the lock died with its holder's close
        again.upsert([_record("b", 10, seed=2)])
        assert again.count() == 3


def test_operations_after_close_raise_index_unavailable(tmp_path):
    backend = EmbeddedBackend(tmp_path)
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(IndexUnavailable):
        backend.count()
    with pytest.raises(IndexUnavailable):
        backend.upsert([_record("a", 3)])
    with pytest.raises(IndexUnavailable):
        backend.knn(_unit(np.random.default_rng(0), 2, 40), 3)


def test_non_unit_descriptors_are_a_failed_item(tmp_path):
    good = _record("good", 5, seed=1)
    features = good.features
    scaled = Features(
        "scaled", MODEL, features.image_size, features.keypoints, features.scales, features.scores,
        features.descriptors * 2, features.global_desc,
    )
    with EmbeddedBackend(tmp_path) as backend:
        report = backend.upsert([ImageRecord("scaled", "s.jpg", {}, scaled, good.created_at), good])
        assert report.succeeded == ["good"]
        assert "L2-normalised" in report.failed[0].error


def test_metadata_that_is_not_json_is_a_failed_item(tmp_path):
    record = _record("a", 5, seed=1)
    bad = ImageRecord("bad", "b.jpg", {"when": object()}, record.features, record.created_at)
    nan = ImageRecord("nan", "n.jpg", {"score": float("nan")}, record.features, record.created_at)
    with EmbeddedBackend(tmp_path) as backend:
        report = backend.upsert([bad, nan, record])
        assert report.succeeded == ["a"]
        assert [failure.item_id for failure in report.failed] == ["bad", "nan"]


def test_keypoint_ids_encode_row_and_keypoint_index():
    ids = _keypoint_ids(np.array([3, 7]), np.array([2, 3]))
    np.testing.assert_array_equal(ids >> KEYPOINT_BITS, [3, 3, 7, 7, 7])
    np.testing.assert_array_equal(ids & ((1 << KEYPOINT_BITS) - 1), [0, 1, 0, 1, 2])


# ---- IVF mode ----------------------------------------------------------------------------


def test_above_exact_limit_an_ivf_index_still_finds_filters_and_deletes(tmp_path):
    records = [_record(f"img-{i}", 200, seed=i, metadata={"group": i % 3}) for i in range(12)]
    with EmbeddedBackend(tmp_path, exact_limit=1000, nprobe=2) as backend:
        backend.upsert(records[:4])
        assert isinstance(backend._index, faiss.IndexIDMap)  # 800 vectors: exact
        backend.upsert(records[4:])
        assert isinstance(backend._index, faiss.IndexIVF)  # 2400 vectors: IVF
        for record in records[::3]:
            _assert_finds_itself(backend, record)
        queries = _unit(np.random.default_rng(1), 40, 40)
        # a filtered set above exact_limit (IVF + selector) and one below (exact): k rows each, allowed only
        # k = 150 exceeds what 2 probed lists hold, so the IVF over-fetch must fall back to an exact search
        for group, expected in (({"terms": {"group": [0, 1]}}, 1600), ({"term": {"group": 2}}, 800)):
            neighbours = backend.knn(queries, 150, group)
            allowed = {r.image_id for r in records if compile_filter(group)(r.metadata)}
            assert set(neighbours.image_ids) <= allowed
            assert (np.bincount(neighbours.query_index, minlength=40) == 150).all()
            assert sum(r.features.num_keypoints for r in records if r.image_id in allowed) == expected
        backend.delete([r.image_id for r in records[1:]])
        assert isinstance(backend._index, faiss.IndexIDMap)  # shrank below exact_limit / 2: exact again
        assert set(backend.knn(queries, 300).image_ids) == {"img-0"}


def test_ivf_filtered_search_over_fetches_and_keeps_allowed_images_best_first(tmp_path, monkeypatch):
    records = [_record(f"img-{i}", 200, seed=i, metadata={"group": i % 3}) for i in range(12)]
    with EmbeddedBackend(tmp_path, exact_limit=1000) as backend:
        backend.upsert(records)
        assert isinstance(backend._index, faiss.IndexIVF)

        def no_fallback(*args, **kwargs):
            raise AssertionError("the over-fetch alone should have found k allowed results")

        monkeypatch.setattr(backend, "_search_exact_subset", no_fallback)
        group = {"terms": {"group": [0, 1]}}
        allowed = [r for r in records if r.metadata["group"] in (0, 1)]
        queries = np.concatenate([r.features.descriptors[:5] for r in records])  # 60 queries, 40 with an allowed twin
        neighbours = backend.knn(queries, 10, group)
        assert set(neighbours.image_ids) <= {r.image_id for r in allowed}
        assert (np.bincount(neighbours.query_index, minlength=60) == 10).all()
        similarity = neighbours.similarity.reshape(60, 10)
        assert (np.diff(similarity, axis=1) <= 1e-6).all()
        # the similarities are real dot products with the named keypoints
        stored = {r.image_id: r.features.descriptors for r in records}
        for row in range(0, len(neighbours), 37):
            vector = stored[neighbours.image_ids[row]][neighbours.keypoint_index[row]]
            assert float(queries[neighbours.query_index[row]] @ vector) == pytest.approx(float(neighbours.similarity[row]), abs=1e-5)
        # an allowed query finds itself first
        twins = np.flatnonzero([records[q // 5].metadata["group"] in (0, 1) for q in range(60)])
        np.testing.assert_allclose(similarity[twins, 0], 1.0, atol=1e-4)


def test_ivf_index_survives_reopen_from_its_snapshot(tmp_path):
    records = [_record(f"img-{i}", 100, seed=i) for i in range(8)]
    with EmbeddedBackend(tmp_path, exact_limit=300) as backend:
        backend.upsert(records)
    with EmbeddedBackend(tmp_path, exact_limit=300) as backend:
        assert isinstance(backend._index, faiss.IndexIVF)
        assert backend._index.nprobe == auto_nprobe(backend._index.nlist)  # nprobe unset: auto
        for record in records:
            _assert_finds_itself(backend, record)
    with EmbeddedBackend(tmp_path, exact_limit=300, nprobe=3) as backend:  # set: used as is
        assert backend._index.nprobe == 3


def test_auto_nprobe_grows_as_the_lists_to_the_power_0_7():
    assert auto_nprobe(1) == auto_nprobe(100) == 16  # never below 16
    # above the nprobe measured to reach recall@10 0.95: ~42 at 4000 lists (1000 images), ~62 at 6928 (3000)
    assert auto_nprobe(4000) == 47 and auto_nprobe(6928) == 69 and auto_nprobe(12649) == 105
    assert all(auto_nprobe(n) <= n or n < 16 for n in (16, 100, 4000))
    # SQ8 codes: ~1.35x the lists (64 reached 0.95 at 4000 lists)
    assert auto_nprobe(4000, sq8=True) == 64 and auto_nprobe(40000, sq8=True) == 317


def test_reopening_with_another_exact_limit_switches_the_structure(tmp_path):
    records = [_record(f"img-{i}", 100, seed=i) for i in range(8)]
    with EmbeddedBackend(tmp_path, exact_limit=300) as backend:
        backend.upsert(records)
        assert isinstance(backend._index, faiss.IndexIVF)
    with EmbeddedBackend(tmp_path, exact_limit=None) as backend:
        assert isinstance(backend._index, faiss.IndexIDMap)
        _assert_finds_itself(backend, records[3])
    with EmbeddedBackend(tmp_path, exact_limit=300) as backend:
        assert isinstance(backend._index, faiss.IndexIVF)


def test_ivf_with_nprobe_one_returns_k_results_for_every_query(tmp_path):
    with EmbeddedBackend(tmp_path, exact_limit=0, nprobe=1) as backend:
        backend.upsert([_record(f"img-{i}", 100, seed=i) for i in range(20)])
        assert isinstance(backend._index, faiss.IndexIVF) and backend._index.nlist > 1
        neighbours = backend.knn(_unit(np.random.default_rng(3), 30, 40), 200)
        assert (np.bincount(neighbours.query_index, minlength=30) == 200).all()


# ---- filters -----------------------------------------------------------------------------


def test_filters_accept_bare_metadata_keys(tmp_path):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 5, seed=1, metadata={"source": "web"}), _record("b", 5, seed=2)])
        hits = backend.global_knn(_record("a", 5, seed=1).features.global_desc, 5, {"term": {"source": "web"}})
        assert [image_id for image_id, _ in hits] == ["a"]


@pytest.mark.parametrize(
    "bad_filter",
    [
        {"wildcard": {"metadata.source": "we*"}},
        {"match": {"metadata.source": "web"}},
        {"term": {"metadata.a": "x", "metadata.b": "y"}},
        {"term": {"metadata.a": ["x"]}},
        {"range": {"metadata.year": {"gte": 1, "format": "yyyy"}}},
        {"bool": {"must": [{"regexp": {"metadata.a": ".*"}}]}},
        {"bool": {"minimum_should_match": "50%", "should": [{"term": {"a": 1}}]}},
        {"term": {"metadata": "x"}},
        {},
        {"term": {"a": 1}, "terms": {"b": [1]}},
        "source:web",
    ],
)
def test_unsupported_or_malformed_filter_raises_unsupported_filter(tmp_path, bad_filter):
    with EmbeddedBackend(tmp_path) as backend:  # empty: still validated
        with pytest.raises(UnsupportedFilter) as raised:
            backend.knn(_unit(np.random.default_rng(0), 2, 40), 3, bad_filter)
        assert isinstance(raised.value, ValueError)
        assert pickle.loads(pickle.dumps(raised.value)).clause == raised.value.clause
        with pytest.raises(UnsupportedFilter):
            backend.global_knn(np.ones(16, np.float32) / 4, 3, bad_filter)


def test_unsupported_clause_error_names_the_clause():
    with pytest.raises(UnsupportedFilter, match="'wildcard'") as raised:
        compile_filter({"bool": {"filter": [{"wildcard": {"a": "x*"}}]}})
    assert raised.value.clause == "wildcard"


@pytest.mark.parametrize(
    ("metadata_filter", "metadata", "expected"),
    [
        ({"term": {"metadata.year": "2020"}}, {"year": 2020}, True),  # query coerced to the stored number
        ({"term": {"metadata.code": 7}}, {"code": "7"}, True),  # ... and to the stored keyword
        ({"term": {"metadata.flag": "true"}}, {"flag": True}, True),
        ({"term": {"metadata.flag": 1}}, {"flag": True}, False),
        ({"term": {"metadata.n": True}}, {"n": 1}, False),
        ({"term": {"metadata.year": {"value": 2020, "boost": 2}}}, {"year": 2020.0}, True),
        ({"term": {"metadata.source": "Web"}}, {"source": "web"}, False),  # keywords are exact
        ({"term": {"metadata.camera.make": "Canon"}}, {"camera": {"make": "Canon"}}, True),
        ({"term": {"metadata.camera.make": "Canon"}}, {"camera.make": "Canon"}, True),
        ({"term": {"metadata.people.name": "bo"}}, {"people": [{"name": "al"}, {"name": "bo"}]}, True),
        ({"terms": {"metadata.tags": ["x", "y"]}}, {"tags": ["z", "y"]}, True),
        ({"terms": {"metadata.tags": []}}, {"tags": ["z"]}, False),
        ({"range": {"metadata.day": {"gte": "2024-01-01", "lt": "2024-02-01"}}}, {"day": "2024-01-15"}, True),
        ({"range": {"metadata.day": {"gte": "2024-01-01", "lt": "2024-02-01"}}}, {"day": "2024-02-01"}, False),
        ({"range": {"metadata.year": {"gt": "2019"}}}, {"year": 2020}, True),
        ({"range": {"metadata.year": {"lte": 2019}}}, {"year": [2025, 2018]}, True),  # any element
        ({"range": {"metadata.year": {"gte": 2000}}}, {"other": 1}, False),
        ({"range": {"metadata.year": {}}}, {"year": 1}, True),
        ({"exists": {"field": "metadata.note"}}, {"note": None}, False),
        ({"exists": {"field": "metadata.note"}}, {"note": [None]}, False),
        ({"exists": {"field": "metadata.note"}}, {"note": ""}, True),
        ({"exists": {"field": "metadata.camera"}}, {"camera": {"make": "Canon"}}, True),
        ({"bool": {}}, {}, True),
        ({"bool": {"must": {"term": {"a": 1}}, "should": {"term": {"b": 1}}}}, {"a": 1}, True),
        ({"bool": {"should": [{"term": {"a": 1}}, {"term": {"b": 1}}], "minimum_should_match": 2}}, {"a": 1}, False),
        ({"bool": {"should": [{"term": {"a": 1}}, {"term": {"b": 1}}], "minimum_should_match": "-1"}}, {"a": 1}, True),
        ({"bool": {"filter": [{"term": {"a": 1}}, {"term": {"b": 2}}]}}, {"a": 1, "b": 3}, False),
        ({"match_all": {}}, {}, True),
        ({"match_none": {}}, {"a": 1}, False),
    ],
)
def test_filter_semantics_follow_elasticsearch(metadata_filter, metadata, expected):
    assert compile_filter(metadata_filter)(metadata) is expected


# ---- threads -----------------------------------------------------------------------------


def test_searches_wait_while_a_write_updates_the_index_but_not_for_other_searches(tmp_path, monkeypatch):
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("a", 10, seed=1)])
        in_update, release = threading.Event(), threading.Event()
        original = backend._update_index

        def slow_update(*args, **kwargs):
            in_update.set()
            release.wait(10)
            return original(*args, **kwargs)

        monkeypatch.setattr(backend, "_update_index", slow_update)
        results: list = []
        writer = threading.Thread(target=lambda: backend.upsert([_record("b", 10, seed=2)]))
        writer.start()
        assert in_update.wait(10)
        reader = threading.Thread(target=lambda: results.append(backend.knn(_record("b", 10, seed=2).features.descriptors, 1)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "knn ran while faiss was half updated"
        release.set()
        writer.join(10)
        reader.join(10)
        assert (results[0].image_ids == "b").all()
        # readers do not block each other
        with backend._rw.read():
            other = threading.Thread(target=lambda: results.append(backend.count()))
            other.start()
            other.join(5)
            assert not other.is_alive()
        assert results[-1] == 2


def test_concurrent_writes_and_searches_from_threads_stay_consistent(tmp_path):
    errors: list[BaseException] = []
    with EmbeddedBackend(tmp_path) as backend:
        backend.upsert([_record("base", 20, seed=100)])
        queries = _unit(np.random.default_rng(0), 20, 40)

        def writer(offset: int) -> None:
            try:
                for batch in range(5):
                    ids = [f"w{offset}-{batch}-{i}" for i in range(4)]
                    report = backend.upsert([_record(name, 30, seed=zlib.crc32(name.encode())) for name in ids])
                    assert report.ok
                    backend.upsert([_record(ids[0], 10, seed=1)])  # replace one
                    assert backend.delete([ids[1]]).ok
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                errors.append(exc)

        def reader() -> None:
            try:
                for _ in range(30):
                    neighbours = backend.knn(queries, 5, {"bool": {"must_not": {"term": {"x": 1}}}})
                    assert (np.bincount(neighbours.query_index, minlength=20) == 5).all()
                    backend.global_knn(np.ones(16, np.float32) / 4, 3)
                    backend.count()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert backend.count() == 1 + 2 * 5 * 3
        total = sum(backend.get(image_id).num_keypoints for image_id in backend.existing(
            [f"w{o}-{b}-{i}" for o in range(2) for b in range(5) for i in range(4)] + ["base"]))
        assert backend._index.ntotal == total
