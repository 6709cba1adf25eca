"""Indexes created without keypoint vectors (``keypoint_vectors=False``, issue 13 item 1), on both
backends: the flag is recorded in the index, the keypoint kNN and the plans that need it are refused
with :class:`KeypointVectorsDisabled`, the global shortlist + matching finds the same hits as on an
index with keypoint vectors, and indexes created before the flag keep working with keypoints.
Elasticsearch runs are against the real server (marked ``integration`` by conftest.py)."""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from delf_es.cache import MemoryLocationCache
from delf_es.errors import ConfigurationError, KeypointVectorsDisabled
from delf_es.index.base import Backend
from delf_es.search import Searcher
from delf_es.settings import Settings

BACKENDS = ("embedded", "elasticsearch")


MODEL_ID = "synthetic-model@0000"  # tests/index/conftest.py's (synth.MODEL_ID)
_ES: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _es_url(request) -> None:
    """The real server's URL for the Elasticsearch runs (conftest.py marks them integration)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "elasticsearch":
        _ES["url"] = request.getfixturevalue("services").es_url


@contextlib.contextmanager
def open_backend(kind: str, tmp_path: Path, keypoint_vectors: bool, alias: str) -> Iterator[Backend]:
    if kind == "embedded":
        from delf_es.index.embedded import EmbeddedBackend

        with EmbeddedBackend(tmp_path / alias, keypoint_vectors=keypoint_vectors) as backend:
            yield backend
        return
    from delf_es.index.es import ElasticsearchBackend

    url = _ES["url"]
    with ElasticsearchBackend(Settings(es_url=url, index_alias=alias, keypoint_vectors=keypoint_vectors)) as backend:
        yield backend


def drop(kind: str, alias: str) -> None:
    if kind != "elasticsearch":
        return
    from elasticsearch import Elasticsearch

    client = Elasticsearch(_ES["url"], request_timeout=30)
    found = client.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
    if found.meta.status == 200:
        client.indices.delete(index=",".join(found.body))
    client.close()


@pytest.fixture()
def aliases(request) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        drop(request.node.callspec.params["backend"], name)


def scene(synth, rng_seed: int = 0):
    """Six records of 120 keypoints; the query is image 'target' shifted by (20, 10) px with
    descriptor noise and 40 clutter keypoints, its global descriptor nearest to target's."""
    rng = np.random.default_rng(rng_seed)
    records = [synth.record(name, 120, seed=i) for i, name in enumerate(["a", "b", "target", "c", "d", "e"])]
    target = records[2].features
    noisy = target.descriptors + 0.05 * rng.standard_normal(target.descriptors.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    clutter = synth.unit_rows(rng, 40, synth.LOCAL_DIM)
    keypoints = np.r_[target.keypoints + np.array([20, 10], np.float32),
                      rng.uniform([0, 0], [640, 480], (40, 2)).astype(np.float32)]
    query = synth.features("<query>", 160)
    from dataclasses import replace

    query = replace(query, keypoints=keypoints, descriptors=np.r_[noisy, clutter].astype(np.float32),
                    global_desc=target.global_desc)
    return records, query


def searcher(backend: Backend, **overrides) -> Searcher:
    settings = Settings(**{"shortlist_size": 4, "ransac_px": 4.0, "knn_k": 5, **overrides})
    return Searcher(backend, MemoryLocationCache(), settings, MODEL_ID)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_keypoint_vectors_the_keypoint_knn_is_refused_and_global_matching_finds_the_same_hits(
        backend, synth, tmp_path, aliases):
    records, query = scene(synth)
    found = {}
    for flag in (True, False):
        aliases.append(f"delf-kpv-{uuid.uuid4().hex[:10]}")
        with open_backend(backend, tmp_path, flag, aliases[-1]) as index:
            assert index.upsert(records, refresh=True).ok
            assert index.has_keypoint_vectors() is flag
            assert index.count() == len(records)
            if flag:
                assert len(index.knn(query.descriptors[:5], 3)) > 0
            else:
                with pytest.raises(KeypointVectorsDisabled, match="without keypoint vectors"):
                    index.knn(query.descriptors[:5], 3)
                for plan in ({"shortlist_mode": "hybrid"}, {"shortlist_mode": "local"},
                             {"shortlist_mode": "global", "correspondences": "knn"}):
                    with pytest.raises(KeypointVectorsDisabled, match="keypoint_vectors=false"):
                        searcher(index, **plan).search(query)
            hits = searcher(index, shortlist_mode="global", correspondences="matching").search(query)
            found[flag] = [(h.image_id, h.inliers) for h in hits]
            # the plan left unset on an index without vectors: global + matching, on either backend
            if not flag:
                assert [(h.image_id, h.inliers) for h in searcher(index).search(query)] == found[False]
            # deletes and re-adds work the same with and without the keypoint documents
            assert index.delete(["e"], refresh=True).ok and index.count() == len(records) - 1
            assert index.upsert(records[-1:], refresh=True).ok and index.count() == len(records)
    assert found[True] == found[False]
    assert found[False][0][0] == "target" and found[False][0][1] >= 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_flag_is_recorded_in_the_index_and_wins_when_reopened(backend, synth, tmp_path, aliases):
    aliases.append(f"delf-kpv-{uuid.uuid4().hex[:10]}")
    with open_backend(backend, tmp_path, False, aliases[-1]) as index:
        assert index.upsert([synth.record("a", 30)], refresh=True).ok
    with open_backend(backend, tmp_path, True, aliases[-1]) as reopened:  # asks for vectors: the index has none
        assert reopened.has_keypoint_vectors() is False
        assert reopened.upsert([synth.record("b", 30, seed=1)], refresh=True).ok
        with pytest.raises(KeypointVectorsDisabled):
            reopened.knn(synth.unit_rows(np.random.default_rng(0), 2, synth.LOCAL_DIM), 3)


def test_an_embedded_index_created_before_the_flag_keeps_its_keypoint_vectors(synth, tmp_path):
    from delf_es.index.embedded import EmbeddedBackend

    with EmbeddedBackend(tmp_path / "old") as index:
        assert index.upsert([synth.record("a", 30)]).ok
    db = sqlite3.connect(tmp_path / "old" / "images.sqlite3")  # as written before the setting existed
    with db:
        db.execute("DELETE FROM meta WHERE key = 'keypoint_vectors'")
    db.close()
    with EmbeddedBackend(tmp_path / "old", keypoint_vectors=False) as index:
        assert index.has_keypoint_vectors() is True
        record = synth.record("a", 30)
        assert set(index.knn(record.features.descriptors, 1).image_ids) == {"a"}


@pytest.mark.integration
def test_an_elasticsearch_index_without_the_meta_flag_keeps_its_keypoint_vectors(services, synth):
    from elasticsearch import Elasticsearch

    from delf_es.index.es import ElasticsearchBackend

    alias = f"delf-kpv-{uuid.uuid4().hex[:10]}"
    settings = Settings(es_url=services.es_url, index_alias=alias, keypoint_vectors=True)
    client = Elasticsearch(services.es_url, request_timeout=30)
    try:
        with ElasticsearchBackend(settings) as index:
            assert index.upsert([synth.record("a", 30)], refresh=True).ok
        (images,) = client.indices.get_alias(name=alias).body
        meta = client.indices.get_mapping(index=images)[images]["mappings"]["_meta"]
        assert meta["keypoint_vectors"] is True
        meta.pop("keypoint_vectors")  # an index created before the flag
        client.indices.put_mapping(index=images, meta=meta)
        assert "keypoint_vectors" not in client.indices.get_mapping(index=images)[images]["mappings"]["_meta"]
        with ElasticsearchBackend(settings.model_copy(update={"keypoint_vectors": False})) as index:
            assert index.has_keypoint_vectors() is True
            record = synth.record("a", 30)
            assert set(index.knn(record.features.descriptors, 1).image_ids) == {"a"}
            assert index.upsert([synth.record("b", 30, seed=1)], refresh=True).ok
            assert client.count(index=f"{alias}-keypoints")["count"] == 60  # b's keypoints written too
    finally:
        found = client.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
        if found.meta.status == 200:
            client.indices.delete(index=",".join(found.body))
        client.close()


@pytest.mark.integration
def test_an_elasticsearch_index_without_keypoint_vectors_writes_no_keypoint_documents(services, synth):
    from elasticsearch import Elasticsearch

    from delf_es.index.es import ElasticsearchBackend

    alias = f"delf-kpv-{uuid.uuid4().hex[:10]}"
    client = Elasticsearch(services.es_url, request_timeout=30)
    try:
        with ElasticsearchBackend(Settings(es_url=services.es_url, index_alias=alias)) as index:  # the default
            assert index.upsert([synth.record(f"i{i}", 50, seed=i) for i in range(3)], refresh=True).ok
            (images,) = client.indices.get_alias(name=alias).body
            assert client.indices.get_mapping(index=images)[images]["mappings"]["_meta"]["keypoint_vectors"] is False
            assert client.count(index=f"{alias}-keypoints")["count"] == 0
            assert client.count(index=alias)["count"] == 3
            codes = index.descriptor_codes(["i0", "i1"])  # what matching reads: still stored
            assert {k: v.shape for k, v in codes.items()} == {"i0": (50, 40), "i1": (50, 40)}
    finally:
        found = client.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
        if found.meta.status == 200:
            client.indices.delete(index=",".join(found.body))
        client.close()


def test_the_default_follows_the_default_plan_and_the_error_is_a_configuration_error():
    assert Settings().index_keypoint_vectors() is True  # embedded: hybrid + kNN pairs use them
    assert Settings(es_url="http://127.0.0.1:9200").index_keypoint_vectors() is False  # global + matching
    assert Settings(es_url="http://127.0.0.1:9200", shortlist_mode="hybrid").index_keypoint_vectors() is True
    assert Settings(keypoint_vectors=False).index_keypoint_vectors() is False
    assert Settings().search_plan(keypoint_vectors=False) == ("global", "matching")
    assert Settings(shortlist_mode="local").search_plan(keypoint_vectors=False) == ("local", "matching")
    error = KeypointVectorsDisabled("index x was created without keypoint vectors")
    assert isinstance(error, ConfigurationError)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.args) == (type(error), error.args)
