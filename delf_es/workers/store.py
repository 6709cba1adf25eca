"""Redis state shared by the fleet: staged features, the index writer's lock, job progress.

Keys (all under ``<namespace>:delf:``):

* ``staged``   hash  key -> payload (JSON header line + ``Features.to_bytes()``), waiting for a bulk write;
* ``ready``    list  keys in arrival order; only the lock holder removes from its head;
* ``queued``   set   keys in ``ready`` (a duplicate never enters ``ready`` twice);
* ``waiters:<key>`` set of job ids to notify when ``key`` is written or fails;
* ``lock``     string  token of the one index writer (expires after ``worker_lock_ttl``);
* ``job:<id>:total`` / ``job:<id>:done`` (set of image ids) / ``job:<id>:failed`` (hash id -> error);
* ``failures`` list  failure records the index could not take when they happened (Elasticsearch
  down); the next writer copies them into their failures index;
* ``stats``    hash  summed seconds of decode / extract / write and counts;
* ``timings:<decode|extract|write>`` list  latest per-image / per-batch seconds (benchmarks read them).

A *key* is ``<alias>|<model_id>|<image_id>``: the idempotency key of a task (``model_id`` names
the backbone, head and PCA).  Staging and finishing are Lua scripts, so a duplicate message
arriving mid-write is either written in this batch or waits for the next, never lost.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import redis

from delf_es.index.es.failures import FailedImage
from delf_es.types import Features

#: Jobs and their progress are kept this long after their last update, s.
JOB_TTL_S = 7 * 24 * 3600
#: Per-item durations kept for ``timings`` (benchmarks and monitoring read the latest).
TIMINGS_KEPT = 10_000

_STAGE = """
local ns = ARGV[1]
redis.call('HSET', ns .. 'staged', ARGV[2], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('SADD', ns .. 'waiters:' .. ARGV[2], ARGV[4])
end
if redis.call('SADD', ns .. 'queued', ARGV[2]) == 1 then
  redis.call('RPUSH', ns .. 'ready', ARGV[2])
end
return 1
"""

# ARGV: ns, token, ttl_ms, count, then (key, image_id, error) triples ('' error = written).
_FINISH = """
local ns = ARGV[1]
if redis.call('GET', ns .. 'lock') ~= ARGV[2] then
  return 0
end
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local key, image_id, err = ARGV[5 + 3 * i], ARGV[6 + 3 * i], ARGV[7 + 3 * i]
  for _, job in ipairs(redis.call('SMEMBERS', ns .. 'waiters:' .. key)) do
    if err == '' then
      redis.call('SADD', ns .. 'job:' .. job .. ':done', image_id)
      redis.call('HDEL', ns .. 'job:' .. job .. ':failed', image_id)
      redis.call('EXPIRE', ns .. 'job:' .. job .. ':done', ARGV[3])
    else
      redis.call('HSET', ns .. 'job:' .. job .. ':failed', image_id, err)
      redis.call('EXPIRE', ns .. 'job:' .. job .. ':failed', ARGV[3])
    end
  end
  redis.call('DEL', ns .. 'waiters:' .. key)
  redis.call('HDEL', ns .. 'staged', key)
  redis.call('SREM', ns .. 'queued', key)
end
redis.call('LTRIM', ns .. 'ready', n, -1)
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def staging_key(alias: str, model_id: str, image_id: str) -> str:
    """The idempotency key of one image version: same alias, model (incl. PCA) and id = same work."""
    return f"{alias}|{model_id}|{image_id}"


@dataclass(frozen=True)
class Staged:
    """One image's features waiting for the index queue.

    Attributes:
        key: :func:`staging_key`.
        alias: the index alias to write to.
        path: stored path/URL of the image.
        metadata: JSON-able mapping stored with it.
        failures: name of the failures index to clear on success.
        features: the extracted features (``image_id``, ``model_id`` inside).
        thumbnail: the JPEG stored with the image (delf_es/thumbnails.py), or None.
    """

    key: str
    alias: str
    path: str
    metadata: dict[str, Any]
    failures: str
    features: Features
    thumbnail: bytes | None = None

    def encode(self) -> bytes:
        header = {"alias": self.alias, "path": self.path, "metadata": self.metadata, "failures": self.failures,
                  "thumbnail": base64.b64encode(self.thumbnail).decode("ascii") if self.thumbnail else None}
        return json.dumps(header).encode() + b"\n" + self.features.to_bytes()

    @classmethod
    def decode(cls, key: str, data: bytes) -> "Staged":
        header, _, body = data.partition(b"\n")
        meta = json.loads(header)
        thumbnail = base64.b64decode(meta["thumbnail"]) if meta.get("thumbnail") else None
        return cls(key, meta["alias"], meta["path"], meta["metadata"], meta["failures"], Features.from_bytes(body),
                   thumbnail)


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands: ``total`` images submitted, ``done`` indexed, ``failed`` id -> error."""

    job_id: str
    total: int
    done: int
    failed: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.done + len(self.failed) >= self.total


class Store:
    """The workers' Redis state (see the module docstring).  Cheap to build; holds one client."""

    def __init__(self, url: str, namespace: str) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30)
        self.prefix = f"{namespace}:delf:"
        self._stage = self.redis.register_script(_STAGE)
        self._finish = self.redis.register_script(_FINISH)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------------ jobs

    def start_job(self, job_id: str, total: int) -> None:
        key = f"{self.prefix}job:{job_id}:total"
        self.redis.set(key, total, ex=JOB_TTL_S)

    def progress(self, job_id: str) -> JobProgress:
        base = f"{self.prefix}job:{job_id}:"
        with self.redis.pipeline() as pipe:
            pipe.get(base + "total")
            pipe.scard(base + "done")
            pipe.hgetall(base + "failed")
            total, done, failed = pipe.execute()
        return JobProgress(
            job_id, int(total or 0), int(done), {k.decode(): v.decode() for k, v in (failed or {}).items()}
        )

    def fail(self, job_id: str | None, image_id: str, error: str) -> None:
        """Record an image that will not be indexed (e.g. undecodable) in its job."""
        if job_id:
            key = f"{self.prefix}job:{job_id}:failed"
            with self.redis.pipeline() as pipe:
                pipe.hset(key, image_id, error)
                pipe.expire(key, JOB_TTL_S)
                pipe.execute()

    # ------------------------------------------------------------------ deferred failure records

    def defer_failures(self, index: str, failed: list[FailedImage]) -> None:
        """Keep records for failures index ``index`` until the index is reachable again."""
        if failed:
            self.redis.rpush(self.prefix + "failures", *(json.dumps({"index": index, "failure": asdict(f)}) for f in failed))

    def deferred_failures(self, limit: int) -> list[tuple[str, FailedImage]]:
        """The oldest ``limit`` deferred records as (failures index, record)."""
        entries = [json.loads(raw) for raw in self.redis.lrange(self.prefix + "failures", 0, limit - 1)]
        return [(entry["index"], FailedImage(**entry["failure"])) for entry in entries]

    def drop_deferred_failures(self, count: int) -> None:
        """Forget the oldest ``count`` deferred records (written; only the lock holder calls this,
        so records deferred meanwhile, appended at the tail, are kept)."""
        self.redis.ltrim(self.prefix + "failures", count, -1)

    # ------------------------------------------------------------------ staging

    def stage(self, staged: Staged, job_id: str | None) -> None:
        self._stage(args=[self.prefix, staged.key, staged.encode(), job_id or ""])

    def ready_count(self) -> int:
        return int(self.redis.llen(self.prefix + "ready"))

    def peek(self, limit: int) -> list[tuple[str, bytes | None]]:
        """The first ``limit`` ready keys and their payloads (None if gone)."""
        keys = [k.decode() for k in self.redis.lrange(self.prefix + "ready", 0, limit - 1)]
        if not keys:
            return []
        payloads = self.redis.hmget(self.prefix + "staged", keys)
        return list(zip(keys, payloads))

    def finish(self, token: str, outcomes: list[tuple[str, str, str]]) -> bool:
        """Remove the first ``len(outcomes)`` ready keys, notifying their jobs.  ``outcomes`` are
        (key, image_id, error or '') in ``peek`` order.  False if the lock was lost (nothing done)."""
        args: list[Any] = [self.prefix, token, JOB_TTL_S, len(outcomes)]
        for outcome in outcomes:
            args.extend(outcome)
        return bool(self._finish(args=args))

    # ------------------------------------------------------------------ the writer's lock

    def acquire(self, token: str, ttl_s: float) -> bool:
        return bool(self.redis.set(self.prefix + "lock", token, nx=True, px=int(ttl_s * 1000)))

    def renew(self, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.prefix + "lock"], args=[token, int(ttl_s * 1000)]))

    def release(self, token: str) -> None:
        self._release(keys=[self.prefix + "lock"], args=[token])

    def claim_retry(self, seconds: float) -> bool:
        """True for one caller per ``seconds``: who schedules the retry of a flush blocked by the lock."""
        return bool(self.redis.set(self.prefix + "flush-retry", 1, nx=True, px=max(1, int(seconds * 1000))))

    # ------------------------------------------------------------------ stats

    def add_stats(self, **values: float) -> None:
        with self.redis.pipeline() as pipe:
            for name, value in values.items():
                pipe.hincrbyfloat(self.prefix + "stats", name, float(value))
            pipe.execute()

    def add_timings(self, **seconds: float) -> None:
        """Append per-item durations (capped lists ``timings:<name>``, the latest TIMINGS_KEPT)."""
        with self.redis.pipeline() as pipe:
            for name, value in seconds.items():
                pipe.rpush(f"{self.prefix}timings:{name}", float(value))
                pipe.ltrim(f"{self.prefix}timings:{name}", -TIMINGS_KEPT, -1)
            pipe.execute()

    def timings(self, name: str) -> list[float]:
        return [float(v) for v in self.redis.lrange(f"{self.prefix}timings:{name}", 0, -1)]

    def stats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.prefix + "stats").items()}

    def reset_stats(self) -> None:
        self.redis.delete(self.prefix + "stats", *(f"{self.prefix}timings:{n}" for n in ("decode", "extract", "write", "batch_size")))

    def keys(self) -> Iterable[bytes]:
        """Every key of this namespace's state (tests delete them)."""
        return self.redis.scan_iter(match=self.prefix + "*", count=1000)
