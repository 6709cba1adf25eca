"""The local services delf-es runs against: Elasticsearch 9 (one node, or several on 127.0.0.1
as one cluster) and Redis, installed on first use, started, checked and stopped by
``delf-es services`` (scripts/services.sh is a wrapper around it).

* :mod:`~delf_es.services.config`: the layout, ports and config files, from :class:`Settings`;
* :mod:`~delf_es.services.system`: pid files, ports, stopping, the lock, apt-get, users;
* :mod:`~delf_es.services.java`: the JDK; :mod:`~delf_es.services.distribution`: the download;
* :mod:`~delf_es.services.elasticsearch`, :mod:`~delf_es.services.redis`: each service;
* :mod:`~delf_es.services.commands`: start / stop / status of ``es``, ``redis`` or ``all``.

    config = services_config(settings, nodes=3)
    start(config, "es").assignments()   # ['DELF_ES_ES_URL=http://127.0.0.1:9200,...', ...]
    kill_node(config, 1); restart_node(config, 1)
    stop(config, "all")
"""

from __future__ import annotations

from delf_es.services.commands import Started, start, status, stop
from delf_es.services.config import ES_VERSION, NodeSpec, ServicesConfig, services_config
from delf_es.services.elasticsearch import ClusterStatus, es_status, kill_node, restart_node, start_es, stop_es
from delf_es.services.redis import redis_status, start_redis, stop_redis

__all__ = ["ES_VERSION", "ClusterStatus", "NodeSpec", "ServicesConfig", "Started", "es_status", "kill_node",
           "redis_status", "restart_node", "services_config", "start", "start_es", "start_redis", "status", "stop",
           "stop_es", "stop_redis"]
