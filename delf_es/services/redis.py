"""The local Redis: Debian's ``redis-server`` (installed with apt-get when missing), on
127.0.0.1, one per port, configured from stdin so nothing of /etc/redis is used.

A Redis is ours only if the pidfile of its port names a live ``redis-server 127.0.0.1:<port>``
(its process title), so a start never kills or adopts a Redis someone else runs on that port."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from dataclasses import dataclass

from delf_es.errors import ServiceFailed
from delf_es.services import system
from delf_es.services.config import HOST, REDIS_START_TIMEOUT_S, STOP_TIMEOUT_S, ServicesConfig, redis_conf

logger = logging.getLogger("delf_es.services")


@dataclass(frozen=True)
class RedisStatus:
    pid: int | None  # None: not running (as ours)
    answers: bool  # PING -> PONG

    @property
    def ready(self) -> bool:
        return self.pid is not None and self.answers


def redis_pid(config: ServicesConfig) -> int | None:
    # The trailing space keeps port 637 from matching 6379.
    return system.pid_from_file(config.redis_pidfile, ("redis-server", f"{HOST}:{config.redis_port} "))


def ping(port: int, host: str = HOST, timeout: float = 2.0) -> bool:
    """Redis on host:port answers PING with PONG (the inline protocol: no client needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_status(config: ServicesConfig) -> RedisStatus:
    pid = redis_pid(config)
    return RedisStatus(pid, pid is not None and ping(config.redis_port))


def start_redis(config: ServicesConfig) -> bool:
    """Start Redis unless ours runs on this port; returns whether this call started it.

    Raises:
        ServiceFailed: the port is held by another process, redis-server cannot be installed or
            does not answer PING within 30 s (then it is stopped again).
    """
    pid = redis_pid(config)
    if pid is not None:
        logger.info("Redis already running (pid %d)", pid)
        return False
    system.clear_stale_pidfile(config.redis_pidfile)
    if system.port_in_use(config.redis_port):
        raise ServiceFailed(f"port {HOST}:{config.redis_port} is in use by a process delf-es did not start; stop it "
                            "or set DELF_ES_REDIS_PORT", "redis")
    server = system.ensure_command("redis-server", "redis-server")
    config.redis_state.mkdir(parents=True, exist_ok=True)
    logger.info("starting Redis on %s%s", config.redis_url, " (append-only file on)" if config.redis_appendonly else "")
    proc = subprocess.run([server, "-"], input=redis_conf(config), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceFailed(f"redis-server failed to start (exit {proc.returncode}); see {config.redis_log}", "redis")
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while not ping(config.redis_port):
        if time.monotonic() >= deadline:
            logger.error("----- last lines of %s -----\n%s", config.redis_log, system.tail(config.redis_log, 20))
            pid = redis_pid(config)
            if pid is not None:
                system.terminate(pid, "Redis", STOP_TIMEOUT_S)
            raise ServiceFailed(f"did not answer PING within {REDIS_START_TIMEOUT_S:.0f}s", "redis")
        time.sleep(0.2)
    logger.info("Redis up (pid %s)", redis_pid(config))
    return True


def stop_redis(config: ServicesConfig) -> int | None:
    """SIGTERM our Redis of this port and wait until it exited; returns its pid (None: not running)."""
    pid = redis_pid(config)
    if pid is None:
        system.clear_stale_pidfile(config.redis_pidfile)
        logger.info("Redis was not running")
        return None
    logger.info("stopping Redis (pid %d)", pid)
    system.terminate(pid, "Redis", STOP_TIMEOUT_S)
    config.redis_pidfile.unlink(missing_ok=True)
    logger.info("Redis stopped")
    return pid
