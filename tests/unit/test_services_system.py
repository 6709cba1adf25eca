"""Process groups of delf_es.services.system with real processes: a worker's children die with it."""

from __future__ import annotations

import os
import sys
import time

from delf_es.services.system import exited, kill_group, start_group, stop_group

# a parent that forks a child (like a Celery worker its pool) and prints the child's pid
PARENT = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
          " print(child.pid, flush=True); time.sleep(60)")


def _child_pid(log) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text().strip()
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError("the parent never printed its child's pid")


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited(pid):
            return True
        time.sleep(0.05)
    return False


def test_kill_group_takes_the_children_too(tmp_path):
    log = tmp_path / "parent.log"
    proc = start_group([sys.executable, "-c", PARENT], log, dict(os.environ))
    child = _child_pid(log)
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(os.getpid())  # its own group, not ours
    kill_group(proc)
    assert proc.returncode == -9 and _gone(child)


def test_stop_group_terminates_and_tolerates_a_process_already_gone(tmp_path):
    log = tmp_path / "parent.log"
    proc = start_group([sys.executable, "-c", PARENT], log, dict(os.environ))
    child = _child_pid(log)
    stop_group(proc, timeout=10)
    assert proc.returncode == -15 and _gone(child)
    stop_group(proc)  # already stopped: nothing to do, no error
    done = start_group([sys.executable, "-c", "pass"], tmp_path / "done.log", dict(os.environ))
    done.wait(timeout=20)
    kill_group(done)  # exited before: no ProcessLookupError escapes
    assert done.returncode == 0
