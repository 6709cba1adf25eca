"""Keypoint-location cache for verification: Redis when configured, else in-process.

Cache-aside: the search reads locations of its shortlisted images from here, asks the
index for the misses and writes them back; ``add`` fills it.  Keys carry the model
id, so locations of another model never answer.  A cache that is down is a miss,
never an error: search falls back to the index and stays correct.
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
        """Cached (N, 2) float32 px locations of those ids that are cached."""
        ...

    def put_many(self, model_id: str, locations: Mapping[str, np.ndarray]) -> None: ...

    def delete(self, model_id: str, image_ids: Iterable[str]) -> None: ...


def _encode(locations: np.ndarray) -> bytes:
    return np.ascontiguousarray(locations, dtype=np.float32).tobytes()


def _decode(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(-1, 2).copy()


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
    """Locations in Redis as raw float32 bytes under ``<prefix>:<model_id>:<image_id>``.

    Every Redis error is logged (at most once per ``warn_every`` s) and treated as a miss,
    with short socket timeouts so a stopped server costs milliseconds, not a hang.
    """

    def __init__(
        self, url: str, prefix: str = "delf-es:kp", ttl_seconds: int | None = None,
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
        return {i: _decode(v) for i, v in zip(ids, values) if v is not None}

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
