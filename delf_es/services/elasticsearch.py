"""Local Elasticsearch nodes: start (one node, or N on 127.0.0.1 as one cluster), wait for
health, stop, status, and kill / restart one node (the fault tests).

    config = services_config(Settings(es_nodes=3))
    start_es(config)                   # True if this call started a node; idempotent
    es_status(config).health           # 'green'
    kill_node(config, 1)               # SIGKILL node-1 (a crash, not a shutdown)
    start_es(config)                   # starts what is down: node-1 rejoins
    stop_es(config)                    # SIGTERM every node of this cluster

A node is ours only if its pidfile names a live process whose command line is this
distribution's Elasticsearch with this node's folder (``-Ddelf_es.state=<folder>``): a stale
pidfile or a port held by anything else is never killed, it makes ``start`` refuse.
Health is read with ``GET _cluster/health`` over urllib (this build has no ``GET /``; no client
is built here: the transport module builds the only ones).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from delf_es.errors import ServiceFailed
from delf_es.services import system
from delf_es.services.config import (ES_MAIN_CLASS, NODE_MARKER, STOP_TIMEOUT_S, NodeSpec, ServicesConfig,
                                     es_java_opts, es_yml)
from delf_es.services.distribution import install_distribution
from delf_es.services.java import find_java_home, has_module

logger = logging.getLogger("delf_es.services")

HEALTHY = ("green", "yellow")
HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeState:
    """One node as found: ``pid`` None when it does not run (as ours)."""

    node: NodeSpec
    pid: int | None
    running_port: int | None  # the HTTP port it was started with (its portfile)

    @property
    def alive(self) -> bool:
        return self.pid is not None


@dataclass(frozen=True)
class ClusterStatus:
    """The nodes of one layout and the cluster's health as one of them answers it."""

    nodes: tuple[NodeState, ...]
    health: str | None  # green / yellow / red; None = no node answers
    number_of_nodes: int | None  # nodes in the cluster, by its health

    @property
    def ready(self) -> bool:
        """Every node runs on its port and the cluster has them all, green or yellow."""
        return (all(s.alive and s.running_port == s.node.http_port for s in self.nodes)
                and self.health in HEALTHY and self.number_of_nodes == len(self.nodes))


def _pid_of(config: ServicesConfig, state: Path) -> int | None:
    """The pid of our node living in folder ``state``, if it runs (see the module docstring).
    Nodes the bash script started carry no marker: accepted for the single node's folder only."""
    pid = system.read_pid(state / "es.pid")
    if pid is None:
        return None
    cmdline = system.command_line(pid)
    if cmdline is None or not system.matches(cmdline, (ES_MAIN_CLASS, f"-Des.path.home={config.dist} ")):
        return None
    if NODE_MARKER in cmdline:
        return pid if f"{NODE_MARKER}{state} " in cmdline else None
    return pid if state.name == "es" else None


def node_state(config: ServicesConfig, node: NodeSpec) -> NodeState:
    return NodeState(node, _pid_of(config, node.state), system.read_pid(node.portfile))


#: Straight to the node: an ``http_proxy`` of the environment must not see (or break) loopback calls.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def health(url: str) -> dict | None:
    """``GET url/_cluster/health`` as a dict, None if nothing answers."""
    try:
        with _DIRECT.open(f"{url}/_cluster/health", timeout=HEALTH_TIMEOUT_S) as answer:
            return json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def es_status(config: ServicesConfig) -> ClusterStatus:
    """Each node of ``config``'s cluster and the cluster's health (from the first node answering)."""
    states = tuple(node_state(config, node) for node in config.node_specs())
    for state in states:
        if state.alive:
            answer = health(state.node.url)
            if answer is not None:
                return ClusterStatus(states, answer.get("status"), answer.get("number_of_nodes"))
    return ClusterStatus(states, None, None)


def wait_healthy(config: ServicesConfig, timeout: float) -> ClusterStatus:
    """Poll until the cluster has all its nodes, green or yellow, while our nodes stay alive.

    Raises:
        ServiceFailed: a node exited, or ``timeout`` s passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = es_status(config)
        if status.ready:
            return status
        dead = [s.node.name for s in status.nodes if not s.alive]
        if dead:
            raise ServiceFailed(f"{', '.join(dead)} exited during startup", "es")
        if time.monotonic() >= deadline:
            raise ServiceFailed(f"cluster not green/yellow with {len(status.nodes)} node(s) after {timeout:.0f}s "
                                f"(health {status.health or 'no answer'}, nodes {status.number_of_nodes})", "es")
        time.sleep(1.0)


def _configure(config: ServicesConfig, node: NodeSpec, java_home: Path) -> None:
    """Write the node's config folder: a copy of the distribution's (log4j2, jvm.options...),
    refreshed when the version changes (Elasticsearch writes its keystore there), and its
    elasticsearch.yml, rewritten on every start."""
    for folder in (node.state, node.data, node.logs, node.tmp):
        folder.mkdir(parents=True, exist_ok=True)
    marker = node.conf / ".es-version"
    if not marker.is_file() or marker.read_text().strip() != config.version:
        shutil.rmtree(node.conf, ignore_errors=True)
        shutil.copytree(config.dist / "config", node.conf)
        marker.write_text(config.version + "\n")
    options = (config.dist / "config" / "jvm.options").read_text()
    if not has_module(java_home, "jdk.incubator.vector"):
        # jvm.options asks for Lucene's SIMD module; a runtime without it would not boot.
        logger.info("this JDK has no jdk.incubator.vector module; running Elasticsearch without SIMD vectors")
        options = "\n".join(f"# {line}" if "--add-modules=jdk.incubator.vector" in line and not line.startswith("#")
                            else line for line in options.splitlines()) + "\n"
    (node.conf / "jvm.options").write_text(options)
    (node.conf / "elasticsearch.yml").write_text(
        es_yml(config, node, security_module=(config.dist / "modules" / "x-pack-security").is_dir()))


def _launch(config: ServicesConfig, node: NodeSpec, java_home: Path, timeout: float) -> subprocess.Popen:
    """Start ``bin/elasticsearch -d -p <pidfile>`` as the unprivileged user, in a clean
    environment (nothing of the caller's, e.g. JAVA_TOOL_OPTIONS or proxies, leaks in), from the
    node's folder (the caller's cwd may be unreadable for that user).  ``-d`` returns once the
    node has started; ``timeout`` bounds it."""
    node.portfile.write_text(f"{node.http_port}\n")
    command = [
        "timeout", "--kill-after=10", str(max(5, int(timeout))),
        "runuser", "-u", config.user, "--", "env", "-i",
        "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={node.state}", "LANG=C.UTF-8",
        f"ES_JAVA_HOME={java_home}", f"ES_PATH_CONF={node.conf}", f"ES_TMPDIR={node.tmp}",
        f"ES_JAVA_OPTS={es_java_opts(config, node)}",
        str(config.dist / "bin" / "elasticsearch"), "-d", "-p", str(node.pidfile),
    ]
    with open(node.startup_log, "wb") as log:
        return subprocess.Popen(command, cwd=node.state, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _log_tails(config: ServicesConfig, nodes: list[NodeSpec]) -> None:
    for node in nodes:
        for path in (node.startup_log, node.logs / f"{config.cluster_name}.log"):
            text = system.tail(path)
            if text:
                logger.error("----- last lines of %s -----\n%s", path, text)


def _check_ports_free(config: ServicesConfig, nodes: list[NodeSpec]) -> None:
    for node in nodes:
        if system.port_in_use(node.http_port):
            raise ServiceFailed(f"port 127.0.0.1:{node.http_port} is in use by a process delf-es did not start; "
                                "stop it or set DELF_ES_ES_PORT", node.label)
        if system.port_in_use(node.transport_port):
            raise ServiceFailed(f"transport port 127.0.0.1:{node.transport_port} is in use; "
                                "set DELF_ES_ES_TRANSPORT_PORT", node.label)


def start_es(config: ServicesConfig) -> bool:
    """Start every node of ``config`` that does not run, then wait until the cluster has them all,
    green or yellow (one budget of ``config.start_timeout`` s).  Returns whether this call started
    a node (False: everything already ran).

    Raises:
        ServiceFailed: a node of ours runs on another port, a port is held by another process,
            not root, no JDK, the download failed, or the cluster did not become healthy (the
            nodes this call started are stopped again, their logs' tails logged).
    """
    began = time.monotonic()
    missing: list[NodeSpec] = []
    for state in (node_state(config, node) for node in config.node_specs()):
        if state.alive and state.running_port != state.node.http_port:
            raise ServiceFailed(f"already runs (pid {state.pid}) from {config.home} on port {state.running_port}, "
                                f"not {state.node.http_port}; stop it first or use another DELF_ES_SERVICES_HOME",
                                state.node.label)
        if not state.alive:
            missing.append(state.node)
    if missing:
        for node in missing:
            system.clear_stale_pidfile(node.pidfile)
        _check_ports_free(config, missing)
        if not system.is_root():
            raise ServiceFailed(f"starting Elasticsearch needs root (it runs as user {config.user}); use sudo", "es")
        system.ensure_command("runuser", "util-linux")
        java_home = find_java_home(config.java_home, config.home)
        logger.info("using Java from %s", java_home)
        install_distribution(config)
        system.ensure_user(config.user)
        for node in missing:
            _configure(config, node, java_home)
        system.chown_tree(config.user, config.dist, config.cluster_root)
        system.ensure_reachable(config.user, config.dist)
        system.ensure_reachable(config.user, java_home)
        logger.info("starting Elasticsearch %s: %s (heap %s each, user %s)", config.version,
                    ", ".join(f"{n.name} on {n.url}" for n in missing), config.heap, config.user)
        # All at once: a cluster node waits for a master, which needs a quorum of the others.
        launched = [(node, _launch(config, node, java_home, config.start_timeout)) for node in missing]
        failed = [node.name for node, proc in launched if proc.wait() != 0]
    else:
        failed = []
    try:
        if failed:
            raise ServiceFailed(f"bin/elasticsearch of {', '.join(failed)} failed; logs in {config.cluster_root}", "es")
        remaining = max(5.0, config.start_timeout - (time.monotonic() - began))
        status = wait_healthy(config, remaining)
    except ServiceFailed:
        _log_tails(config, missing)
        for node in missing:  # do not leave a half-started node for the next run to trip on
            pid = _pid_of(config, node.state)
            if pid is not None:
                logger.info("stopping the failed %s (pid %d)", node.name, pid)
                system.terminate(pid, node.name, STOP_TIMEOUT_S)
        raise
    if missing:
        logger.info("Elasticsearch up (%s) after %.0fs, health %s",
                    ", ".join(f"{s.node.name} pid {s.pid}" for s in status.nodes), time.monotonic() - began,
                    status.health)
    else:
        logger.info("Elasticsearch already running (%s)", ", ".join(f"pid {s.pid}" for s in status.nodes))
    return bool(missing)


def node_folders(home: Path) -> list[Path]:
    """The state folders of every node layout under ``home`` (single node and clusters)."""
    found = [home / "es"] if (home / "es").is_dir() else []
    for cluster in sorted(home.glob("es-*nodes")):
        found += sorted(p for p in cluster.glob("node-*") if p.is_dir())
    return found


def stop_es(config: ServicesConfig, node: int | None = None, every_layout: bool = False) -> list[int]:
    """SIGTERM our nodes and wait until they exited; returns their pids (empty: none ran).

    Args:
        node: only this node of ``config``'s cluster.
        every_layout: every node under the services home (the single node and every cluster),
            not only ``config``'s.
    """
    if node is not None:
        folders = [config.node(node).state]
    elif every_layout:
        folders = node_folders(config.home)
    else:
        folders = [spec.state for spec in config.node_specs()]
    stopped = []
    for folder in folders:
        pid = _pid_of(config, folder)
        label = "es" if folder.name == "es" else f"es {folder.parent.name}/{folder.name}"
        if pid is None:
            system.clear_stale_pidfile(folder / "es.pid")
            continue
        logger.info("stopping %s (pid %d)", label, pid)
        system.terminate(pid, label, STOP_TIMEOUT_S)
        (folder / "es.pid").unlink(missing_ok=True)
        stopped.append(pid)
    if stopped:
        logger.info("Elasticsearch stopped (%d node(s))", len(stopped))
    else:  # no %d here: a format argument without a placeholder is a logging TypeError
        logger.info("Elasticsearch was not running")
    return stopped


def kill_node(config: ServicesConfig, node: int) -> int:
    """SIGKILL node ``node`` of ``config``'s cluster (a crash: no shutdown, no flush) and wait
    until it is gone; returns its pid.

    Raises:
        ServiceFailed: the node does not run (as ours).
    """
    spec = config.node(node)
    pid = _pid_of(config, spec.state)
    if pid is None:
        raise ServiceFailed("does not run, nothing to kill", spec.label)
    logger.info("killing %s (pid %d) with SIGKILL", spec.name, pid)
    system.kill(pid)
    spec.pidfile.unlink(missing_ok=True)
    return pid


def restart_node(config: ServicesConfig, node: int) -> ClusterStatus:
    """Start node ``node`` again (stopping it first if it runs) and wait until the cluster has
    all its nodes, green or yellow; returns that status."""
    if _pid_of(config, config.node(node).state) is not None:
        stop_es(config, node=node)
    start_es(config)
    return es_status(config)
