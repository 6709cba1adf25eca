"""What the local services look like on disk and on the network, from :class:`Settings` (pure:
nothing here touches a process, a port or a file).

Layout of ``services_home`` (absolute; one Elasticsearch distribution, versioned, shared by
every node; each node's mutable state beside it, so an upgrade keeps the data)::

    elasticsearch-9.5.3/          the distribution (read-only for the nodes)
    es/                           the single node (es_nodes = 1): config/ data/ logs/ tmp/
                                  es.pid  es.port  startup.log
    es-3nodes/node-0 .. node-2/   the nodes of a 3-node cluster, each laid out like es/
    redis/redis-<port>.pid|.log   Redis, per port (appendonlydir-<port>/ when append-only)
    .lock                         serialises start/stop across callers

Ports: node ``i`` serves HTTP on ``es_port + i`` and transport on ``es_transport_port + i``
(default ``es_port + 1100 + i``, so 9200 -> 10300, never the 9300 of another node).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from delf_es.errors import ServiceFailed
from delf_es.settings import Settings

#: Newest 9.x integ-test-zip on Maven Central that downloads (checked 2026-11-22; 9.5.3 is not
#: listed in the artifact's maven-metadata.xml but resolves fine).
ES_VERSION = "9.5.3"
#: Maven Central serves no .sha1 next to these zips, so the SHA-256 is pinned here.
ES_ZIP_SHA256 = "bec49f3b8d00e75c8d1cec85c35298635ec9fbd3ae80ef5aeb6bc05abdb3db2d"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
ES_ARTIFACT_PATH = "org/elasticsearch/distribution/integ-test-zip/elasticsearch"
MIN_JAVA = 21
HOST = "127.0.0.1"
#: Transport port of node 0 when ``es_transport_port`` is unset: HTTP port + this.
TRANSPORT_OFFSET = 1100
SINGLE_NODE_CLUSTER = "delf-es"
#: The single node's name, as the bash script named it (its data keeps working).
SINGLE_NODE_NAME = "delf-es-local"
REDIS_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
LOCK_TIMEOUT_S = 900.0
#: The main class on a node's command line (with ``-Des.path.home=<dist>``): what makes a pid ours.
ES_MAIN_CLASS = "org.elasticsearch.bootstrap.Elasticsearch"
#: JVM system property naming the node's state folder: tells apart nodes sharing a distribution.
NODE_MARKER = "-Ddelf_es.state="

_HEAP = re.compile(r"^[0-9]+[kKmMgG]$")


def es_zip_url(version: str = ES_VERSION, base: str = MAVEN_CENTRAL) -> str:
    """URL of the integ-test-zip distribution on Maven Central."""
    return f"{base}/{ES_ARTIFACT_PATH}/{version}/elasticsearch-{version}.zip"


def maven_local_zip(version: str = ES_VERSION, home: Path | None = None) -> Path:
    """Where ``mvn dependency:copy`` (the bash script's installer) cached the zip: reused when present."""
    root = home if home is not None else Path.home()
    return root / ".m2" / "repository" / ES_ARTIFACT_PATH / version / f"elasticsearch-{version}.zip"


@dataclass(frozen=True)
class NodeSpec:
    """One local Elasticsearch node: its name, ports and folders."""

    index: int  # 0-based position in the cluster
    name: str  # node.name
    http_port: int
    transport_port: int
    state: Path  # this node's folder: config/ data/ logs/ tmp/ es.pid es.port startup.log

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def label(self) -> str:
        """How messages name the node: ``es`` alone, ``es node-1`` in a cluster."""
        return "es" if self.state.name == "es" else f"es {self.state.name}"

    @property
    def conf(self) -> Path:
        return self.state / "config"

    @property
    def data(self) -> Path:
        return self.state / "data"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def tmp(self) -> Path:
        return self.state / "tmp"

    @property
    def pidfile(self) -> Path:
        return self.state / "es.pid"

    @property
    def portfile(self) -> Path:
        """The HTTP port the running node was started with."""
        return self.state / "es.port"

    @property
    def startup_log(self) -> Path:
        return self.state / "startup.log"


@dataclass(frozen=True)
class ServicesConfig:
    """Everything ``delf-es services`` needs, checked (see :func:`services_config`).

    Attributes:
        home: absolute ``services_home``.
        heap: ``-Xms``/``-Xmx`` of each node, e.g. ``512m``.
        start_timeout: s for a start until the cluster is healthy.
    """

    home: Path
    es_port: int
    transport_port: int
    nodes: int
    heap: str
    java_opts: str
    user: str
    start_timeout: float
    java_home: Path | None
    redis_port: int
    redis_appendonly: bool
    version: str = ES_VERSION

    @property
    def dist(self) -> Path:
        return self.home / f"elasticsearch-{self.version}"

    @property
    def cluster_root(self) -> Path:
        """Folder of this node count's state: ``es`` (one node) or ``es-<N>nodes``."""
        return self.home / ("es" if self.nodes == 1 else f"es-{self.nodes}nodes")

    @property
    def cluster_name(self) -> str:
        # A cluster's name carries its first port: two clusters on one machine never merge.
        return SINGLE_NODE_CLUSTER if self.nodes == 1 else f"delf-es-{self.es_port}"

    def node(self, index: int) -> NodeSpec:
        if not 0 <= index < self.nodes:
            raise ServiceFailed(f"no node {index}: the cluster has nodes 0..{self.nodes - 1}", "es")
        if self.nodes == 1:
            return NodeSpec(0, SINGLE_NODE_NAME, self.es_port, self.transport_port, self.cluster_root)
        return NodeSpec(index, f"delf-es-{index}", self.es_port + index, self.transport_port + index,
                        self.cluster_root / f"node-{index}")

    def node_specs(self) -> list[NodeSpec]:
        return [self.node(i) for i in range(self.nodes)]

    @property
    def es_url(self) -> str:
        """``DELF_ES_ES_URL`` for this cluster: every node's URL, comma-separated."""
        return ",".join(node.url for node in self.node_specs())

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def redis_state(self) -> Path:
        return self.home / "redis"

    @property
    def redis_pidfile(self) -> Path:
        # Per port: a start/stop/status for another port never touches this one's pidfile.
        return self.redis_state / f"redis-{self.redis_port}.pid"

    @property
    def redis_log(self) -> Path:
        return self.redis_state / f"redis-{self.redis_port}.log"

    @property
    def lockfile(self) -> Path:
        return self.home / ".lock"


def services_config(settings: Settings, nodes: int | None = None) -> ServicesConfig:
    """The checked services configuration of ``settings`` (``nodes`` overrides ``es_nodes``).

    Raises:
        ServiceFailed: ports out of range or colliding, a heap that is not like 512m.
    """
    count = settings.es_nodes if nodes is None else nodes
    if not 1 <= count <= 9:
        raise ServiceFailed(f"--nodes {count}: between 1 and 9 local nodes", "es")
    transport = settings.es_transport_port or settings.es_port + TRANSPORT_OFFSET
    if not _HEAP.match(settings.es_heap):
        raise ServiceFailed(f"heap must look like 512m or 1g, got {settings.es_heap!r}", "es")
    check_ports(settings.es_port, transport, count, settings.redis_port)
    return ServicesConfig(
        home=Path(settings.services_home).expanduser().absolute(),
        es_port=settings.es_port,
        transport_port=transport,
        nodes=count,
        heap=settings.es_heap,
        java_opts=settings.es_java_opts,
        user=settings.es_user,
        start_timeout=settings.es_start_timeout,
        java_home=settings.java_home,
        redis_port=settings.redis_port,
        redis_appendonly=settings.redis_appendonly,
    )


def check_ports(http: int, transport: int, nodes: int, redis: int) -> None:
    """Refuse port plans that cannot work: beyond 65535, or two uses of one port.

    Raises:
        ServiceFailed: naming the clash.
    """
    http_ports = list(range(http, http + nodes))
    transport_ports = list(range(transport, transport + nodes))
    if http_ports[-1] > 65535 or transport_ports[-1] > 65535:
        raise ServiceFailed(f"ports of {nodes} node(s) from HTTP {http} / transport {transport} exceed 65535", "es")
    clash = sorted(set(http_ports) & set(transport_ports))
    if clash:
        raise ServiceFailed(f"HTTP ports {http_ports} and transport ports {transport_ports} overlap at {clash[0]}; "
                            "set DELF_ES_ES_TRANSPORT_PORT elsewhere", "es")
    if redis in http_ports or redis in transport_ports:
        raise ServiceFailed(f"Redis port {redis} is also an Elasticsearch port", "redis")


def es_yml(config: ServicesConfig, node: NodeSpec, security_module: bool) -> str:
    """The node's ``elasticsearch.yml``, rewritten on every start (so settings apply).

    Args:
        security_module: the distribution has x-pack-security: only then may its switch be set
            (an ``xpack.*`` key no module registers makes Elasticsearch refuse to start).
    """
    lines = [
        "# Written by delf-es services (delf_es/services/) on every start; edits are lost.",
        f"cluster.name: {config.cluster_name}",
        f"node.name: {node.name}",
    ]
    if config.nodes == 1:
        lines.append("discovery.type: single-node")
    else:
        peers = ", ".join(f'"{HOST}:{peer.transport_port}"' for peer in config.node_specs())
        names = ", ".join(f'"{peer.name}"' for peer in config.node_specs())
        lines += [
            f"discovery.seed_hosts: [{peers}]",
            "# Only read when the cluster forms the first time (empty data folders).",
            f"cluster.initial_master_nodes: [{names}]",
        ]
    lines += [
        f"network.host: {HOST}",
        f"http.port: {node.http_port}",
        f"transport.port: {node.transport_port}",
        f"path.data: {node.data}",
        f"path.logs: {node.logs}",
        "# A nearly full dev disk must not turn indices read-only.",
        "cluster.routing.allocation.disk.threshold_enabled: false",
    ]
    if security_module:
        lines += ["# Local dev/test nodes on loopback: plain HTTP, no auth.", "xpack.security.enabled: false"]
    return "\n".join(lines) + "\n"


def es_java_opts(config: ServicesConfig, node: NodeSpec) -> str:
    """``ES_JAVA_OPTS`` of a node: the heap, the marker naming its folder, the extra options."""
    return f"-Xms{config.heap} -Xmx{config.heap} {NODE_MARKER}{node.state} {config.java_opts}".strip()


def redis_conf(config: ServicesConfig) -> str:
    """Redis's configuration (given on stdin, so nothing of /etc/redis is used)."""
    lines = [
        f"bind {HOST}",
        f"port {config.redis_port}",
        "protected-mode yes",
        "daemonize yes",
        f"pidfile {config.redis_pidfile}",
        f"logfile {config.redis_log}",
        f"dir {config.redis_state}",
        'save ""',
    ]
    if config.redis_appendonly:
        # The fault test restarts Redis mid-ingest: queues and task state must survive it.
        lines += ["appendonly yes", "appendfsync everysec", f"appenddirname appendonlydir-{config.redis_port}"]
    else:
        lines.append("appendonly no")  # a cache and queue for tests: nothing persisted
    lines += [
        "# With a maxmemory set, evict only keys with a TTL: the keypoint cache's entries expire,",
        "# Celery's queues do not (they share this server).",
        "maxmemory-policy volatile-lru",
    ]
    return "\n".join(lines) + "\n"
