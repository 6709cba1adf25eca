"""The embedded keypoint index's structure chosen by size (exact flat, IVF, HNSW-quantized IVF, SQ8
codes), its rebuild streamed from SQLite in chunks, writes after a rebuild, snapshots, recall.

Small synthetic data (no model): descriptors are unit vectors around a few hundred centres, so
nearest neighbours are meaningful and an approximate index can miss some."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from delf_es.errors import ConfigurationError
from delf_es.index.base import ImageRecord
from delf_es.index.embedded import EmbeddedBackend
from delf_es.index.embedded import keypoint_index as keypoint_index_module
from delf_es.index.embedded.structure import (TRAIN_POINTS_PER_IMAGE, KeypointStructure, choose_structure, ivf_nlist,
                                              new_index, structure_of, training_picks)
from delf_es.types import Features

MODEL = "synthetic-model@0000"
CENTRES = np.random.default_rng(123).standard_normal((300, 40)).astype(np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _descriptors(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _unit(CENTRES[rng.integers(0, len(CENTRES), n)] + rng.standard_normal((n, 40)))


def _record(image_id: str, n: int = 100, seed: int = 0) -> ImageRecord:
    rng = np.random.default_rng(seed + 10_000)
    features = Features(image_id=image_id, model_id=MODEL, image_size=(320, 240),
                        keypoints=(rng.random((n, 2)) * 200).astype(np.float32), scales=np.ones(n, np.float32),
                        scores=np.ones(n, np.float32), descriptors=_descriptors(seed, n),
                        global_desc=_unit(rng.standard_normal((1, 16)))[0])
    return ImageRecord(image_id, f"{image_id}.jpg", {}, features, "2026-12-01T00:00:00+00:00")


def _records(count: int, n: int = 100, start: int = 0) -> list[ImageRecord]:
    return [_record(f"img-{i}", n, seed=i) for i in range(start, start + count)]


def _pairs(backend: EmbeddedBackend, queries: np.ndarray, k: int) -> list[tuple[int, str, int]]:
    found = backend.knn(queries, k)
    return list(zip(found.query_index.tolist(), found.image_ids.tolist(), found.keypoint_index.tolist()))


# ---- the structure chosen by size --------------------------------------------------------


def test_structure_is_exact_up_to_the_limit_then_ivf_then_hnsw_quantized_then_sq8():
    assert choose_structure(200_000, 200_000) == KeypointStructure()  # at the limit: still exact
    assert choose_structure(10**9, None) == KeypointStructure()  # None: always exact
    assert choose_structure(1_000_000, 200_000, sq8_from=None) == KeypointStructure(4000, False, False)
    assert choose_structure(10_000_000, 200_000, sq8_from=None) == KeypointStructure(12649, True, False)
    assert choose_structure(10_000_000, 200_000, sq8_from=10_000_000) == KeypointStructure(12649, True, True)
    assert choose_structure(9_999_999, 200_000, sq8_from=10_000_000).sq8 is False
    assert choose_structure(100_000_000, 200_000).factory == "IVF40000_HNSW32,SQ8"
    assert choose_structure(1_000_000, 0, hnsw_from=4000).factory.startswith("IVF4000_HNSW32,")
    assert choose_structure(1_000_000, 0, hnsw_from=4001).factory.startswith("IVF4000,")
    assert ivf_nlist(100) == 2  # too few points for 4 sqrt(n) lists: >= 39 per list


@pytest.mark.parametrize("structure", [KeypointStructure(), KeypointStructure(8), KeypointStructure(8, True),
                                       KeypointStructure(8, False, True), KeypointStructure(8, True, True)])
def test_structure_of_a_built_index_is_the_structure_it_was_built_from(structure):
    assert structure_of(new_index(structure, 40)) == structure


def test_backend_builds_the_structure_its_size_calls_for(tmp_path):
    records = _records(12)  # 1200 vectors
    with EmbeddedBackend(tmp_path / "flat", exact_limit=2000) as backend:
        backend.upsert(records)
        assert structure_of(backend._index) == KeypointStructure()
    with EmbeddedBackend(tmp_path / "ivf", exact_limit=500, sq8_from=None) as backend:
        backend.upsert(records)
        assert structure_of(backend._index) == KeypointStructure(ivf_nlist(1200))
    with EmbeddedBackend(tmp_path / "sq8", exact_limit=500, sq8_from=1000, hnsw_from=2) as backend:
        backend.upsert(records)
        assert structure_of(backend._index) == KeypointStructure(ivf_nlist(1200), True, True)
        assert isinstance(faiss.downcast_index(backend._index.quantizer), faiss.IndexHNSWFlat)


def test_bad_structure_thresholds_are_refused(tmp_path):
    with pytest.raises(ConfigurationError):
        EmbeddedBackend(tmp_path, sq8_from=-1)
    with pytest.raises(ConfigurationError):
        EmbeddedBackend(tmp_path, hnsw_from=0)


def test_training_picks_span_many_images_deterministically_and_take_everything_when_short():
    counts = np.array([1000] * 200 + [0] * 5)
    images, picks = training_picks(counts, 4000, seed=0)
    assert sum(len(p) for p in picks) >= 4000
    assert len(images) >= 4000 // TRAIN_POINTS_PER_IMAGE and (np.diff(images) > 0).all()
    assert all(len(p) <= TRAIN_POINTS_PER_IMAGE and (np.diff(p) > 0).all() and p.max() < 1000 for p in picks)
    assert not set(images.tolist()) & set(range(200, 205))  # images without keypoints give none
    again = training_picks(counts, 4000, seed=0)
    assert (again[0] == images).all() and all((a == b).all() for a, b in zip(again[1], picks))
    few, every = training_picks(np.array([3, 0, 2]), 100)
    assert few.tolist() == [0, 2] and [p.tolist() for p in every] == [[0, 1, 2], [0, 1]]
    # few images with many keypoints: more than TRAIN_POINTS_PER_IMAGE from each
    assert sum(len(p) for p in training_picks(np.array([1000] * 10), 2000)[1]) >= 2000


# ---- the rebuild, streamed in chunks ----------------------------------------------------


@pytest.mark.parametrize("thresholds", [dict(exact_limit=None), dict(exact_limit=500, sq8_from=None),
                                        dict(exact_limit=500, sq8_from=0, hnsw_from=2)])
def test_chunked_rebuild_gives_the_same_results_as_a_one_shot_build(tmp_path, thresholds):
    queries = _descriptors(999, 50)
    with EmbeddedBackend(tmp_path, **thresholds) as backend:
        backend.upsert(_records(15, n=120))
        backend.delete(["img-3"])  # a hole in the rows
        added: list[int] = []
        original = keypoint_index_module.new_index

        def recording(structure, dim):  # records the size of every add of the rebuild
            index = original(structure, dim)
            add = index.add_with_ids
            index.add_with_ids = lambda x, ids: (added.append(len(x)), add(x, ids))[1]
            return index

        keypoint_index_module.new_index = recording
        try:
            backend._rebuild_index(chunk_vectors=10**9)
            one_shot = (_pairs(backend, queries, 10), backend.knn(queries, 10).similarity)
            assert added == [14 * 120]
            added.clear()
            backend._rebuild_index(chunk_vectors=250)  # 3 images a chunk
        finally:
            keypoint_index_module.new_index = original
        assert added == [360, 360, 360, 360, 240]  # never the whole matrix at once
        assert backend._index.ntotal == 14 * 120
        assert _pairs(backend, queries, 10) == one_shot[0]
        np.testing.assert_array_equal(backend.knn(queries, 10).similarity, one_shot[1])


def test_adds_and_removes_after_a_rebuild_reach_the_hnsw_sq8_index(tmp_path):
    with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=0, hnsw_from=2) as backend:
        backend.upsert(_records(10))
        trained = backend._ivf_trained_on
        backend.upsert(_records(3, start=10))  # below 4x the training: added, not retrained
        backend.delete(["img-0", "img-11"])
        assert backend._ivf_trained_on == trained and structure_of(backend._index).sq8
        assert backend._index.ntotal == 11 * 100
        new = _record("img-12", seed=12).features.descriptors
        assert set(backend.knn(new, 1).image_ids) == {"img-12"}  # SQ8: the stored code's nearest is itself
        gone = set(backend.knn(np.concatenate([_record("img-0", seed=0).features.descriptors,
                                               _record("img-11", seed=11).features.descriptors]), 5).image_ids)
        assert not gone & {"img-0", "img-11"}
        backend.upsert(_records(40, start=13))  # past 4x the training: retrained with more lists
        assert backend._ivf_trained_on == 51 * 100 and backend._index.nlist == ivf_nlist(5100)


def test_hnsw_sq8_index_reloads_from_its_snapshot_with_the_same_results(tmp_path):
    queries = _descriptors(5, 40)
    with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=0, hnsw_from=2) as backend:
        backend.upsert(_records(12))
        before = (_pairs(backend, queries, 10), backend.knn(queries, 10).similarity)
        structure = structure_of(backend._index)
    rebuilt = []
    original = EmbeddedBackend._rebuild_index
    EmbeddedBackend._rebuild_index = lambda self, *a, **k: (rebuilt.append(1), original(self, *a, **k))[1]
    try:
        with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=0, hnsw_from=2) as backend:
            assert rebuilt == []  # loaded, not rebuilt
            assert structure_of(backend._index) == structure
            assert _pairs(backend, queries, 10) == before[0]
            np.testing.assert_array_equal(backend.knn(queries, 10).similarity, before[1])
    finally:
        EmbeddedBackend._rebuild_index = original


# ---- recall against exact search --------------------------------------------------------


def _recall(backend: EmbeddedBackend, queries: np.ndarray, stored: dict[str, np.ndarray], k: int = 10) -> float:
    ids = sorted(stored)
    matrix = np.concatenate([stored[i] for i in ids])
    owner = [(i, kp) for i in ids for kp in range(len(stored[i]))]
    _, exact = faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT)
    found: dict[int, set] = {}
    for q, image_id, kp in _pairs(backend, queries, k):
        found.setdefault(q, set()).add((image_id, kp))
    return float(np.mean([len({owner[j] for j in exact[q]} & found.get(q, set())) / k for q in range(len(queries))]))


def test_hnsw_sq8_recall_against_exact_search_reaches_0_9_at_auto_nprobe_and_drops_at_one_probe(tmp_path):
    records = _records(60)  # 6000 vectors, 78 lists
    stored = {r.image_id: r.features.descriptors for r in records}
    queries = _descriptors(4242, 200)
    with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=0, hnsw_from=2) as backend:
        backend.upsert(records)
        assert structure_of(backend._index) == KeypointStructure(ivf_nlist(6000), True, True)
        assert _recall(backend, queries, stored) >= 0.9
        backend._index.nprobe = 1
        assert _recall(backend, queries, stored) < 0.8  # the measure tells an index that misses apart


def test_hnsw_quantizer_searches_as_many_lists_as_nprobe_asks(tmp_path):
    """faiss's HNSW quantizer would search with efSearch 16 whatever nprobe says: with every list
    probed, an HNSW-quantized float IVF must equal exact search."""
    records = _records(40)  # 4000 vectors, 64 lists
    stored = {r.image_id: r.features.descriptors for r in records}
    queries = _descriptors(77, 100)
    with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=None, hnsw_from=2) as backend:
        backend.upsert(records)
        index = backend._index
        assert structure_of(index) == KeypointStructure(ivf_nlist(4000), True, False)
        assert faiss.downcast_index(index.quantizer).hnsw.efSearch == 16  # adds keep the cheap default
        index.nprobe = index.nlist
        assert _recall(backend, queries, stored) == 1.0


def test_sq8_index_gets_the_sq8_auto_nprobe_when_built_and_when_reloaded(tmp_path, monkeypatch):
    from delf_es.index.embedded.keypoint_index import auto_nprobe

    monkeypatch.setattr(keypoint_index_module, "AUTO_NPROBE_MIN", 1)  # small lists: let the factors show
    with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=0, hnsw_from=2) as backend:
        backend.upsert(_records(30))
        nlist = backend._index.nlist
        assert backend._index.nprobe == auto_nprobe(nlist, sq8=True) > auto_nprobe(nlist)
    with EmbeddedBackend(tmp_path, exact_limit=500, sq8_from=0, hnsw_from=2) as backend:
        assert backend._index.nprobe == auto_nprobe(nlist, sq8=True)
