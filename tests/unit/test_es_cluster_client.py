"""Several node URLs in ``es_url`` (a cluster) and the index layout settings, without a cluster:
a FAKE node (a local HTTP server answering ``_cluster/health`` with the product header the client
checks) next to a port where nothing listens stands for a cluster with one node down.  The real
3-node cluster losing a node is tests/integration/test_cluster.py."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from delf_es.errors import ConfigurationError, IndexUnavailable, InvalidSetting
from delf_es.index.es.templates import render_template, with_layout
from delf_es.index.es.transport import Transport, connect, node_urls
from delf_es.settings import Settings
from delf_es.validation import preflight


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def fake_node():
    """A FAKE Elasticsearch node: answers every GET with a green cluster health."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = json.dumps({"cluster_name": "fake", "status": "green", "number_of_nodes": 3}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Elastic-Product", "Elasticsearch")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_node_urls_split_on_commas_and_drop_blanks():
    assert node_urls("http://a:9200, http://b:9201,,") == ["http://a:9200", "http://b:9201"]
    assert node_urls(None) == [] and node_urls("http://a:9200") == ["http://a:9200"]


def test_an_es_url_without_any_node_is_a_configuration_error():
    with pytest.raises(ConfigurationError):
        connect(Settings(es_url=" , "))


def test_the_client_gets_every_node_and_one_retry_per_other_node():
    client = connect(Settings(es_url="http://127.0.0.1:9270,http://127.0.0.1:9271,http://127.0.0.1:9272"))
    try:
        pool = client.transport.node_pool
        assert sorted(node.port for node in pool.all()) == [9270, 9271, 9272]
        assert client._max_retries == 2  # passed with every request (elasticsearch-py keeps it on the client)
    finally:
        client.close()


def test_requests_fail_over_from_a_dead_node_to_a_live_one(fake_node):
    live, hits = fake_node
    dead = f"http://127.0.0.1:{closed_port()}"
    with Transport(Settings(es_url=f"{dead},{live}", es_timeout=5)) as transport:
        for _ in range(4):  # round-robin: the dead node is tried, marked dead, then skipped
            assert transport.call("health", transport.client.cluster.health)["status"] == "green"
        assert transport.url == f"{dead},{live}"
    assert len(hits) == 4


def test_all_nodes_down_is_index_unavailable_naming_them():
    urls = f"http://127.0.0.1:{closed_port()},http://127.0.0.1:{closed_port()}"
    with Transport(Settings(es_url=urls, es_timeout=2)) as transport:
        with pytest.raises(IndexUnavailable, match="Elasticsearch at http://127.0.0.1:.*,http://127.0.0.1:"):
            transport.call("health", transport.client.cluster.health)


def test_every_node_url_is_checked_before_work_starts():
    with pytest.raises(InvalidSetting, match="scheme"):
        preflight(Settings(es_url="http://127.0.0.1:9200,ftp://127.0.0.1:9201"), model=False, index=True)


def test_shards_and_replicas_replace_the_templates_layout():
    body = render_template("images-v1.json", model_id="m", local_dims=128, global_dims=256)
    layout = with_layout(body["settings"], 3, 1)
    assert (layout["number_of_shards"], layout["number_of_replicas"]) == (3, 1)
    assert layout["index.codec"] == "best_compression"  # the rest of the template's settings stay
    nested = with_layout({"index": {"number_of_shards": 1, "refresh_interval": "1s"}}, 2, 0)
    assert nested == {"index": {"refresh_interval": "1s"}, "number_of_shards": 2, "number_of_replicas": 0}


def test_the_layout_defaults_suit_one_node():
    settings = Settings()
    assert (settings.es_number_of_shards, settings.es_number_of_replicas) == (1, 0)
