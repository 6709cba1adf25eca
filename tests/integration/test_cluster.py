"""A real 3-node Elasticsearch cluster on 127.0.0.1 (``delf-es services start es --nodes 3``):
formed green, an image index of 3 shards with 1 replica, one node killed with SIGKILL while the
multi-URL client keeps answering searches, the node restarted, green again, all stopped.

Ports: the suite's node is ``DELF_ES_ES_PORT``; this cluster takes the three above it
(``es_port + 3 .. + 5``, transport ports likewise), in the same services home (the distribution
is shared, each node has its own folder under ``es-3nodes/``).  Bounded: about 2-3 minutes on
the shared 2 cores, most of it the nodes' boot."""

from __future__ import annotations

import time
import uuid

import pytest

from delf_es.errors import DelfEsError
from delf_es.index.es import ElasticsearchBackend
from delf_es.services import es_status, kill_node, restart_node, services_config, start, stop_es
from delf_es.settings import Settings
from services_fixture import run_services
from test_elasticsearch_backend import record

NODES = 3
IMAGES = 30
SEARCHES_WHILE_DOWN = 30


def cluster_settings() -> Settings:
    base = Settings()  # where the suite's services live (DELF_ES_SERVICES_HOME, ports)
    transport = base.es_transport_port or base.es_port + 1100
    return Settings(services_home=base.services_home, es_port=base.es_port + 3, es_transport_port=transport + 3,
                    es_heap="384m", es_start_timeout=300)


def wait_health(backend: ElasticsearchBackend, status: str, nodes: int) -> dict:
    transport = backend.transport
    return transport.call("health", transport.client.options(request_timeout=130).cluster.health,
                          wait_for_status=status, wait_for_nodes=str(nodes), timeout="120s")


@pytest.fixture()
def cluster():
    settings = cluster_settings()
    config = services_config(settings, nodes=NODES)
    try:
        start(config, "es")
        yield settings, config
    finally:
        stop_es(config)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_three_node_cluster_keeps_answering_while_a_node_is_killed_and_heals_after_restart(cluster):
    settings, config = cluster
    status = es_status(config)
    assert status.ready and status.number_of_nodes == NODES
    assert all(state.alive for state in status.nodes) and len({s.pid for s in status.nodes}) == NODES

    env = {"DELF_ES_ES_PORT": str(config.es_port), "DELF_ES_ES_TRANSPORT_PORT": str(config.transport_port)}
    shown = run_services("status", "es", "--nodes", "3", env=env, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert [line.split(":")[0] for line in shown.stdout.splitlines()] == ["es node-0", "es node-1", "es node-2", "es"]
    assert f"url={config.es_url} health=" in shown.stdout and "nodes=3/3" in shown.stdout

    alias = f"delf-cluster-{uuid.uuid4().hex[:8]}"
    index = settings.model_copy(update={"es_url": config.es_url, "index_alias": alias, "es_number_of_shards": 3,
                                        "es_number_of_replicas": 1})
    with ElasticsearchBackend(index) as backend:
        try:
            report = backend.upsert([record(f"img-{i}", seed=i) for i in range(IMAGES)], refresh=True)
            assert report.failed == [] and backend.count() == IMAGES
            assert wait_health(backend, "green", NODES)["status"] == "green"
            client = backend.transport.client
            layout = client.indices.get_settings(index=f"{alias},{alias}-keypoints")
            assert {(s["settings"]["index"]["number_of_shards"], s["settings"]["index"]["number_of_replicas"])
                    for s in layout.values()} == {("3", "1")}

            query = record("img-7", seed=7).features.global_desc
            expected = [hit.image_id for hit in backend.global_knn(query, 5)]
            assert expected[0] == "img-7"

            killed = kill_node(config, 1)
            assert es_status(config).nodes[1].pid is None and killed
            answers, failures = [], []
            for _ in range(SEARCHES_WHILE_DOWN):  # round-robin over the three URLs, one of them dead
                try:
                    answers.append([hit.image_id for hit in backend.global_knn(query, 5)])
                    answers.append(["count", str(backend.count())])
                except DelfEsError as error:  # counted, then asserted: every search must be answered
                    failures.append(repr(error))
            assert failures == []
            assert all(a == expected or a == ["count", str(IMAGES)] for a in answers)
            degraded = wait_health(backend, "yellow", NODES - 1)
            assert degraded["number_of_nodes"] == NODES - 1 and degraded["status"] in ("yellow", "green")

            began = time.monotonic()
            healed = restart_node(config, 1)
            assert healed.ready and healed.number_of_nodes == NODES
            assert wait_health(backend, "green", NODES)["status"] == "green"
            print(f"node-1 back and cluster green {time.monotonic() - began:.0f}s after restart")
            assert [hit.image_id for hit in backend.global_knn(query, 5)] == expected
            assert backend.count() == IMAGES
        finally:
            client = backend.transport.client
            found = client.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
            if found.meta.status == 200:
                client.indices.delete(index=",".join(found.body))

    stop_es(config)
    assert not any(state.alive for state in es_status(config).nodes)
    assert not any(node.pidfile.exists() for node in config.node_specs())
