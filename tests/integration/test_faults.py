"""The fault test with real processes (issue 13 item 4), at suite size.

A 3-node Elasticsearch cluster (3 shards, 1 replica), Redis with the append-only file on, two
``delf-es worker`` processes ingesting photos submitted by ``delf-es enqueue``, while one
Elasticsearch node (the elected master) is SIGKILLed and later restarted, one worker is SIGKILLed
and replaced and Redis is restarted, and a client searches all along (benchmarks/fault_run.py).
Then: every photo indexed exactly once and whole, the cluster green, no search failed.

Size: ``FAULTS_PHOTOS`` photos (default 100, about 4-6 minutes on the shared cores, most of it
the nodes' boot and the restarted node's rejoin); ``benchmarks/faults.py`` runs the same with 500
and writes benchmarks/results/faults.json.  Small distinct real photos (<= 256 px) and a cheap
model (EfficientNet-Lite0, one scale, 100 keypoints): the test is about reliability.

Ports and home, next to the suite's services (``DELF_ES_ES_PORT``, ``DELF_ES_REDIS_PORT``,
``DELF_ES_SERVICES_HOME``): the cluster on ``es_port + 6 .. + 8`` (transport likewise; the
3-node test of test_cluster.py takes ``+ 3 .. + 5``), Redis on ``redis_port + 1``, in the home's
``faults/`` folder (its own node data; the distribution copied from the home).  It starts and
stops its own services and never touches the suite's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import shared
from delf_es.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fault_photos import derive, queries  # noqa: E402
from fault_run import FaultPlan, run, seed_distribution  # noqa: E402

PHOTOS = int(os.environ.get("FAULTS_PHOTOS", "100"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ingest_through_a_killed_node_a_killed_worker_and_a_redis_restart_indexes_each_photo_exactly_once(tmp_path):
    shared("paris250/db")  # skips without the shared photos
    suite = Settings()
    home = Path(suite.services_home) / "faults"
    seed_distribution(Path(suite.services_home), home)
    plan = FaultPlan(photos=derive(tmp_path / "photos", PHOTOS), queries=queries(tmp_path / "queries"),
                     work=tmp_path / "run", services_home=home, es_port=suite.es_port + 6,
                     redis_port=suite.redis_port + 1, timeout=900)

    result = run(plan)

    logs = f"logs in {plan.work}; result {result}"
    assert result["faults_not_fired"] == [] and result["finished"], logs
    fired = {f["name"]: f for f in result["faults"]}
    assert list(fired) == ["es_node_sigkill", "es_node_restart", "worker_sigkill", "redis_restart"], logs
    # each fault landed mid-ingest: fired before the job had every photo indexed
    assert all(f["indexed_before"] < PHOTOS for f in result["faults"]), logs
    assert fired["es_node_restart"]["detail"].get("health") == "green", logs
    assert result["job_done"] == PHOTOS and result["job_failed"] == {}, logs
    assert (result["indexed_once"], result["lost"], result["duplicated"], result["broken"]) == (PHOTOS, 0, 0, 0), logs
    assert result["image_documents"] == result["count_api"] == PHOTOS and result["staged_left"] == 0, logs
    assert result["cluster_status"] == "green", logs
    assert result["searcher_crashed"] is None and result["searches"] > 0, logs
    assert result["searches_failed"] == 0, logs
    # a message rejected without requeue is an image or a flush lost (the bug test_workers_broker_restart.py pins)
    assert result["worker_logs"]["rejected_without_requeue"] == 0, logs  # typed errors retried are allowed, and counted
