"""Installing the Elasticsearch distribution: the integ-test-zip from Maven Central (the only
Elasticsearch server build published there), checked against its pinned SHA-256 and unpacked
once into the services home.

It is a minimal build: server + modules apm, transport-netty4, x-pack-core, x-pack-security, and
no bundled JDK.  Works: dense_vector (int8_hnsw too), kNN search, aliases, bulk, scroll/PIT, core
aggregations.  Missing: the reindex module (no ``_reindex``, ``_update_by_query``,
``_delete_by_query``), lang-painless (no scripts), analysis-common, data streams, and ``GET /`` /
``HEAD /`` (the Python client's ``info()`` fails and ``ping()`` is False: use ``_cluster/health``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from delf_es.errors import ServiceFailed
from delf_es.services.config import ES_ZIP_SHA256, ServicesConfig, es_zip_url, maven_local_zip

logger = logging.getLogger("delf_es.services")

DOWNLOAD_TIMEOUT_S = 60.0
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path) -> None:
    """Stream ``url`` into ``target``.

    Raises:
        ServiceFailed: network or HTTP error.
    """
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as answer, open(target, "wb") as out:
            shutil.copyfileobj(answer, out, CHUNK)
    except (urllib.error.URLError, OSError) as error:
        raise ServiceFailed(f"could not download {url}: {getattr(error, 'reason', error)}", "es") from None


def unpack(archive: Path, destination: Path) -> None:
    """Unzip ``archive`` into ``destination`` keeping the Unix modes (zipfile alone drops the
    executable bits of bin/elasticsearch) and refusing members that would land outside it."""
    root = destination.resolve()
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            target = (destination / member.filename).resolve()
            if target != root and root not in target.parents:
                raise ServiceFailed(f"{archive.name}: member {member.filename!r} lies outside the folder", "es")
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(zipped.read(member).decode())
                continue
            zipped.extract(member, destination)
            if mode & 0o777 and not member.is_dir():
                os.chmod(target, stat.S_IMODE(mode))


def install_distribution(config: ServicesConfig, url: str | None = None, sha256: str = ES_ZIP_SHA256,
                         maven_repository_home: Path | None = None) -> Path:
    """Unpack the distribution into ``config.dist`` unless it is there; returns ``config.dist``.

    The zip comes from the local Maven repository when ``mvn`` cached it before
    (``~/.m2/repository/...``), else from ``url`` (default: Maven Central).  It is renamed into
    place last, so an interrupted install never leaves a half-unpacked folder that a later run
    would take for a complete one.

    Raises:
        ServiceFailed: download failed, SHA-256 mismatch, unexpected layout.
    """
    dist = config.dist
    if os.access(dist / "bin" / "elasticsearch", os.X_OK):
        return dist
    config.home.mkdir(parents=True, exist_ok=True)
    work = config.home / f".download-es-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        name = f"elasticsearch-{config.version}"
        cached = maven_local_zip(config.version, maven_repository_home)
        if cached.is_file() and sha256_of(cached) == sha256:
            logger.info("using %s from the local Maven repository", cached)
            archive = cached
        else:
            archive = work / f"{name}.zip"
            download(url or es_zip_url(config.version), archive)
            found = sha256_of(archive)
            if found != sha256:
                raise ServiceFailed(f"{archive.name} has SHA-256 {found}, expected {sha256} (corrupt download?)", "es")
        logger.info("unpacking Elasticsearch %s into %s", config.version, dist)
        try:
            unpack(archive, work / "unpacked")
        except zipfile.BadZipFile as error:
            raise ServiceFailed(f"unzip of {archive.name} failed: {error}", "es") from None
        unpacked = work / "unpacked" / name
        if not os.access(unpacked / "bin" / "elasticsearch", os.X_OK):
            raise ServiceFailed(f"unexpected layout in {archive.name}: no executable {name}/bin/elasticsearch", "es")
        shutil.rmtree(dist, ignore_errors=True)
        unpacked.rename(dist)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dist
