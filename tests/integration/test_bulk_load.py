"""Bulk loading on the real Elasticsearch (delf_es/index/es/bulk_load.py): during a large
``add_features_bulk`` the index does not refresh and has no replica, several writers commit the
rounds, and the index's own settings come back afterwards, also when the load fails mid-way."""

from __future__ import annotations

import uuid
from typing import Iterator

import numpy as np
import pytest
from elasticsearch import Elasticsearch

from delf_es.cache import MemoryLocationCache
from delf_es.index.es import ElasticsearchBackend
from delf_es.index.es.transport import node_urls
from delf_es.sdk import DelfEs
from delf_es.settings import Settings
from delf_es.types import Features

pytestmark = pytest.mark.integration

MODEL_ID = "synthetic-model@bulk00"
KEYS = ("index.refresh_interval", "index.number_of_replicas")


def features(image_id: str, seed: int, n: int = 30) -> Features:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, 40)).astype(np.float32)
    glob = rng.standard_normal(32).astype(np.float32)
    return Features(
        image_id=image_id, model_id=MODEL_ID, image_size=(640, 480),
        keypoints=(rng.random((n, 2)) * np.array([640, 480])).astype(np.float32),
        scales=np.ones(n, np.float32), scores=rng.random(n).astype(np.float32),
        descriptors=rows / np.linalg.norm(rows, axis=1, keepdims=True), global_desc=glob / np.linalg.norm(glob),
    )


@pytest.fixture()
def alias(services) -> Iterator[str]:
    name = f"delf-test-bulk-{uuid.uuid4().hex[:10]}"
    yield name
    client = Elasticsearch(node_urls(services.es_url), request_timeout=30)
    found = client.options(ignore_status=404).indices.get_alias(name=f"{name},{name}-keypoints")
    if found.meta.status == 200:
        client.indices.delete(index=",".join(found.body))
    client.close()


def engine(services, alias: str, **overrides) -> DelfEs:
    settings = Settings(es_url=services.es_url, index_alias=alias, **overrides)
    return DelfEs(settings, backend=ElasticsearchBackend(settings, model_id=MODEL_ID), cache=MemoryLocationCache())


def index_settings(client: Elasticsearch, alias: str) -> dict[str, dict]:
    """{concrete index: {refresh_interval, number_of_replicas}} of both indices behind ``alias``."""
    found = client.indices.get_settings(index=f"{alias},{alias}-keypoints", flat_settings=True)
    return {name: {key: body["settings"].get(key) for key in KEYS} for name, body in found.items()}


def test_bulk_load_sets_bulk_settings_and_restores_them_after_an_error_mid_load(services, alias):
    """Replicas 1 and a 5 s refresh (not the defaults) before; -1 / 0 during the load; the same
    values again after the items iterator raised half-way; what was written before is kept."""
    client = Elasticsearch(node_urls(services.es_url), request_timeout=30)
    sdk = engine(services, alias, es_bulk_load_images=20, es_number_of_replicas=1)
    sdk.add_features_bulk([(features("first", 0), "first.jpg", None)])
    for name in index_settings(client, alias):
        client.indices.put_settings(index=name, settings={"index.refresh_interval": "5s"})
    before = index_settings(client, alias)
    assert all(v == {"index.refresh_interval": "5s", "index.number_of_replicas": "1"} for v in before.values())
    during: list[dict] = []

    def items():
        for i in range(60):
            if i == 45:
                during.append(index_settings(client, alias))
                raise RuntimeError("the source of the load failed")
            yield features(f"img-{i}", i + 1), f"img-{i}.jpg", {"i": i}

    with pytest.raises(RuntimeError, match="source of the load failed"):
        sdk.add_features_bulk(items(), batch_size=8)
    assert during and all(v == {"index.refresh_interval": "-1", "index.number_of_replicas": "0"}
                          for v in during[0].values())
    assert index_settings(client, alias) == before
    # the 40 images of the five full batches were committed (and the restore refreshed the index)
    assert sdk.count() == 41
    sdk.close()
    client.close()


def test_bulk_load_restores_defaults_after_an_interrupt(services, alias):
    """An index with the template's settings (no refresh_interval set) gets its default back
    after a KeyboardInterrupt in the middle of the load."""
    client = Elasticsearch(node_urls(services.es_url), request_timeout=30)
    sdk = engine(services, alias, es_bulk_load_images=10)
    sdk.add_features_bulk([(features("first", 0), "first.jpg", None)])
    before = index_settings(client, alias)
    assert all(v["index.refresh_interval"] is None for v in before.values())

    def items():
        for i in range(30):
            if i == 25:
                raise KeyboardInterrupt
            yield features(f"img-{i}", i + 1), f"img-{i}.jpg", None

    with pytest.raises(KeyboardInterrupt):
        sdk.add_features_bulk(items(), batch_size=5)
    assert index_settings(client, alias) == before
    assert sdk.count() == 26
    sdk.close()
    client.close()


def test_bulk_load_with_several_writers_writes_every_image_once(services, alias):
    """300 images through a bulk load with 3 writers: every id indexed once, with its own
    features and metadata; an id given twice keeps its last record."""
    client = Elasticsearch(node_urls(services.es_url), request_timeout=30)
    sdk = engine(services, alias, es_bulk_load_images=50, es_bulk_writers=3)
    items = [(features(f"img-{i}", i), f"img-{i}.jpg", {"i": i}) for i in range(300)]
    items.append((features("img-7", 1007), "img-7-again.jpg", {"i": 1007}))
    report = sdk.add_features_bulk(items, batch_size=64)
    assert report.ok and len(report.succeeded) == 301
    assert sdk.count() == 300
    assert sdk.get_image("img-7")["metadata"] == {"i": 1007}
    assert sdk.get_image("img-123")["metadata"] == {"i": 123}
    stored = sdk.backend.global_descriptors(["img-123", "img-299"])
    np.testing.assert_allclose(stored["img-299"], features("img-299", 299).global_desc, atol=1e-6)
    assert all(v["index.refresh_interval"] is None for v in index_settings(client, alias).values())
    sdk.close()
    client.close()
