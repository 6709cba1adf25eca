"""The Elasticsearch transport: the only place a client is built, the one status -> error map,
the one 429 retry layer.  Unit tests with a FAKE client that raises what elasticsearch-py raises
(the real server's answers are covered by tests/integration/test_elasticsearch_backend.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import elastic_transport
import pytest
from elasticsearch import ApiError, NotFoundError

from delf_es.errors import ConfigurationError, IndexUnavailable, RequestRejected
from delf_es.index.es import transport as es_transport
from delf_es.index.es.failures import FailedImage, FailureLog
from delf_es.index.es.transport import Transport, backoff, redact
from delf_es.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NODE = elastic_transport.NodeConfig("http", "127.0.0.1", 9200)


def api_error(status: int, kind: str = "x_exception", cls=ApiError) -> ApiError:
    meta = elastic_transport.ApiResponseMeta(status, "1.1", elastic_transport.HttpHeaders(), 0.0, NODE)
    return cls(kind, meta, {"error": {"type": kind, "reason": "because"}, "status": status})


class FakeIndices:
    """FAKE ``client.indices``: ``create`` raises the queued errors, then succeeds."""

    def __init__(self, errors):
        self.errors = list(errors)

    def create(self, **kwargs):
        if self.errors:
            raise self.errors.pop(0)
        return {"acknowledged": True}

    def exists(self, **kwargs):
        return True


class FakeClient:
    """FAKE Elasticsearch client: just enough for Transport.call and FailureLog."""

    def __init__(self, errors=()):
        self.indices = FakeIndices(errors)
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture()
def no_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(es_transport.time, "sleep", slept.append)
    return slept


def transport(errors=()) -> Transport:
    return Transport(Settings(es_url="http://user:secret@127.0.0.1:9200"), client=FakeClient(errors))


def test_a_429_is_retried_with_capped_backoff_then_succeeds(no_sleep):
    t = transport([api_error(429), api_error(429)])
    assert t.call("create", t.client.indices.create, index="i") == {"acknowledged": True}
    assert no_sleep == [backoff(0), backoff(1)] == [0.5, 1.0]


def test_a_429_that_persists_becomes_index_unavailable_after_the_retries(no_sleep):
    t = transport([api_error(429)] * 10)
    with pytest.raises(IndexUnavailable, match="127.0.0.1:9200"):
        t.call("create", t.client.indices.create, index="i")
    assert len(no_sleep) == es_transport.RETRIES_ON_429


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_server_error_is_index_unavailable_at_once(no_sleep, status):
    t = transport([api_error(status)])
    with pytest.raises(IndexUnavailable):
        t.call("create", t.client.indices.create, index="i")
    assert no_sleep == []  # never retried here: the workers' backoff is the one retry layer for 5xx


@pytest.mark.parametrize("status", [400, 403, 409])
def test_a_client_error_is_request_rejected_never_retried(no_sleep, status):
    t = transport([api_error(status)])
    with pytest.raises(RequestRejected) as raised:
        t.call("create", t.client.indices.create, index="i")
    assert raised.value.status == status and no_sleep == []
    assert "secret" not in str(raised.value)  # credentials are redacted from messages


def test_a_connection_error_is_index_unavailable():
    t = transport([elastic_transport.ConnectionError("refused")])
    with pytest.raises(IndexUnavailable, match="refused"):
        t.call("create", t.client.indices.create, index="i")


def test_not_found_is_left_to_the_caller():
    t = transport([api_error(404, cls=NotFoundError)])
    with pytest.raises(NotFoundError):
        t.call("create", t.client.indices.create, index="i")


def test_the_failure_log_does_not_turn_a_refusal_into_an_outage():
    """A 400 while creating the failures index is a RequestRejected (never retried by the
    workers), not the IndexUnavailable the failure log used to report for every API error."""
    log = FailureLog(transport([api_error(400, "mapper_parsing_exception")]), "x-failures")
    with pytest.raises(RequestRejected):
        log.record([FailedImage("a", "a.jpg", "decode", "InvalidImage", "bad", "m@1", "2026-01-01T00:00:00Z")])


def test_a_transport_without_a_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="DELF_ES_ES_URL"):
        Transport(Settings(es_url=None))


def test_a_given_client_is_not_closed_by_the_transport():
    t = transport()
    t.close()
    assert not t.client.closed


def test_redact_removes_credentials():
    assert redact("http://u:p@h:9200/x") == "http://h:9200/x"
    assert redact("http://h:9200") == "http://h:9200"


def test_an_elasticsearch_client_is_built_in_exactly_one_module():
    """The transport is the only door: no other library or benchmark module builds a client."""
    def builds_a_client(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if name in ("Elasticsearch", "AsyncElasticsearch"):
                    return True
        return False

    builders = sorted(str(path.relative_to(ROOT)) for folder in ("delf_es", "benchmarks")
                      for path in (ROOT / folder).rglob("*.py") if builds_a_client(path))
    assert builders == ["delf_es/index/es/transport.py"]
