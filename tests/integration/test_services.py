"""The local services from ``delf-es services`` (and its wrapper scripts/services.sh) work as
the index layer needs them.

Besides health checks, this pins the Elasticsearch features delf-es relies on
and that the minimal integ-test-zip distribution does provide: dense_vector with
int8_hnsw quantization and approximate kNN search.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from elasticsearch import Elasticsearch

from services_fixture import run_services

DIMS = 40
SERVICES_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "services.sh"


def run_wrapper(action: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SERVICES_SCRIPT), action, "all"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def es(services):
    client = Elasticsearch(services.es_url, request_timeout=30)
    yield client
    client.close()


@pytest.mark.integration
def test_status_reports_both_running(services) -> None:
    proc = run_services("status", "all", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"url={services.es_url}" in proc.stdout
    assert f"url={services.redis_url}" in proc.stdout


@pytest.mark.integration
def test_second_start_is_a_noop(services) -> None:
    proc = run_services("start", "all", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DELF_ES_ES_STARTED=no" in proc.stdout.splitlines()
    assert "DELF_ES_REDIS_STARTED=no" in proc.stdout.splitlines()
    assert f"DELF_ES_ES_URL={services.es_url}" in proc.stdout.splitlines()


@pytest.mark.integration
def test_the_bash_wrapper_runs_the_same_command(services) -> None:
    proc = run_wrapper("status", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "es: running pid=" in proc.stdout and f"url={services.es_url} health=" in proc.stdout
    proc = run_wrapper("start", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"DELF_ES_ES_URL={services.es_url}", "DELF_ES_ES_STARTED=no",
                                        f"DELF_ES_REDIS_URL={services.redis_url}", "DELF_ES_REDIS_STARTED=no"]


@pytest.mark.integration
def test_elasticsearch_is_healthy(es: Elasticsearch) -> None:
    # Note: the integ-test-zip has no `GET /` handler, so es.info()/es.ping()
    # do not work against it; cluster health does.
    health = es.cluster.health(wait_for_status="yellow", timeout="30s")
    assert health["status"] in ("green", "yellow")
    assert health["number_of_nodes"] == 1


@pytest.mark.integration
def test_redis_answers(services) -> None:
    client = redis.Redis.from_url(services.redis_url)
    try:
        assert client.ping() is True
        key = f"delf-es-test:{uuid.uuid4().hex}"
        client.set(key, b"value", ex=60)
        assert client.get(key) == b"value"
        client.delete(key)
    finally:
        client.close()


@pytest.mark.integration
def test_int8_hnsw_knn_returns_nearest_first(es: Elasticsearch) -> None:
    index = f"delf-es-test-knn-{uuid.uuid4().hex[:12]}"
    rng = np.random.default_rng(1234)
    vectors = rng.standard_normal((8, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    es.indices.create(
        index=index,
        settings={"number_of_shards": 1, "number_of_replicas": 0},
        mappings={
            "properties": {
                "embedding": {
                    "type": "dense_vector",
                    "dims": DIMS,
                    "index": True,
                    "similarity": "cosine",
                    "index_options": {"type": "int8_hnsw"},
                },
                "name": {"type": "keyword"},
            }
        },
    )
    try:
        mapping = es.indices.get_mapping(index=index)[index]["mappings"]["properties"]["embedding"]
        assert mapping["index_options"]["type"] == "int8_hnsw"

        for i, vector in enumerate(vectors):
            es.index(index=index, id=str(i), document={"name": f"img-{i}", "embedding": vector.tolist()})
        es.indices.refresh(index=index)

        target = 5
        query = vectors[target] + 0.05 * rng.standard_normal(DIMS).astype(np.float32)
        expected_order = np.argsort(-(vectors @ (query / np.linalg.norm(query))))
        assert expected_order[0] == target  # the noise is small enough

        response = es.search(
            index=index,
            knn={"field": "embedding", "query_vector": query.tolist(), "k": 3, "num_candidates": 8},
            source=["name"],
        )
        hits = response["hits"]["hits"]
        assert len(hits) == 3
        assert hits[0]["_id"] == str(target)
        assert hits[0]["_source"]["name"] == f"img-{target}"
        assert [h["_score"] for h in hits] == sorted((h["_score"] for h in hits), reverse=True)
    finally:
        es.indices.delete(index=index, ignore_unavailable=True)
    assert not es.indices.exists(index=index)



@pytest.mark.integration
def test_an_append_only_redis_keeps_its_data_across_a_restart(services, tmp_path) -> None:
    """What the fault test needs (issue 13): Redis restarted mid-ingest loses no queue entry.  On
    a Redis of its own (free port, own services home), so the shared one is never restarted."""
    import socket

    from delf_es.services import services_config, start_redis, stop_redis
    from delf_es.settings import Settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = services_config(Settings(services_home=tmp_path, redis_port=port, redis_appendonly=True))
    try:
        assert start_redis(config) is True
        client = redis.Redis.from_url(config.redis_url)
        client.rpush("queue", b"a", b"b", b"c")  # no TTL, no save: only the append-only file keeps it
        client.close()
        assert stop_redis(config) is not None
        assert start_redis(config) is True
        client = redis.Redis.from_url(config.redis_url)
        assert client.lrange("queue", 0, -1) == [b"a", b"b", b"c"]
        client.close()
        assert (tmp_path / "redis" / f"appendonlydir-{port}").is_dir()
    finally:
        stop_redis(config)
