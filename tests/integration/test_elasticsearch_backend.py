"""Elasticsearch-specific behaviour of ElasticsearchBackend (the shared contract is in
tests/index/test_backend_contract.py): the index and alias it creates, failures of the server
(down, overloaded: 429 injected through a fake transport node), per-item bulk errors."""

from __future__ import annotations

import json
import pickle
import socket
import time
import uuid
from typing import Any, Iterator

import numpy as np
import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, Urllib3HttpNode
from elastic_transport._node._base import NodeApiResponse
from elasticsearch import Elasticsearch

from delf_es.errors import FeatureShapeError, ImageNotFound, IndexUnavailable, UnsupportedFilter
from delf_es import errors as es_errors
from delf_es.index import records as es_records
from delf_es.index.codes import int8_codes
from delf_es.index.es import transport as es_transport
from delf_es.index.base import ImageRecord
from delf_es.index.es import ElasticsearchBackend, document_id, index_names, keypoint_id, render_template
from delf_es.settings import Settings
from delf_es.types import Features

MODEL_ID = "synthetic-model@es00"
LOCAL_DIM = 40
GLOBAL_DIM = 32
#: A correctness bound ("does not hang"), far above the expected sub-second failure.
DOWN_BOUND_S = 15.0


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def record(image_id: str, n: int = 20, seed: int = 0, *, model_id: str = MODEL_ID, metadata: dict | None = None,
           descriptors: np.ndarray | None = None) -> ImageRecord:
    rng = np.random.default_rng(seed)
    features = Features(
        image_id=image_id,
        model_id=model_id,
        image_size=(640, 480),
        keypoints=(rng.random((n, 2)) * np.array([640, 480])).astype(np.float32),
        scales=np.ones(n, np.float32),
        scores=rng.random(n).astype(np.float32),
        descriptors=unit_rows(rng, n, LOCAL_DIM) if descriptors is None else descriptors,
        global_desc=unit_rows(rng, 1, GLOBAL_DIM)[0],
    )
    return ImageRecord(image_id, f"/photos/{image_id}.jpg", dict(metadata or {}), features, "2026-11-22T10:00:00+00:00")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def alias(services) -> Iterator[str]:
    """A fresh alias; every index behind it is deleted afterwards."""
    name = f"delf-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = Elasticsearch(services.es_url, request_timeout=30)
    found = client.options(ignore_status=404).indices.get_alias(name=f"{name},{name}-keypoints")
    if found.meta.status == 200:
        client.indices.delete(index=",".join(found.body))
    client.close()


@pytest.fixture()
def settings(services, alias) -> Settings:
    return Settings(es_url=services.es_url, index_alias=alias, keypoint_vectors=True)  # these tests search keypoints


@pytest.fixture()
def backend(settings) -> Iterator[ElasticsearchBackend]:
    with ElasticsearchBackend(settings) as fresh:
        yield fresh


# ---- template and ids (no server) ------------------------------------------------------


def test_template_fills_dims_and_model_and_drops_comments():
    images = render_template("images-v1.json", model_id="m@1", local_dims=40, global_dims=1280)
    keypoints = render_template("keypoints-v1.json", model_id="m@1", local_dims=40)
    for body in (images, keypoints):
        assert set(body) == {"settings", "mappings"}
        assert body["mappings"]["_meta"]["model_id"] == "m@1"
        assert body["settings"]["number_of_replicas"] == 0
        assert "{{" not in json.dumps(body)
    assert images["mappings"]["properties"]["global_vector"]["dims"] == 1280
    assert keypoints["mappings"]["properties"]["vector"]["dims"] == 40


def test_template_without_global_dims_lets_elasticsearch_take_them_from_the_first_vector():
    body = render_template(model_id="m@1", local_dims=40, global_dims=None)
    assert "dims" not in body["mappings"]["properties"]["global_vector"]


def test_document_ids_are_image_ids_unless_too_long_for_elasticsearch():
    assert document_id("photo 1.jpg") == "photo 1.jpg"
    long_id = "x" * 513
    assert document_id(long_id) == document_id(long_id) != long_id
    assert len(document_id(long_id).encode()) <= 512
    assert document_id(document_id(long_id)) != document_id(long_id)  # a hashed-looking id cannot collide


def test_request_rejected_survives_pickling():
    error = es_errors.RequestRejected("Elasticsearch at http://h:9200 rejected get (HTTP 400): bad", 400)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.status, copy.args) == (type(error), str(error), 400, error.args)


# ---- index and alias -------------------------------------------------------------------


@pytest.mark.integration
def test_first_write_creates_versioned_indices_behind_the_aliases_with_the_template_mappings(backend, services, alias):
    assert backend.count() == 0  # reading absent indices is not an error and creates nothing
    client = Elasticsearch(services.es_url)
    both = f"{alias},{alias}-keypoints"
    assert client.options(ignore_status=404).indices.get_alias(name=both).meta.status == 404

    assert backend.upsert([record("a", 20)], refresh=True).ok
    images, keypoints = index_names(alias, MODEL_ID)
    assert images.startswith(f"{alias}-v1-") and keypoints.startswith(f"{alias}-keypoints-v1-")
    aliases = client.indices.get_alias(name=both).body
    assert aliases == {
        images: {"aliases": {alias: {"is_write_index": True}}},
        keypoints: {"aliases": {f"{alias}-keypoints": {"is_write_index": True}}},
    }
    for name, template, extra in (("images", images, {"global_dims": GLOBAL_DIM, "keypoint_vectors": True}),
                                  ("keypoints", keypoints, {})):
        mapping = client.indices.get_mapping(index=template)[template]["mappings"]
        wanted = render_template(f"{name}-v1.json", model_id=MODEL_ID, local_dims=LOCAL_DIM, global_dims=GLOBAL_DIM)
        assert mapping["_meta"] == wanted["mappings"]["_meta"] == {
            "schema": f"delf-{name}-v1", "model_id": MODEL_ID, "local_dims": LOCAL_DIM, **extra
        }
        assert mapping["dynamic"] == "strict"
        for field, spec in wanted["mappings"]["properties"].items():
            assert mapping["properties"][field]["type"] == spec["type"], field
        settings = client.indices.get_settings(index=template)[template]["settings"]["index"]
        assert (settings["number_of_replicas"], settings["codec"]) == ("0", "best_compression")
    vector = client.indices.get_mapping(index=keypoints)[keypoints]["mappings"]["properties"]["vector"]
    assert (vector["dims"], vector["similarity"], vector["index_options"]["type"]) == (LOCAL_DIM, "cosine", "hnsw")
    assert vector["element_type"] == "byte"
    # one image document, one document per keypoint
    assert client.count(index=alias)["count"] == 1
    assert client.count(index=f"{alias}-keypoints")["count"] == 20
    client.close()


@pytest.mark.integration
def test_metadata_strings_are_keywords_and_numbers_numeric(backend, services, alias):
    backend.upsert([record("a", metadata={"source": "flickr", "year": 2020, "rating": 3.5, "when": "2020-01-01"})])
    client = Elasticsearch(services.es_url)
    mapping = next(iter(client.indices.get_mapping(index=alias).body.values()))["mappings"]
    fields = mapping["properties"]["metadata"]["properties"]
    assert {name: fields[name]["type"] for name in fields} == {
        "source": "keyword", "year": "long", "rating": "double", "when": "keyword"
    }
    client.close()


@pytest.mark.integration
def test_two_backends_creating_the_same_index_share_it(settings):
    first, second = ElasticsearchBackend(settings), ElasticsearchBackend(settings)
    assert first.upsert([record("a", seed=1)], refresh=True).ok
    assert second.upsert([record("b", seed=2)], refresh=True).ok
    assert first.count() == second.count() == 2
    first.close()
    second.close()


@pytest.mark.integration
def test_backend_bound_to_a_model_refuses_records_of_another_model(settings):
    with ElasticsearchBackend(settings, model_id=MODEL_ID) as backend:
        report = backend.upsert([record("x", model_id="other@1"), record("a")], refresh=True)
        assert report.succeeded == ["a"]
        assert [f.item_id for f in report.failed] == ["x"]
        assert "model" in report.failed[0].error
    with ElasticsearchBackend(settings, model_id="other@1") as other:  # the index holds MODEL_ID
        report = other.upsert([record("y", model_id="other@1")])
        assert [f.item_id for f in report.failed] == ["y"]
        assert MODEL_ID in report.failed[0].error


@pytest.mark.integration
def test_image_ids_longer_than_elasticsearch_ids_round_trip(backend):
    long_id = "https://example.com/" + "é" * 400 + ".jpg"  # > 512 bytes of UTF-8
    assert document_id(long_id).startswith("~sha256:")
    item = record(long_id, 5, seed=3)
    assert backend.upsert([item], refresh=True).ok
    assert backend.get(long_id).image_id == long_id
    assert backend.existing([long_id, "other"]) == {long_id}
    assert set(backend.keypoints([long_id])) == {long_id}
    assert set(backend.knn(item.features.descriptors, 1).image_ids) == {long_id}
    assert backend.global_knn(item.features.global_desc, 1)[0][0] == long_id
    assert backend.delete([long_id], refresh=True).ok
    with pytest.raises(ImageNotFound):
        backend.get(long_id)


@pytest.mark.integration
def test_knn_restricted_to_image_ids_searches_only_those(backend):
    items = [record(name, 30, seed=i) for i, name in enumerate("abcd")]
    backend.upsert(items, refresh=True)
    queries = np.concatenate([item.features.descriptors for item in items])
    found = backend.knn(queries, 5, image_ids=["b", "d"])
    assert set(found.image_ids) == {"b", "d"}
    assert (np.bincount(found.query_index, minlength=len(queries)) == 5).all()
    assert len(backend.knn(queries, 5, image_ids=[])) == 0


@pytest.mark.integration
@pytest.mark.integration
def test_global_and_keypoint_knn_ask_for_their_own_num_candidates(services, alias, monkeypatch):
    """The global kNN (one search per query) uses ``es_global_knn_num_candidates``, the keypoint kNN
    (one per query descriptor) ``es_knn_num_candidates``: the bodies sent to the real server, read
    by a spy on the transport's msearch (it forwards every call)."""
    settings = Settings(es_url=services.es_url, index_alias=alias, keypoint_vectors=True,
                        es_knn_num_candidates=40, es_global_knn_num_candidates=700)
    with ElasticsearchBackend(settings) as backend:
        items = [record(name, 30, seed=i) for i, name in enumerate("abcd")]
        backend.upsert(items, refresh=True)
        sent: list[dict] = []
        forward = backend.transport.msearch

        def spy(index, searches, *args, **kwargs):
            sent.extend(search["knn"] for search in searches if "knn" in search)
            return forward(index, searches, *args, **kwargs)

        monkeypatch.setattr(backend.transport, "msearch", spy)
        hits = backend.global_knn(items[0].features.global_desc, 3)
        assert hits[0][0] == "a" and [s["num_candidates"] for s in sent] == [700]
        sent.clear()
        found = backend.knn(items[1].features.descriptors[:2], 5)
        assert set(found.image_ids) >= {"b"}
        assert sent and {s["num_candidates"] for s in sent} == {40}


def test_malformed_metadata_filter_raises_unsupported_filter(backend):
    backend.upsert([record("a")], refresh=True)
    with pytest.raises(UnsupportedFilter) as raised:
        backend.knn(unit_rows(np.random.default_rng(0), 2, LOCAL_DIM), 3, {"no_such_query": {"x": 1}})
    assert pickle.loads(pickle.dumps(raised.value)).args == raised.value.args


# ---- per-item bulk errors --------------------------------------------------------------


@pytest.mark.integration
def test_bulk_with_one_bad_document_reports_exactly_that_item(backend):
    assert backend.upsert([record("seed", metadata={"year": 2020})], refresh=True).ok
    not_unit = unit_rows(np.random.default_rng(7), 20, LOCAL_DIM) * 2.0  # refused client-side, as embedded does
    report = backend.upsert(
        [
            record("good-1", seed=1, metadata={"year": 2021}),
            record("bad-type", seed=2, metadata={"year": "not a number"}),
            record("good-2", seed=3),
            record("bad-norm", seed=4, descriptors=not_unit),
        ],
        refresh=True,
    )
    assert report.succeeded == ["good-1", "good-2"]
    assert [f.item_id for f in report.failed] == ["bad-type", "bad-norm"]
    assert "year" in report.failed[0].error
    assert "unit" in report.failed[1].error
    assert backend.existing(["good-1", "bad-type", "good-2", "bad-norm"]) == {"good-1", "good-2"}


# ---- one version of an image at a time (generation + slot) ----------------------------


def keypoint_docs(services, alias: str, image_id: str) -> int:
    client = Elasticsearch(services.es_url)
    client.indices.refresh(index=f"{alias}-keypoints")
    count = client.count(index=f"{alias}-keypoints", query={"term": {"image_id": image_id}})["count"]
    client.close()
    return count


def found_whole(backend, item: ImageRecord) -> bool:
    """Every descriptor of ``item`` finds its own keypoint first, at similarity ~1."""
    found = backend.knn(item.features.descriptors, 1)
    return (
        len(found) == item.features.num_keypoints
        and set(found.image_ids) == {item.image_id}
        and np.array_equal(found.keypoint_index, np.arange(item.features.num_keypoints))
        and bool(np.allclose(found.similarity, 1.0, atol=1e-4))
    )


@pytest.mark.integration
def test_replacing_an_image_leaves_exactly_its_new_keypoints(backend, services, alias):
    for n, seed in ((30, 1), (10, 2), (25, 3), (5, 4)):
        item = record("a", n, seed=seed)
        assert backend.upsert([item], refresh=True).ok
        assert keypoint_docs(services, alias, "a") == n
        assert found_whole(backend, item)


@pytest.mark.integration
def test_keypoints_of_an_uncommitted_version_are_never_returned(backend, services, alias):
    """A writer that died after writing its keypoints but before the image document."""
    live = record("a", 20, seed=1)
    assert backend.upsert([live], refresh=True).ok  # slot 0
    dead = record("a", 20, seed=2)
    client = Elasticsearch(services.es_url)
    for j, row in enumerate(dead.features.descriptors):
        client.index(index=f"{alias}-keypoints", id=keypoint_id("a", 1, j), document={
            "image_id": "a", "keypoint": j, "generation": 7, "metadata": {},
            "vector": int8_codes(row[None])[0].tolist()})
    client.indices.refresh(index=f"{alias}-keypoints")
    client.close()
    assert not set(backend.knn(dead.features.descriptors, 1).image_ids)  # only "a" exists, and not that version
    assert found_whole(backend, live)
    newer = record("a", 8, seed=3)  # the next write reuses slot 1 and removes the dead keypoints
    assert backend.upsert([newer], refresh=True).ok
    assert keypoint_docs(services, alias, "a") == 8
    assert found_whole(backend, newer)


@pytest.mark.integration
def test_replacement_rejected_by_elasticsearch_keeps_the_previous_version_whole(backend, services, alias, monkeypatch):
    live = record("a", 20, seed=1)
    assert backend.upsert([live], refresh=True).ok
    descriptors = unit_rows(np.random.default_rng(5), 20, LOCAL_DIM)
    # One keypoint Elasticsearch itself refuses (cosine of a zero vector), past the client-side
    # check switched off here, so the server's mid-bulk rejection path is what is tested.
    descriptors[13] = 0.0
    monkeypatch.setattr(es_records, "non_unit_rows", lambda rows: None)
    report = backend.upsert([record("a", 20, seed=2, descriptors=descriptors)], refresh=True)
    assert [f.item_id for f in report.failed] == ["a"]
    assert "keypoint 13" in report.failed[0].error
    assert found_whole(backend, live)
    assert backend.get("a").num_keypoints == 20
    assert not set(backend.knn(np.delete(descriptors, 13, axis=0), 1).image_ids) - {"a"}
    np.testing.assert_allclose(backend.keypoints(["a"])["a"], live.features.keypoints)


@pytest.mark.integration
def test_delete_removes_every_keypoint_document(backend, services, alias):
    backend.upsert([record("a", 30, seed=1)], refresh=True)
    backend.upsert([record("a", 12, seed=2)], refresh=True)
    assert backend.delete(["a"], refresh=True).ok
    assert keypoint_docs(services, alias, "a") == 0
    assert backend.count() == 0


# ---- server down -----------------------------------------------------------------------


def test_server_down_raises_index_unavailable_quickly_for_every_call():
    url = f"http://127.0.0.1:{unused_port()}"
    backend = ElasticsearchBackend(Settings(es_url=url, index_alias="delf-down", keypoint_vectors=True))
    queries = unit_rows(np.random.default_rng(0), 3, LOCAL_DIM)
    calls = {
        "upsert": lambda: backend.upsert([record("a")]),
        "delete": lambda: backend.delete(["a"]),
        "get": lambda: backend.get("a"),
        "existing": lambda: backend.existing(["a"]),
        "count": backend.count,
        "knn": lambda: backend.knn(queries, 5),
        "global_knn": lambda: backend.global_knn(unit_rows(np.random.default_rng(1), 1, GLOBAL_DIM)[0], 5),
        "keypoints": lambda: backend.keypoints(["a"]),
        "refresh": backend.refresh,
    }
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(IndexUnavailable) as raised:
            call()
        assert time.monotonic() - start < DOWN_BOUND_S, name
        assert url in str(raised.value), name
        copy = pickle.loads(pickle.dumps(raised.value))
        assert type(copy) is IndexUnavailable and str(copy) == str(raised.value)
    backend.close()


# ---- 429 injected by a fake transport node ---------------------------------------------


class OverloadedNode(Urllib3HttpNode):
    """Answers the first ``rejections[path]`` requests to ``path`` (``/_bulk``, ``/_msearch``) with
    429 (``mode="http"``) or with a 200 whose every bulk item is 429 (``mode="items"``); everything
    else goes to the real server.  Class attributes: set by the ``overloaded`` fixture."""

    rejections: dict[str, int] = {}
    mode = "http"
    seen: list[str] = []

    def perform_request(self, method: str, target: str, body: bytes | None = None, headers: Any = None,
                        request_timeout: Any = None) -> NodeApiResponse:
        path = target.split("?")[0]
        endpoint = "/" + path.rsplit("/", 1)[-1]
        OverloadedNode.seen.append(endpoint)
        if OverloadedNode.rejections.get(endpoint, 0) > 0:
            OverloadedNode.rejections[endpoint] -= 1
            return self._rejection(endpoint, body or b"")
        return super().perform_request(method, target, body=body, headers=headers, request_timeout=request_timeout)

    def _rejection(self, endpoint: str, body: bytes) -> NodeApiResponse:
        error = {"type": "es_rejected_execution_exception", "reason": "rejected execution (queue capacity 200)"}
        if OverloadedNode.mode == "items" and endpoint == "/_bulk":
            actions = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            items, skip = [], False
            for action in actions:
                if skip:  # the source line of an index action
                    skip = False
                    continue
                ((op, meta),) = action.items()
                skip = op in ("index", "create", "update")
                result = {"_index": meta.get("_index"), "_id": meta.get("_id"), "status": 429, "error": error}
                items.append({op: result})
            status, payload = 200, {"took": 1, "errors": True, "items": items}
        else:
            status, payload = 429, {"error": error, "status": 429}
        headers = HttpHeaders({"content-type": "application/vnd.elasticsearch+json;compatible-with=9",
                               "x-elastic-product": "Elasticsearch"})
        meta = ApiResponseMeta(status=status, http_version="1.1", headers=headers, duration=0.0, node=self.config)
        return NodeApiResponse(meta, json.dumps(payload).encode())


@pytest.fixture()
def overloaded(services, alias, monkeypatch) -> Iterator[tuple[ElasticsearchBackend, list[float]]]:
    """A backend whose transport injects 429s (configure ``OverloadedNode``); sleeps are recorded, not slept."""
    OverloadedNode.rejections = {}
    OverloadedNode.mode = "http"
    OverloadedNode.seen = []
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    client = Elasticsearch(services.es_url, node_class=OverloadedNode, request_timeout=30, max_retries=0,
                           retry_on_status=())
    backend = ElasticsearchBackend(Settings(es_url=services.es_url, index_alias=alias, keypoint_vectors=True), client=client)
    yield backend, sleeps
    client.close()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["http", "items"])
def test_bulk_rejected_with_429_is_retried_with_capped_backoff_then_written(overloaded, mode):
    backend, sleeps = overloaded
    backend.upsert([record("first")], refresh=True)  # creates the index, no injection yet
    OverloadedNode.mode = mode
    OverloadedNode.rejections = {"/_bulk": 2}
    report = backend.upsert([record("a", seed=1), record("b", seed=2)], refresh=True)
    assert report.ok and report.succeeded == ["a", "b"]
    assert OverloadedNode.rejections["/_bulk"] == 0  # both rejections were met, then retried
    assert sleeps == [es_transport.INITIAL_BACKOFF, 2 * es_transport.INITIAL_BACKOFF]
    assert backend.existing(["a", "b"]) == {"a", "b"}


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["http", "items"])
def test_bulk_still_rejected_after_the_retries_raises_index_unavailable(overloaded, mode):
    backend, sleeps = overloaded
    backend.upsert([record("first")], refresh=True)
    OverloadedNode.mode = mode
    OverloadedNode.rejections = {"/_bulk": 100}
    with pytest.raises(IndexUnavailable) as raised:
        backend.upsert([record("a", seed=1)])
    assert backend.url in str(raised.value)
    assert len(sleeps) == es_transport.RETRIES_ON_429
    assert max(sleeps) <= es_transport.MAX_BACKOFF


@pytest.mark.integration
def test_knn_search_rejected_with_429_is_retried_then_reported(overloaded):
    backend, sleeps = overloaded
    item = record("a", 10, seed=1)
    backend.upsert([item], refresh=True)
    OverloadedNode.rejections = {"/_msearch": 1}
    found = backend.knn(item.features.descriptors, 1)
    np.testing.assert_array_equal(found.keypoint_index, np.arange(10))
    assert sleeps == [es_transport.INITIAL_BACKOFF]

    sleeps.clear()
    OverloadedNode.rejections = {"/_msearch": 100}
    with pytest.raises(IndexUnavailable):
        backend.knn(item.features.descriptors, 1)
    assert len(sleeps) == es_transport.RETRIES_ON_429
    with pytest.raises(IndexUnavailable):
        backend.global_knn(item.features.global_desc, 1)


@pytest.mark.integration
def test_query_of_wrong_dimension_is_refused_before_any_search(backend):
    backend.upsert([record("a")], refresh=True)
    with pytest.raises(FeatureShapeError):
        backend.global_knn(np.ones(GLOBAL_DIM + 1, np.float32), 3)
