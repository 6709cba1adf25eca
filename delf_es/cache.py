"""Keypoint cache for verification: Redis when configured, else in-process.

Cache-aside: the search reads the keypoint locations (and, when it matches descriptors
itself, the int8 descriptor codes) of its shortlisted images from here, asks the index for
the misses and writes them back; ``add`` fills the locations.  Keys carry a namespace: the
model id for locations, :func:`codes_namespace` of it for codes, so arrays of another model
never answer.  A cache that is down is a miss, never an error: search falls back to the
index and stays correct.

Keys are revisions, not ids: the search asks the index for the current revision of each
shortlisted image (Elasticsearch: the image document's ``generation``; embedded: its row) and
reads ``<id>@<revision>`` (:func:`revision_key`).  A cached entry of another write of the same id
is therefore a miss, however the cache was left: Redis paused (SIGSTOP) or killed while an id
was re-added, restarted from an old snapshot, partitioned.  Nothing has to be invalidated for
correctness; old revisions expire.

Writers (``put_many``, ``delete``) also bump a per-key version; a reader's write-back
(``fill_many``) only lands if the version is still the one its ``read_many`` saw.  Without
this, a search that read an image from the index just before another process rewrote it
could write the old arrays back after the writer's invalidation, and they would answer
until the entry expired.

Values are self-describing 2-D arrays: a 4-byte header (dtype code, column count) + the raw
little-endian rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Iterable, Mapping, Protocol

import numpy as np

log = logging.getLogger(__name__)


#: Versions of the images a ``read_many`` asked for, as it saw them (None: never written).
Versions = Mapping[str, "int | None"]


class LocationCache(Protocol):
    def get_many(self, model_id: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Cached arrays of those ids that are cached: (N, 2) float32 px locations under a
        model id, (N, D) int8 codes under its :func:`codes_namespace`."""
        ...

    def read_many(self, model_id: str, image_ids: Iterable[str]) -> tuple[dict[str, np.ndarray], Versions]:
        """``get_many`` plus the version of every id, for a later :meth:`fill_many`."""
        ...

    def fill_many(self, model_id: str, arrays: Mapping[str, np.ndarray], seen: Versions) -> None:
        """Write back arrays read from the index, except those of images a writer touched
        since ``seen`` was read (their arrays may be older than the writer's)."""
        ...

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None:
        """Writer: the arrays of a new version of each image."""
        ...

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None:
        """Writer: the images changed or are gone."""
        ...


_DTYPES = {b"f": np.dtype("<f4"), b"b": np.dtype("i1")}


def revision_key(image_id: str, revision: str) -> str:
    """Cache key of one revision of an image: the index's token for that write (Elasticsearch:
    the image document's random ``generation``; embedded: the SQLite row, new at every write)."""
    return f"{image_id}@{revision}"


def image_revisions(backend, image_ids: Iterable[str]) -> dict[str, str]:
    """``backend.revisions(image_ids)``: the current revision of each indexed id.  A backend
    without revisions (a test double) answers "0" for every id, the old unversioned keys."""
    ids = list(image_ids)
    if not ids:
        return {}
    revisions = getattr(backend, "revisions", None)
    return revisions(ids) if revisions is not None else {i: "0" for i in ids}


def codes_namespace(model_id: str) -> str:
    """Namespace of the int8 descriptor codes of ``model_id``'s images."""
    return f"{model_id}#codes"


def _encode(array: np.ndarray) -> bytes:
    """(N, C) float32 or int8 array -> header + raw rows."""
    kind = b"b" if array.dtype == np.int8 else b"f"
    rows = np.ascontiguousarray(array, dtype=_DTYPES[kind])
    columns = rows.shape[1] if rows.ndim == 2 else 2
    return kind + columns.to_bytes(3, "little") + rows.tobytes()


def _decode(data: bytes) -> np.ndarray:
    kind, columns = data[:1], int.from_bytes(data[1:4], "little")
    if kind not in _DTYPES or columns <= 0:
        raise ValueError("not a delf-es cache value")
    return np.frombuffer(data, dtype=_DTYPES[kind], offset=4).reshape(-1, columns).copy()


class MemoryLocationCache:
    """In-process LRU cache (the embedded default), bounded by number of images."""

    def __init__(self, max_images: int = 100_000) -> None:
        self.max_images = max_images
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        # Writes per image; bounded like the items (an evicted count reads as None, so a
        # fill that saw a count is refused, never wrongly accepted).
        self._versions: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, model_id: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        with self._lock:
            for image_id in image_ids:
                data = self._items.get((model_id, image_id))
                if data is not None:
                    self._items.move_to_end((model_id, image_id))
                    out[image_id] = _decode(data)
        return out

    def read_many(self, model_id: str, image_ids: Iterable[str]) -> tuple[dict[str, np.ndarray], Versions]:
        ids = list(image_ids)
        with self._lock:
            seen = {image_id: self._versions.get((model_id, image_id)) for image_id in ids}
        return self.get_many(model_id, ids), seen

    def fill_many(self, model_id: str, arrays: Mapping[str, np.ndarray], seen: Versions) -> None:
        with self._lock:
            current = {i: a for i, a in arrays.items() if i in seen and self._versions.get((model_id, i)) == seen[i]}
            self._store(model_id, current)

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            self._bump(model_id, locations)
            self._store(model_id, locations)

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None:
        with self._lock:
            ids = list(image_ids)
            self._bump(model_id, ids)
            for image_id in ids:
                self._items.pop((model_id, image_id), None)

    def _bump(self, model_id: str, image_ids: Iterable[str]) -> None:
        for image_id in image_ids:
            key = (model_id, image_id)
            self._versions[key] = self._versions.get(key, 0) + 1
            self._versions.move_to_end(key)
        while len(self._versions) > 2 * self.max_images:
            self._versions.popitem(last=False)

    def _store(self, model_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        for image_id, array in arrays.items():
            self._items[(model_id, image_id)] = _encode(array)
            self._items.move_to_end((model_id, image_id))
        while len(self._items) > self.max_images:
            self._items.popitem(last=False)


class RedisLocationCache:
    """Arrays in Redis (see the module docstring) under ``<prefix>:<namespace>:<image_id>``.

    Entries expire after ``ttl_seconds`` (30 days), so a Redis with ``maxmemory-policy
    volatile-lru`` (delf_es/services/config.py) evicts cache entries, never a queue sharing it.
    Every Redis error is logged (at most once per ``warn_every`` s) and treated as a miss,
    with short socket timeouts so a stopped server costs milliseconds, not a hang.

    Versions live beside the values (``<prefix>:v:<namespace>:<image_id>``, an INCR counter
    with the same expiry); ``fill_many`` compares and sets in one Lua script, so no writer
    can slip between the check and the write.
    """

    # KEYS: value keys then version keys (n each); ARGV: ttl (0 = none), then n expected
    # versions ('' = none), then n values.
    _FILL = """
    local n = #KEYS / 2
    local ttl = tonumber(ARGV[1])
    for i = 1, n do
        local version = redis.call('GET', KEYS[n + i]) or ''
        if version == ARGV[1 + i] then
            if ttl > 0 then
                redis.call('SET', KEYS[i], ARGV[1 + n + i], 'EX', ttl)
            else
                redis.call('SET', KEYS[i], ARGV[1 + n + i])
            end
        end
    end
    return 0
    """

    def __init__(
        self, url: str, prefix: str = "delf-es:kp2", ttl_seconds: int | None = 30 * 24 * 3600,
        socket_timeout: float = 0.5, warn_every: float = 30.0,
    ) -> None:
        import redis

        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.warn_every = warn_every
        self._last_warning = 0.0
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError,
                        OSError)
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry_on_timeout=False
        )
        self._fill = self._client.register_script(self._FILL)  # EVALSHA, loaded on first use

    def _key(self, model_id: str, image_id: str) -> str:
        return f"{self.prefix}:{model_id}:{image_id}"

    def _version_key(self, model_id: str, image_id: str) -> str:
        return f"{self.prefix}:v:{model_id}:{image_id}"

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > self.warn_every:
            self._last_warning = now
            log.warning("Redis location cache unavailable, reading from the index instead: %s", error)

    def get_many(self, model_id: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        return self._read(model_id, list(image_ids), versions=False)[0]

    def read_many(self, model_id: str, image_ids: Iterable[str]) -> tuple[dict[str, np.ndarray], Versions]:
        return self._read(model_id, list(image_ids), versions=True)

    def _read(self, model_id: str, ids: list[str], versions: bool) -> tuple[dict[str, np.ndarray], Versions]:
        """One MGET of the values (and, for a later fill, their versions)."""
        if not ids:
            return {}, {}
        keys = [self._key(model_id, i) for i in ids]
        if versions:
            keys += [self._version_key(model_id, i) for i in ids]
        try:
            values = self._client.mget(keys)
        except self._errors as error:
            self._warn(error)
            return {}, {}  # nothing seen: nothing will be filled
        out, seen = {}, {}
        for position, image_id in enumerate(ids):
            if versions:
                version = values[len(ids) + position]
                seen[image_id] = int(version) if version is not None else None
            if values[position] is not None:
                try:
                    out[image_id] = _decode(values[position])
                except ValueError:  # written by another version of delf-es: a miss
                    continue
        return out, seen

    def fill_many(self, model_id: str, arrays: Mapping[str, np.ndarray], seen: Versions) -> None:
        ids = [i for i in arrays if i in seen]
        if not ids:
            return
        keys = [self._key(model_id, i) for i in ids] + [self._version_key(model_id, i) for i in ids]
        expected = ["" if seen[i] is None else str(seen[i]) for i in ids]
        try:
            self._fill(keys=keys, args=[self.ttl_seconds or 0, *expected, *[_encode(arrays[i]) for i in ids]])
        except self._errors as error:
            self._warn(error)

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None:
        if not locations:
            return
        try:
            with self._client.pipeline(transaction=True) as pipe:
                for image_id, array in locations.items():
                    self._bump(pipe, model_id, image_id)
                    pipe.set(self._key(model_id, image_id), _encode(array), ex=self.ttl_seconds)
                pipe.execute()
        except self._errors as error:
            self._warn(error)

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None:
        ids = list(image_ids)
        if not ids:
            return
        try:
            with self._client.pipeline(transaction=True) as pipe:
                for image_id in ids:
                    self._bump(pipe, model_id, image_id)
                pipe.delete(*[self._key(model_id, i) for i in ids])
                pipe.execute()
        except self._errors as error:
            self._warn(error)

    def _bump(self, pipe, model_id: str, image_id: str) -> None:
        key = self._version_key(model_id, image_id)
        pipe.incr(key)
        if self.ttl_seconds:
            pipe.expire(key, self.ttl_seconds)

    def close(self) -> None:
        self._client.close()
