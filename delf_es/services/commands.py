"""``delf-es services start|stop|status [es|redis|all]`` as functions: what to run for each target,
and the lines the command prints.

``start`` prints shell-parsable lines on stdout (progress goes to stderr), so
``eval "$(delf-es services start)"`` sets::

    DELF_ES_ES_URL=http://127.0.0.1:9200          (a cluster: every node's URL, comma-separated)
    DELF_ES_ES_STARTED=yes|no                     (no: everything already ran before this call)
    DELF_ES_REDIS_URL=redis://127.0.0.1:6379/0
    DELF_ES_REDIS_STARTED=yes|no
"""

from __future__ import annotations

from dataclasses import dataclass

from delf_es.errors import ServiceFailed
from delf_es.services.config import LOCK_TIMEOUT_S, ServicesConfig
from delf_es.services.elasticsearch import ClusterStatus, es_status, kill_node, start_es, stop_es
from delf_es.services.redis import RedisStatus, redis_status, start_redis, stop_redis
from delf_es.services.system import locked

TARGETS = {"es": ("es",), "redis": ("redis",), "all": ("es", "redis")}


def services_of(target: str) -> tuple[str, ...]:
    """``es``, ``redis`` or ``all`` -> the services it names.

    Raises:
        ServiceFailed: another word.
    """
    try:
        return TARGETS[target]
    except KeyError:
        raise ServiceFailed(f"unknown service {target!r}: es, redis or all") from None


@dataclass(frozen=True)
class Started:
    """What ``start`` did, per service: started now (True) or already running (False)."""

    config: ServicesConfig
    started: dict[str, bool]

    def assignments(self) -> list[str]:
        """The ``DELF_ES_*=...`` lines of the module docstring, in the order the services were named."""
        lines = []
        for name, started in self.started.items():
            url = self.config.es_url if name == "es" else self.config.redis_url
            lines += [f"DELF_ES_{name.upper()}_URL={url}", f"DELF_ES_{name.upper()}_STARTED={'yes' if started else 'no'}"]
        return lines


def start(config: ServicesConfig, target: str = "all") -> Started:
    """Start the named services (installing them on first use), under the services lock."""
    names = services_of(target)
    started: dict[str, bool] = {}
    with locked(config.lockfile, LOCK_TIMEOUT_S):
        for name in names:
            started[name] = start_es(config) if name == "es" else start_redis(config)
    return Started(config, started)


def stop(config: ServicesConfig, target: str = "all", node: int | None = None, every_layout: bool = True,
         sigkill: bool = False) -> None:
    """Stop the named services that are ours (``node``: that Elasticsearch node only, with
    SIGKILL when ``sigkill``; ``every_layout``: every node under the services home)."""
    names = services_of(target)
    with locked(config.lockfile, LOCK_TIMEOUT_S):
        for name in names:
            if name == "redis":
                stop_redis(config)
            elif node is not None and sigkill:
                kill_node(config, node)
            else:
                stop_es(config, node=node, every_layout=every_layout and node is None)


def es_lines(config: ServicesConfig, status: ClusterStatus) -> tuple[list[str], bool]:
    """Status lines of Elasticsearch and whether it is ready.  One node:
    ``es: running pid=P url=U health=H version=V`` (or ``not-ready`` / ``stopped``); a cluster
    adds one ``es node-i: ...`` line per node before the cluster's line."""
    lines: list[str] = []
    if config.nodes > 1:
        for state in status.nodes:
            word = "running" if state.alive else "stopped"
            pid = f" pid={state.pid}" if state.alive else ""
            lines.append(f"es {state.node.state.name}: {word}{pid} url={state.node.url}")
    alive = [s for s in status.nodes if s.alive]
    moved = [s for s in alive if s.running_port != s.node.http_port]
    pids = ",".join(str(s.pid) for s in alive)
    if moved:
        s = moved[0]
        lines.append(f"es: running pid={s.pid} on port {s.running_port}, not the requested {s.node.http_port}")
        return lines, False
    if not alive:
        lines.append(f"es: stopped url={config.es_url}")
        return lines, False
    nodes = f" nodes={status.number_of_nodes}/{config.nodes}" if config.nodes > 1 else ""
    if status.ready:
        lines.append(f"es: running pid={pids} url={config.es_url} health={status.health}{nodes} "
                     f"version={config.version}")
        return lines, True
    lines.append(f"es: not-ready pid={pids} url={config.es_url} health={status.health or 'no-answer'}{nodes}")
    return lines, False


def redis_lines(config: ServicesConfig, status: RedisStatus) -> tuple[list[str], bool]:
    """``redis: running pid=P url=U`` (or ``not-ready`` / ``stopped``) and whether it is ready."""
    if status.pid is None:
        return [f"redis: stopped url={config.redis_url}"], False
    word = "running" if status.answers else "not-ready"
    return [f"redis: {word} pid={status.pid} url={config.redis_url}"], status.answers


def status(config: ServicesConfig, target: str = "all") -> tuple[list[str], bool]:
    """The status lines of the named services, and True only if every one is up."""
    lines: list[str] = []
    ok = True
    for name in services_of(target):
        more, up = es_lines(config, es_status(config)) if name == "es" else redis_lines(config, redis_status(config))
        lines += more
        ok = ok and up
    return lines, ok
