"""Backend fixtures for the contract suite, and synthetic features (no model).

To run the contract suite against another backend, add a factory to
``BACKEND_FACTORIES``: a generator taking ``tmp_path`` that yields a fresh, empty
backend for features of ``MODEL_ID`` with ``LOCAL_DIM``-d descriptors and
``GLOBAL_DIM``-d global descriptors, and cleans up after the ``yield``.

Tests reach the synthetic-data helpers through the ``synth`` fixture (the test
directories are not packages, so they cannot import this module).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pytest

from delf_es.index.base import Backend, ImageRecord
from delf_es.types import Features

MODEL_ID = "synthetic-model@0000"
LOCAL_DIM = 40
GLOBAL_DIM = 32
CREATED_AT = "2026-11-22T10:00:00+00:00"


def make_embedded(tmp_path: Path) -> Iterator[Backend]:
    from delf_es.index.embedded import EmbeddedBackend

    backend = EmbeddedBackend(tmp_path / "embedded-index")
    try:
        yield backend
    finally:
        backend.close()


BACKEND_FACTORIES: dict[str, Callable[[Path], Iterator[Backend]]] = {
    "embedded": make_embedded,
}


# ---- Elasticsearch: the real server of delf-es services (tests marked ``integration``) ----

_ELASTICSEARCH: dict[str, str] = {}  # "url": set by _elasticsearch_services for the running test


def _runs_on_elasticsearch(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("backend") == "elasticsearch"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _runs_on_elasticsearch(item):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _elasticsearch_services(request: pytest.FixtureRequest) -> None:
    """Runs before ``backend`` (autouse): starts the services for Elasticsearch runs, notes the URL."""
    if _runs_on_elasticsearch(request.node):
        _ELASTICSEARCH["url"] = request.getfixturevalue("services").es_url


def make_elasticsearch(tmp_path: Path) -> Iterator[Backend]:
    """A fresh, uniquely named alias; the index behind it is deleted afterwards."""
    from elasticsearch import Elasticsearch

    from delf_es.index.es import ElasticsearchBackend
    from delf_es.settings import Settings

    url = _ELASTICSEARCH["url"]
    alias = f"delf-contract-{uuid.uuid4().hex[:12]}"
    # keypoint vectors on: the contract covers the keypoint kNN (off is tested in test_keypoint_vectors.py)
    backend = ElasticsearchBackend(Settings(es_url=url, index_alias=alias, keypoint_vectors=True))
    try:
        yield backend
    finally:
        backend.close()
        client = Elasticsearch(url, request_timeout=30)
        found = client.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
        if found.meta.status == 200:
            client.indices.delete(index=",".join(found.body))
        client.close()


BACKEND_FACTORIES["elasticsearch"] = make_elasticsearch


@pytest.fixture(params=list(BACKEND_FACTORIES))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with contextlib.contextmanager(BACKEND_FACTORIES[request.param])(tmp_path) as fresh:
        yield fresh


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 random unit rows."""
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_features(
    image_id: str,
    n: int = 50,
    seed: int = 0,
    *,
    model_id: str = MODEL_ID,
    local_dim: int = LOCAL_DIM,
    global_desc: np.ndarray | None = None,
    global_dim: int = GLOBAL_DIM,
    size: tuple[int, int] = (640, 480),
) -> Features:
    """Synthetic features: n random unit descriptors at random locations inside ``size``."""
    rng = np.random.default_rng(seed)
    width, height = size
    keypoints = (rng.random((n, 2)) * np.array([width, height])).astype(np.float32)
    if global_desc is None:
        global_desc = unit_rows(rng, 1, global_dim)[0] if global_dim else np.zeros(0, np.float32)
    return Features(
        image_id=image_id,
        model_id=model_id,
        image_size=size,
        keypoints=keypoints,
        scales=np.ones(n, np.float32),
        scores=rng.random(n).astype(np.float32),
        descriptors=unit_rows(rng, n, local_dim),
        global_desc=np.asarray(global_desc, np.float32),
    )


def make_record(
    image_id: str,
    n: int = 50,
    seed: int = 0,
    *,
    metadata: Mapping[str, Any] | None = None,
    path: str | None = None,
    created_at: str = CREATED_AT,
    **feature_options: Any,
) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        path=path if path is not None else f"/photos/{image_id}.jpg",
        metadata=dict(metadata or {}),
        features=make_features(image_id, n, seed, **feature_options),
        created_at=created_at,
    )


@pytest.fixture()
def synth() -> SimpleNamespace:
    """The synthetic-data helpers and constants above, for test modules."""
    return SimpleNamespace(
        record=make_record,
        features=make_features,
        unit_rows=unit_rows,
        MODEL_ID=MODEL_ID,
        LOCAL_DIM=LOCAL_DIM,
        GLOBAL_DIM=GLOBAL_DIM,
        CREATED_AT=CREATED_AT,
    )
