"""The operating-system side of the local services (Linux): pid files that are only trusted
when they point at our own live process, ports, stopping, the start/stop lock, Debian packages
and the unprivileged user Elasticsearch runs as."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

from delf_es.errors import ServiceFailed

logger = logging.getLogger("delf_es.services")

POLICY_RC = Path("/usr/sbin/policy-rc.d")


def read_pid(pidfile: Path) -> int | None:
    """The pid written in ``pidfile`` (digits only), or None when absent or empty."""
    try:
        digits = "".join(ch for ch in pidfile.read_text() if ch.isdigit())
    except OSError:
        return None
    return int(digits) if digits else None


def command_line(pid: int) -> str | None:
    """The process's arguments joined by spaces, with a trailing space (so a pattern ending in a
    space anchors the end of an argument); None for a process that is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:  # zombies and kernel threads have an empty command line
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace")


def matches(cmdline: str | None, patterns: Sequence[str]) -> bool:
    """Every pattern occurs in ``cmdline``."""
    return cmdline is not None and all(p in cmdline for p in patterns)


def pid_from_file(pidfile: Path, patterns: Sequence[str]) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line holds every pattern.

    This is what makes stop safe: a stale pidfile (after a crash or reboot the pid may belong to
    an unrelated process) never matches, and zombies have an empty command line."""
    pid = read_pid(pidfile)
    if pid is None:
        return None
    return pid if matches(command_line(pid), patterns) else None


def clear_stale_pidfile(pidfile: Path) -> None:
    """Remove a pidfile that does not point at our live process (callers checked that)."""
    if pidfile.exists():
        logger.info("removing stale pidfile %s (process %s is gone or not ours)", pidfile, read_pid(pidfile))
        pidfile.unlink(missing_ok=True)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def exited(pid: int) -> bool:
    """The process is gone, or a zombie (it has exited and only waits for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def wait_exit(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` has exited (not our child: ``waitpid`` cannot be used); True if it did."""
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def terminate(pid: int, name: str, timeout: float) -> None:
    """SIGTERM ``pid`` and wait until it exited; SIGKILL after ``timeout`` s as a last resort."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_exit(pid, timeout):
        logger.warning("%s (pid %d) did not exit %.0fs after SIGTERM; sending SIGKILL", name, pid, timeout)
        kill(pid)


def kill(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_exit(pid, timeout)


def start_group(command: Sequence[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in its own session (its own process group), stdout and stderr to ``log``
    and stdin closed, so that :func:`kill_group` reaches the children it forks too (a Celery
    worker's pool processes)."""
    with open(log, "wb") as out:
        return subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL ``proc``'s process group (a crash: nothing gets to clean up) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM ``proc``'s process group (an orderly stop) and wait; SIGKILL after ``timeout`` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, timeout)


@contextlib.contextmanager
def locked(lockfile: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on ``lockfile`` (two test runs, two shells: without it both could
    find "not running" and race to start the same port).  The daemons never inherit the lock:
    Python opens files non-inheritable and subprocess closes other descriptors.

    Raises:
        ServiceFailed: another caller held it for ``timeout`` s.
    """
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServiceFailed(f"another delf-es services has held {lockfile} for {timeout:.0f}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_command(command: str, package: str) -> str:
    """The path of ``command``, installing Debian package ``package`` with apt-get when it is
    missing (we are root on a fresh machine; Debian's archive is a reachable registry).

    Raises:
        ServiceFailed: not root, or apt-get failed.
    """
    found = shutil.which(command)
    if found:
        return found
    if not is_root():
        raise ServiceFailed(f"'{command}' is missing and we are not root to apt-get install {package}")
    logger.info("'%s' not found; installing Debian package %s", command, package)
    _apt(["update", "-qq"], f"apt-get update (for {package})")
    # policy-rc.d exit 101 stops the package's postinst from starting a system daemon
    # (redis-server would otherwise take port 6379 as user redis, and it would not be ours to stop).
    added = not POLICY_RC.exists()
    if added:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        _apt(["install", "-y", "-qq", "--no-install-recommends", package], f"apt-get install {package}")
    finally:
        if added:
            POLICY_RC.unlink(missing_ok=True)
    found = shutil.which(command)
    if not found:
        raise ServiceFailed(f"installed {package} but '{command}' is still not on PATH")
    return found


def _apt(args: list[str], what: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          check=False)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ServiceFailed(f"{what} failed (exit {proc.returncode}): {last[0]}")


def ensure_user(user: str) -> None:
    """Create system user ``user`` (Elasticsearch refuses to run as root) unless it exists."""
    if subprocess.run(["id", "-u", user], capture_output=True, check=False).returncode == 0:
        return
    logger.info("creating system user %s to run Elasticsearch (it refuses to run as root)", user)
    proc = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", user], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceFailed(f"useradd {user} failed: {proc.stderr.strip()}")


def _user_test(user: str, flag: str, path: Path) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", flag, str(path)], capture_output=True,
                          check=False).returncode == 0


def ensure_reachable(user: str, folder: Path) -> None:
    """Let ``user`` reach ``folder``: under /root (mode 700) it cannot, so grant search-only (x)
    permission on each ancestor that blocks it, by an ACL for that user when setfacl exists, else
    o+x.  Neither lets anyone list a folder, only pass through it.

    Raises:
        ServiceFailed: still not reachable.
    """
    for ancestor in reversed(folder.parents):
        if _user_test(user, "-x", ancestor):
            continue
        if shutil.which("setfacl"):
            logger.info("granting %s search access to %s (ACL u:%s:x)", user, ancestor, user)
            subprocess.run(["setfacl", "-m", f"u:{user}:x", str(ancestor)], check=False)
        else:
            logger.info("granting search-only access (o+x) to %s so %s can reach %s", ancestor, user, folder)
            ancestor.chmod(ancestor.stat().st_mode | 0o001)
    if not (_user_test(user, "-r", folder) and _user_test(user, "-x", folder)):
        raise ServiceFailed(f"user {user} cannot access {folder}; choose DELF_ES_SERVICES_HOME elsewhere")


def chown_tree(user: str, *paths: Path) -> None:
    """Give ``paths`` (recursively) to ``user`` and its group."""
    proc = subprocess.run(["chown", "-R", f"{user}:", *map(str, paths)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceFailed(f"chown -R {user} failed: {proc.stderr.strip()}")


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
