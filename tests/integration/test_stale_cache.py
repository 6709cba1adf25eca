"""A stale Redis cache never serves data older than the index (issue 15 item 1).

The reported failure: Redis paused (SIGSTOP) while an id is re-added, so the writer's cache
update is lost; searching with the new pixels then found that id with 7 inliers through Redis
against 1000 from the index alone, in new processes too, for the entries' 30 days.  Here the
Redis is one this test starts itself (its own port and dump file), paused or killed with -9,
and Elasticsearch is the real one from the ``services`` fixture.  Entries are keyed by the
index's revision of the image (cache.py), so a lost invalidation cannot matter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
import redis

from delf_es.eval.run import drop_indices
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of this test only: started, paused, killed and restarted by PID."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (delf-es services start installs it)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        pytest.fail("own redis-server did not start")

    def save(self) -> None:
        redis.Redis.from_url(self.url).save()  # the stale entries survive a restart from this dump

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture()
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def pictures():
    from skimage import data

    old = np.ascontiguousarray(data.astronaut()[:320, :320])
    new = np.ascontiguousarray(data.coffee()[40:360, 100:420])
    return old, new


def _png(pixels, path):
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return str(path)


def _settings(services, redis_url, alias):
    return Settings(es_url=services.es_url, redis_url=redis_url, index_alias=alias, **FAST)


@pytest.fixture()
def alias(services):
    from elasticsearch import Elasticsearch

    name = f"reliab-stale-{uuid.uuid4().hex[:8]}"
    yield name
    with Elasticsearch(services.es_url) as client:
        drop_indices(client, f"{name}*")


def _inliers(engine, query_path, image_id) -> int:
    hits = {h["id"]: h["inliers"] for h in engine.search_image(query_path, limit=5, min_inliers=0)}
    return hits.get(image_id, 0)


@pytest.mark.parametrize("outage", ["paused", "killed"])
def test_a_reindexed_image_is_never_served_from_a_stale_cache(services, own_redis, alias, pictures, tmp_path, outage):
    old, new = pictures
    old_path, new_path = _png(old, tmp_path / "old.png"), _png(new, tmp_path / "new.png")
    with DelfEs(_settings(services, own_redis.url, alias)) as engine:
        engine.add_image("X", img=old_path, refresh_after=True)
        assert _inliers(engine, old_path, "X") > 50  # the cache now holds X's old locations
    own_redis.save()
    assert redis.Redis.from_url(own_redis.url).dbsize() > 0

    if outage == "paused":
        own_redis.pause()
    else:
        own_redis.kill()
    with DelfEs(_settings(services, own_redis.url, alias)) as writer:
        writer.add_image("X", img=new_path, refresh_after=True)  # its cache update is lost
    if outage == "paused":
        own_redis.resume()
    else:
        own_redis.start()  # back from the dump: the old entries are there again
    assert redis.Redis.from_url(own_redis.url).dbsize() > 0

    # index alone: the truth
    with DelfEs(_settings(services, None, alias)) as plain:
        truth = _inliers(plain, new_path, "X")
        truth_old_query = _inliers(plain, old_path, "X")
    assert truth > 50 and truth_old_query < truth / 4
    # through the stale Redis, in a new engine (a new process would be the same), twice
    # (the second search reads what the first wrote back): exactly what the index alone says
    for _ in range(2):
        with DelfEs(_settings(services, own_redis.url, alias)) as engine:
            assert _inliers(engine, new_path, "X") == truth
            assert _inliers(engine, old_path, "X") == truth_old_query
