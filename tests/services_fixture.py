"""The ``services`` fixture: real Elasticsearch and Redis for integration tests (a pytest plugin
loaded by tests/conftest.py, so every test folder can use it).

Use the session-scoped ``services`` fixture in any test marked
``@pytest.mark.integration``::

    @pytest.mark.integration
    def test_something(services):
        es = Elasticsearch(services.es_url)
        r = redis.Redis.from_url(services.redis_url)

It runs ``delf-es services start`` (delf_es/services/) once per test session (installing
Elasticsearch and Redis on first use, which can take a minute or two), and at
the end of the session stops only the services that *it* started: services that
were already running (e.g. started by hand for a dev loop) are left running.
Tests pass the URLs explicitly (``Settings(es_url=services.es_url, ...)``): the
environment is left alone, so other tests keep the embedded default.

If the services cannot be started the fixture fails (it never skips), with the
script's output in the failure message.

Environment:
  DELF_ES_KEEP_SERVICES=1  never stop the services at session end (faster reruns)
  and the services settings (DELF_ES_ES_PORT, DELF_ES_REDIS_PORT, DELF_ES_SERVICES_HOME...,
  docs/operations.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A cold start downloads ~130 MB of Elasticsearch and may apt-get install Redis;
# the command itself bounds ES startup to DELF_ES_ES_START_TIMEOUT (120 s).
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 180

_SERVICE_NAMES = ("es", "redis")


@dataclass(frozen=True)
class Services:
    """Where the running services are, and which ones this session started."""

    es_url: str  # e.g. http://127.0.0.1:9200
    redis_url: str  # e.g. redis://127.0.0.1:6379/0
    started_by_session: tuple[str, ...]  # subset of ("es", "redis"); stopped at session end


def run_services(
    action: str, target: str = "all", *args: str, timeout: float = START_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``delf-es services ACTION TARGET ARGS...`` of this checkout (with ``env`` added to the
    environment, e.g. another port) and return the completed process (never raises on exit code)."""
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    try:
        return subprocess.run(
            [sys.executable, "-m", "delf_es.cli", "services", action, target, *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # Hand back what was printed so far; the caller reports it.
        return subprocess.CompletedProcess(
            exc.cmd, returncode=-1, stdout=_text(exc.stdout), stderr=_text(exc.stderr) + f"\n[timed out after {timeout}s]"
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def _parse_assignments(stdout: str) -> dict[str, str]:
    """The KEY=VALUE lines that `delf-es services start` prints on stdout."""
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.startswith("DELF_ES_"):
            values[key] = value
    return values


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """Start Elasticsearch and Redis for the test session; see the module docstring."""
    proc = run_services("start", "all")
    if proc.returncode != 0:
        pytest.fail(f"delf-es services start failed, {_describe(proc)}", pytrace=False)
    values = _parse_assignments(proc.stdout)
    try:
        es_url = values["DELF_ES_ES_URL"]
        redis_url = values["DELF_ES_REDIS_URL"]
    except KeyError as missing:
        pytest.fail(f"delf-es services start did not print {missing}, {_describe(proc)}", pytrace=False)
    started = tuple(name for name in _SERVICE_NAMES if values.get(f"DELF_ES_{name.upper()}_STARTED") == "yes")

    try:
        yield Services(es_url=es_url, redis_url=redis_url, started_by_session=started)
    finally:
        # Under pytest-xdist every worker has its own session: the worker that
        # started the services could stop them while the others still test.
        keep = os.environ.get("DELF_ES_KEEP_SERVICES") == "1" or "PYTEST_XDIST_WORKER" in os.environ
        if not keep:
            failures = []
            for name in started:
                stop = run_services("stop", name, timeout=STOP_TIMEOUT_S)
                if stop.returncode != 0:
                    failures.append(f"stop {name}: {_describe(stop)}")
            if failures:
                pytest.fail("delf-es services stop failed:\n" + "\n".join(failures), pytrace=False)
