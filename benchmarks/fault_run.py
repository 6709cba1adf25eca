"""The fault run (issue 13 item 4): real processes ingest photos while things break.

    result = run(FaultPlan(photos=paths, queries=qpaths, work=folder))   # a dict, see ``counts``

What runs, all real processes on 127.0.0.1:

* a 3-node Elasticsearch cluster (``delf_es.services``, the code behind ``delf-es services start es
  --nodes 3``) and Redis with the append-only file on; the image and keypoint indices are created
  with 3 shards and 1 replica (``es_number_of_shards`` / ``es_number_of_replicas``);
* a fleet of ``delf-es worker --concurrency 1`` processes (two at a time), each its own process group;
* one job of every photo, submitted by ``delf-es enqueue @list --no-wait`` (the submitter);
* a client thread searching continuously (``DelfEs.search_features`` of pre-extracted query photos,
  the default plan: global shortlist, matching and RANSAC), from the moment the index exists.

The faults, in this order, each fired once the job has indexed a given fraction of the photos (so
they land mid-ingest whatever the machine's speed): SIGKILL of one Elasticsearch node (the elected
master: the harshest one), its restart after it has been down a while, SIGKILL of one worker's
whole process group (main process and pool child) and a replacement worker, a restart of Redis
(SIGTERM then start: the append-only file carries the queues, staged features and jobs over).

Afterwards it waits (bounded) for the job to finish and the cluster to be green, then counts what
the index holds: image documents, distinct image ids, ids not submitted, and per image whether its
keypoint documents of the live generation are all there (an image is whole or it is counted
broken).  Nothing here asserts: tests/integration/test_faults.py asserts on the counts, and
benchmarks/faults.py writes them to benchmarks/results/faults.json.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from delf_es.errors import DelfEsError
from delf_es.services import kill_node, restart_node, services_config, start, start_redis, stop_es, stop_redis
from delf_es.services.system import kill_group, start_group, stop_group
from delf_es.settings import Settings

log = logging.getLogger("delf_es.faults")
ROOT = Path(__file__).resolve().parents[1]
NODES = 3
REDIS_DB = 11
#: The cheap extraction of this test (reliability, not quality): EfficientNet-Lite0 at one scale on
#: photos of <= 256 px (benchmarks/fault_photos.py), 100 keypoints per image.
MODEL = {"backbone": "efficientnet-lite0", "scales": (1.0,), "global_scales": (1.0,), "max_image_size": 256,
         "max_feature_num": 100}
#: A dead worker's unacknowledged tasks come back after this many s (kombu's visibility timeout);
#: extraction here takes < 1 s, so no live task outlasts it.
VISIBILITY_TIMEOUT_S = 30
LOCK_TTL_S = 20
#: Fractions of the job indexed when each fault fires: by progress, not by the clock, so every
#: fault lands mid-ingest however fast the shared machine runs (the restarted node takes about a
#: minute to rejoin: the later faults overlap it).
KILL_NODE_AT, RESTART_NODE_AT, KILL_WORKER_AT, RESTART_REDIS_AT = 0.10, 0.25, 0.45, 0.65
#: Seconds Redis stays down in its restart: a real restart loading a large append-only file takes
#: seconds, longer than Celery's default publish retries (about 0.6 s).
REDIS_DOWN_S = 5.0
#: A search failing with a typed error is retried this many times (1, 2, 4 s apart) before it counts as failed.
SEARCH_RETRIES = 3
#: Pause between searches, s: the client searches all along but leaves the shared cores to the fleet.
PAUSE_S = 0.2


@dataclass
class FaultPlan:
    """What to run: ``photos`` to index, ``queries`` for the searching client, ``work`` for logs."""

    photos: list[Path]
    queries: list[Path]
    work: Path
    services_home: Path = Path("/work/cache/services-faults")
    es_port: int = 9290
    redis_port: int = 6396
    es_heap: str = "384m"
    workers: int = 2
    #: Bound of the whole ingest (the job must finish within it), s; then green within ``green_timeout``.
    timeout: float = 900.0
    green_timeout: float = 300.0
    keep_services: bool = False  # leave started services running (dev loops)


@dataclass
class Fault:
    name: str
    at_s: float  # since submission
    indexed_before: int  # images of the job indexed when it fired
    detail: dict[str, Any] = field(default_factory=dict)


class Fleet:
    """``delf-es worker`` subprocesses, each in its own process group (so SIGKILL takes its pool too)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        proc = start_group([sys.executable, "-m", "delf_es.cli", "worker", "--concurrency", "1"],
                           self.logs / f"worker-{len(self.procs)}.log", self.env, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker's process group: a crash, tasks in flight unacknowledged."""
        kill_group(proc)

    def close(self) -> None:
        for proc in self.procs:
            stop_group(proc)


class Searcher(threading.Thread):
    """Searches in a loop until stopped; counts answers, typed errors (retried) and failures."""

    def __init__(self, settings: Settings, queries: list[Path], ready: threading.Event) -> None:
        super().__init__(name="fault-searcher", daemon=True)
        self.settings, self.query_paths, self.ready = settings, queries, ready
        self.stopping = threading.Event()
        self.searches = self.answered = self.failed = 0
        self.typed_errors: Counter[str] = Counter()  # errors that a retry then answered, or not, by type
        self.failures: list[str] = []
        self.crashed: str | None = None

    def run(self) -> None:
        from delf_es.imageio import load_image
        from delf_es.sdk import DelfEs

        try:
            with DelfEs(self.settings) as sdk:
                queries = [sdk.extract(load_image(str(p), self.settings).pixels, image_id=p.name)
                           for p in self.query_paths]
                self.ready.wait()
                i = 0
                while not self.stopping.is_set():
                    self._search(sdk, queries[i % len(queries)])
                    i += 1
        except Exception as exc:  # noqa: BLE001 - reported in the counts, never swallowed
            self.crashed = f"{type(exc).__name__}: {exc}"

    def _search(self, sdk, query) -> None:
        self.searches += 1
        for attempt in range(SEARCH_RETRIES + 1):
            try:
                sdk.search_features(query, limit=5)
                self.answered += 1
                self.stopping.wait(PAUSE_S)
                return
            except DelfEsError as exc:  # typed (IndexUnavailable...): retried like a client would
                self.typed_errors[type(exc).__name__] += 1
                if attempt == SEARCH_RETRIES:
                    break
                time.sleep(2.0**attempt)
            except Exception as exc:  # noqa: BLE001 - an untyped error is a failure at once
                self.failures.append(f"{type(exc).__name__}: {exc}")
                self.failed += 1
                return
        self.failures.append(f"gave up after {SEARCH_RETRIES} retries")
        self.failed += 1


def _env(settings_env: dict[str, str]) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")}
    return {**keep, **settings_env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run_values(name: str, es_url: str, redis_url: str) -> dict[str, Any]:
    """The Settings fields of this run (workers, submitter, searcher and counting share them)."""
    return {
        "es_url": es_url, "redis_url": redis_url, "index_alias": name, "worker_namespace": name,
        "es_number_of_shards": 3, "es_number_of_replicas": 1, "keypoint_vectors": True,
        "worker_visibility_timeout": VISIBILITY_TIMEOUT_S, "worker_lock_ttl": LOCK_TTL_S,
        "worker_index_batch": 8, "torch_threads": 1, **MODEL,
    }


def _as_env(values: dict[str, Any]) -> dict[str, str]:
    """Settings fields as DELF_ES_* variables (tuples as JSON lists, booleans as true/false)."""
    def text(value: Any) -> str:
        if isinstance(value, tuple):
            return json.dumps(list(value))
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {f"DELF_ES_{key.upper()}": text(value) for key, value in values.items()}


def _enqueue(env: dict[str, str], photos: list[Path], work: Path) -> str:
    """``delf-es enqueue @list --no-wait``; returns the job id it prints."""
    listing = work / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    done = subprocess.run([sys.executable, "-m", "delf_es.cli", "enqueue", f"@{listing}", "--no-wait"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"delf-es enqueue failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["job"]


def _progress(store, job: str, last):
    """The job's progress, or the last one seen while Redis restarts."""
    try:
        return store.progress(job)
    except redis.exceptions.RedisError:
        return last


def _check_appendonly(port: int) -> None:
    """Refuse a Redis without the append-only file: its restart would empty the queues and jobs,
    which tests nothing but the setup (a Redis left running by an earlier run, started without it).

    Raises:
        RuntimeError: append-only is off.
    """
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        if client.config_get("appendonly").get("appendonly") != "yes":
            raise RuntimeError(f"Redis on port {port} runs without the append-only file; stop it "
                               "(delf-es services stop redis) so the fault run starts its own")
    finally:
        client.close()


#: Straight to the nodes: an ``http_proxy`` in the environment must not see loopback calls.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _master(config) -> int | None:
    """Index of the elected master node (by ``_cat/master`` from any node answering)."""
    for node in config.node_specs():
        try:
            with _DIRECT.open(f"{node.url}/_cat/master?h=node", timeout=5) as answer:
                name = answer.read().decode().strip()
            return next(i for i, spec in enumerate(config.node_specs()) if spec.name == name)
        except (OSError, StopIteration):
            continue
    return None


def _wait_green(url: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        try:
            with _DIRECT.open(f"{url}/_cluster/health?wait_for_status=green&timeout=10s", timeout=20) as a:
                status = json.loads(a.read())["status"]
        except OSError:
            status = None
        if status == "green":
            return status
        time.sleep(1)
    return status


def counts(client, alias: str, submitted: list[str]) -> dict[str, Any]:
    """What the index holds for ``alias``, against the ids submitted.

    ``indexed_once``: submitted ids with exactly one image document; ``lost``: submitted ids with
    none; ``duplicated``: extra image documents (an id twice, or an id never submitted);
    ``broken``: image documents whose live generation lacks keypoint documents or has extra ones."""
    client.indices.refresh(index=f"{alias},{alias}-keypoints")
    docs = [hit for hit in _scan(client, alias, ["image_id", "generation", "num_keypoints"])]
    per_id = Counter(hit["_source"]["image_id"] for hit in docs)
    wanted = set(submitted)
    live = Counter()  # (image_id, generation) -> keypoint documents
    after = None
    while True:
        composite: dict[str, Any] = {"size": 1000, "sources": [
            {"id": {"terms": {"field": "image_id"}}}, {"gen": {"terms": {"field": "generation"}}}]}
        if after:
            composite["after"] = after
        agg = client.search(index=f"{alias}-keypoints", size=0, aggs={"kp": {"composite": composite}})["aggregations"]["kp"]
        for bucket in agg["buckets"]:
            live[(bucket["key"]["id"], bucket["key"]["gen"])] += bucket["doc_count"]
        after = agg.get("after_key")
        if not agg["buckets"] or after is None:
            break
    broken = [hit["_source"]["image_id"] for hit in docs
              if live[(hit["_source"]["image_id"], hit["_source"]["generation"])] != hit["_source"]["num_keypoints"]]
    return {
        "photos": len(submitted),
        "image_documents": len(docs),
        "distinct_ids": len(per_id),
        "indexed_once": sum(1 for i in wanted if per_id.get(i) == 1),
        "lost": sum(1 for i in wanted if i not in per_id),
        "duplicated": sum(n - 1 for n in per_id.values()) + sum(n for i, n in per_id.items() if i not in wanted),
        "broken": len(broken),
        "broken_ids": broken[:20],
        "count_api": client.count(index=alias)["count"],
        "keypoint_documents": client.count(index=f"{alias}-keypoints")["count"],
    }


def _scan(client, index: str, fields: list[str]):
    from elasticsearch.helpers import scan

    yield from scan(client, index=index, query={"query": {"match_all": {}}}, _source=fields, size=1000)


def seed_distribution(source_home: Path, home: Path) -> None:
    """Copy the Elasticsearch distribution unpacked under ``source_home`` into ``home`` when
    ``home`` has none (a second services home then needs no download).  A separate home is
    needed at all because a home keeps one data folder per node count (``es-3nodes/``): two
    3-node clusters on other ports must not share it."""
    import shutil

    for dist in sorted(source_home.glob("elasticsearch-*")):
        target = home / dist.name
        if (dist / "bin" / "elasticsearch").is_file() and not target.exists():
            home.mkdir(parents=True, exist_ok=True)
            shutil.copytree(dist, home / f".copy-{dist.name}", symlinks=True)
            (home / f".copy-{dist.name}").rename(target)  # never a half-copied distribution


#: What the workers' logs say about messages: rejected without requeue (lost unless redelivered
#: another way), tasks that raised, unacknowledged messages a worker restored on a lost connection.
LOG_MARKS = {"rejected_without_requeue": "reject requeue=False", "raised_unexpected": "raised unexpected",
             "restored_on_reconnect": "Restoring "}


def worker_log_marks(logs: Path) -> dict[str, int]:
    """Counts of :data:`LOG_MARKS` lines over every ``worker-*.log`` in ``logs``."""
    found = dict.fromkeys(LOG_MARKS, 0)
    for path in sorted(logs.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            for name, mark in LOG_MARKS.items():
                found[name] += mark in line
    return found


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(plan: FaultPlan) -> dict[str, Any]:
    """Run the faults (module docstring); returns the counts, the faults' timing and the context."""
    plan.work.mkdir(parents=True, exist_ok=True)
    name = f"faults-{uuid.uuid4().hex[:8]}"
    base = Settings(services_home=plan.services_home, es_port=plan.es_port, redis_port=plan.redis_port,
                    es_heap=plan.es_heap, redis_appendonly=True, es_start_timeout=300)
    config = services_config(base, nodes=NODES)
    redis_url = config.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    began = time.monotonic()
    load = {"before": _load()}
    started = start(config, "all").started
    _check_appendonly(config.redis_port)
    result: dict[str, Any] = {"services_started": started, "services_start_s": round(time.monotonic() - began, 1)}
    values = _run_values(name, config.es_url, redis_url)
    env, settings = _env(_as_env(values)), Settings(**values)
    fleet = Fleet(env, plan.work)
    ready = threading.Event()
    searcher = Searcher(settings, plan.queries, ready)
    from delf_es.index.es.transport import connect
    from delf_es.workers.store import Store

    client = connect(settings, request_timeout=60)
    store = Store(redis_url, name)
    faults: list[Fault] = []
    try:
        for _ in range(plan.workers):
            fleet.start()
        searcher.start()
        submitted_at = time.monotonic()
        job = _enqueue(env, plan.photos, plan.work)
        result["submit_s"] = round(time.monotonic() - submitted_at, 1)
        result.update(_ingest_with_faults(plan, config, fleet, store, job, submitted_at, ready, faults, load))
        result["green_s"] = None
        waited = time.monotonic()
        result["cluster_status"] = _wait_green(config.node_specs()[0].url, plan.green_timeout)
        result["green_s"] = round(time.monotonic() - waited, 1)
        searcher.stopping.set()
        searcher.join(timeout=120)
        result.update(counts(client, name, [str(p) for p in plan.photos]))
        result["staged_left"] = store.ready_count()
        result.update(searches=searcher.searches, searches_answered=searcher.answered,
                      searches_failed=searcher.failed, search_typed_errors=dict(searcher.typed_errors),
                      search_failures=searcher.failures[:20], searcher_crashed=searcher.crashed)
    finally:
        searcher.stopping.set()
        ready.set()
        fleet.close()
        result["faults"] = [vars(f) for f in faults]
        result["worker_logs"] = worker_log_marks(plan.work)
        load["after"] = _load()
        result["load_average"] = load
        result["wall_s"] = round(time.monotonic() - began, 1)
        _cleanup(client, store, name)
        if not plan.keep_services:  # only what this run started
            if started.get("es"):
                stop_es(config)
            if started.get("redis"):
                stop_redis(config)
    return result


def _ingest_with_faults(plan, config, fleet, store, job, t0, ready, faults, load) -> dict[str, Any]:
    """Follow the job, firing each fault at its fraction; returns the job's end state."""
    total = len(plan.photos)
    progress = None
    deadline = t0 + plan.timeout
    killed_node: int | None = None
    pending = ["kill_node", "restart_node", "kill_worker", "restart_redis"]
    restarter: threading.Thread | None = None
    vanished = False
    peak = 0.0
    while True:
        seen = progress
        progress = _progress(store, job, progress)
        if seen is not None and seen.total and not progress.total:
            log.error("job %s vanished from Redis (total was %d)", job, seen.total)
            vanished = True
            break
        done = progress.done if progress else 0
        if done:
            ready.set()  # the index exists: the client may search
        peak = max(peak, os.getloadavg()[0])
        now = time.monotonic()
        if pending:
            step = pending[0]
            if step == "kill_node" and done >= KILL_NODE_AT * total:
                master = _master(config)
                killed_node = 1 if master is None else master
                pid = kill_node(config, killed_node)
                faults.append(Fault("es_node_sigkill", round(now - t0, 1), done,
                                    {"node": killed_node, "pid": pid, "was_master": master is not None}))
                pending.pop(0)
            elif step == "restart_node" and done >= RESTART_NODE_AT * total:
                fault = Fault("es_node_restart", round(now - t0, 1), done, {"node": killed_node})
                faults.append(fault)
                # in a thread: the node takes ~a minute to rejoin, the other faults go on meanwhile
                restarter = threading.Thread(target=_restart, args=(config, killed_node, fault, now), daemon=True)
                restarter.start()
                pending.pop(0)
            elif step == "kill_worker" and done >= KILL_WORKER_AT * total:
                victim = next(p for p in fleet.procs if p.poll() is None)
                fleet.kill(victim)
                replacement = fleet.start()
                faults.append(Fault("worker_sigkill", round(now - t0, 1), done,
                                    {"pid": victim.pid, "replacement_pid": replacement.pid}))
                pending.pop(0)
            elif step == "restart_redis" and done >= RESTART_REDIS_AT * total:
                stop_redis(config)
                time.sleep(REDIS_DOWN_S)
                start_redis(config)
                faults.append(Fault("redis_restart", round(now - t0, 1), done,
                                    {"down_s": round(time.monotonic() - now, 1)}))
                pending.pop(0)
        if progress is not None and progress.finished and not pending and not (restarter and restarter.is_alive()):
            break
        if now > deadline:
            log.error("job %s not finished after %.0f s: %s", job, plan.timeout, progress)
            break
        time.sleep(0.5)
    load["peak_1min"] = round(peak, 2)
    return {"job": job, "ingest_s": round(time.monotonic() - t0, 1), "job_done": progress.done if progress else 0,
            "job_failed": dict(list((progress.failed if progress else {}).items())[:20]),
            "faults_not_fired": pending, "finished": bool(progress and progress.finished), "job_vanished": vanished}


def _restart(config, node: int, fault: Fault, began: float) -> None:
    """Restart ``node`` and note when it rejoined and when the cluster was green again."""
    try:
        status = restart_node(config, node)
        fault.detail.update(rejoined_s=round(time.monotonic() - began, 1), nodes=status.number_of_nodes)
        fault.detail.update(health=_wait_green(config.node_specs()[node].url, 300),
                            green_s=round(time.monotonic() - began, 1))
    except Exception as exc:  # noqa: BLE001 - recorded: the run's checks then fail on the cluster status
        fault.detail["error"] = f"{type(exc).__name__}: {exc}"


def _cleanup(client, store, name: str) -> None:
    """Delete this run's indices and Redis keys (the services may be kept for the next run)."""
    try:
        found = client.options(ignore_status=404).indices.get_alias(name=f"{name}*")
        if found.meta.status == 200 and found.body:
            client.indices.delete(index=",".join(found.body))
        for key in list(store.redis.scan_iter(match=f"{name}:*", count=1000)) + list(
                store.redis.scan_iter(match="delf-es:*", count=1000)):
            store.redis.delete(key)
    except Exception as exc:  # noqa: BLE001 - cleanup is best effort; the counts are already taken
        log.warning("cleanup of %s incomplete: %s", name, exc)
    finally:
        store.close()
        client.close()
