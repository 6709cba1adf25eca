"""Keypoint cache for verification: Redis when configured, else in-process.

Cache-aside: the search reads the keypoint locations (and, when it matches descriptors
itself, the int8 descriptor codes) of its shortlisted images from here, asks the index for
the misses and writes them back; ``add`` fills the locations.  Keys carry a namespace: the
model id for locations, :func:`codes_namespace` of it for codes, so arrays of another model
never answer.  A cache that is down is a miss, never an error: search falls back to the
index and stays correct.

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


class LocationCache(Protocol):
    def get_many(self, model_id: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Cached arrays of those ids that are cached: (N, 2) float32 px locations under a
        model id, (N, D) int8 codes under its :func:`codes_namespace`."""
        ...

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None: ...

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None: ...


_DTYPES = {b"f": np.dtype("<f4"), b"b": np.dtype("i1")}


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

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            for image_id, array in locations.items():
                self._items[(model_id, image_id)] = _encode(array)
                self._items.move_to_end((model_id, image_id))
            while len(self._items) > self.max_images:
                self._items.popitem(last=False)

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None:
        with self._lock:
            for image_id in image_ids:
                self._items.pop((model_id, image_id), None)


class RedisLocationCache:
    """Arrays in Redis (see the module docstring) under ``<prefix>:<namespace>:<image_id>``.

    Entries expire after ``ttl_seconds`` (30 days), so a Redis with ``maxmemory-policy
    volatile-lru`` (scripts/services.sh) evicts cache entries, never a queue sharing it.
    Every Redis error is logged (at most once per ``warn_every`` s) and treated as a miss,
    with short socket timeouts so a stopped server costs milliseconds, not a hang.
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

    def _key(self, model_id: str, image_id: str) -> str:
        return f"{self.prefix}:{model_id}:{image_id}"

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > self.warn_every:
            self._last_warning = now
            log.warning("Redis location cache unavailable, reading from the index instead: %s", error)

    def get_many(self, model_id: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        ids = list(image_ids)
        if not ids:
            return {}
        try:
            values = self._client.mget([self._key(model_id, i) for i in ids])
        except self._errors as error:
            self._warn(error)
            return {}
        out = {}
        for image_id, value in zip(ids, values):
            if value is not None:
                try:
                    out[image_id] = _decode(value)
                except ValueError:  # written by another version of delf-es: a miss
                    continue
        return out

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None:
        if not locations:
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for image_id, array in locations.items():
                    pipe.set(self._key(model_id, image_id), _encode(array), ex=self.ttl_seconds)
                pipe.execute()
        except self._errors as error:
            self._warn(error)

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None:
        keys = [self._key(model_id, i) for i in image_ids]
        if not keys:
            return
        try:
            self._client.delete(*keys)
        except self._errors as error:
            self._warn(error)

    def close(self) -> None:
        self._client.close()
