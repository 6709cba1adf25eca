"""Location caches: round trip, LRU bound, model ids kept apart, an unreachable Redis is a miss."""

from __future__ import annotations

import time

import numpy as np
import pytest

from delf_es.cache import MemoryLocationCache, RedisLocationCache


def test_memory_cache_round_trip_and_model_ids_are_separate():
    cache = MemoryLocationCache()
    locations = np.arange(10, dtype=np.float32).reshape(5, 2)
    cache.put_many("model-a", {"img": locations})
    np.testing.assert_array_equal(cache.get_many("model-a", ["img", "other"])["img"], locations)
    assert cache.get_many("model-b", ["img"]) == {}
    cache.delete("model-a", ["img"])
    assert cache.get_many("model-a", ["img"]) == {}


def _race(cache):
    """A reader misses, a writer replaces the image, then the reader writes back what it read
    from the index before the writer: the writer's arrays must survive."""
    old, new = np.zeros((3, 2), np.float32), np.ones((5, 2), np.float32)
    found, seen = cache.read_many("m", ["img", "fresh"])
    assert found == {}
    cache.put_many("m", {"img": new})  # the writer
    cache.fill_many("m", {"img": old, "fresh": old}, seen)  # the reader's late write-back
    got = cache.get_many("m", ["img", "fresh"])
    np.testing.assert_array_equal(got["img"], new)
    np.testing.assert_array_equal(got["fresh"], old)  # untouched by any writer: filled
    _, seen = cache.read_many("m", ["img"])
    cache.delete("m", ["img"])
    cache.fill_many("m", {"img": old}, seen)
    assert cache.get_many("m", ["img"]) == {}  # deleted since the read: not resurrected
    _, seen = cache.read_many("m", ["img"])
    cache.fill_many("m", {"img": new, "unasked": new}, seen)
    assert set(cache.get_many("m", ["img", "unasked"])) == {"img"}  # only ids the read saw


def test_memory_cache_write_back_never_overwrites_a_newer_version():
    _race(MemoryLocationCache())


def test_memory_cache_evicts_the_least_recently_used():
    cache = MemoryLocationCache(max_images=2)
    one = np.zeros((1, 2), np.float32)
    cache.put_many("m", {"a": one, "b": one})
    cache.get_many("m", ["a"])
    cache.put_many("m", {"c": one})
    assert set(cache.get_many("m", ["a", "b", "c"])) == {"a", "c"}


def test_unreachable_redis_is_a_miss_not_an_error():
    cache = RedisLocationCache("redis://127.0.0.1:9/0", socket_timeout=0.2)
    started = time.monotonic()
    cache.put_many("m", {"a": np.zeros((3, 2), np.float32)})
    assert cache.get_many("m", ["a"]) == {}
    cache.delete("m", ["a"])
    found, seen = cache.read_many("m", ["a"])
    cache.fill_many("m", {"a": np.zeros((3, 2), np.float32)}, seen)
    assert found == {} and seen == {}
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_redis_cache_round_trip(services):
    cache = RedisLocationCache(services.redis_url, prefix="test-cache")
    locations = np.random.default_rng(0).uniform(0, 1000, (1000, 2)).astype(np.float32)
    cache.put_many("model", {"x": locations, "y": locations[:3]})
    got = cache.get_many("model", ["x", "y", "z"])
    np.testing.assert_array_equal(got["x"], locations)
    assert got["y"].shape == (3, 2) and "z" not in got
    cache.delete("model", ["x", "y"])
    assert cache.get_many("model", ["x", "y"]) == {}
    cache.close()


@pytest.mark.integration
def test_redis_cache_write_back_never_overwrites_a_newer_version(services):
    import uuid

    cache = RedisLocationCache(services.redis_url, prefix=f"test-cache-{uuid.uuid4().hex[:8]}", ttl_seconds=600)
    try:
        _race(cache)
        assert 0 < cache._client.ttl(cache._version_key("m", "img")) <= 600  # versions expire too
    finally:
        keys = list(cache._client.scan_iter(match=f"{cache.prefix}:*"))
        if keys:
            cache._client.delete(*keys)
        cache.close()


def test_values_describe_their_dtype_and_width_so_codes_round_trip():
    from delf_es.cache import _decode, _encode, codes_namespace

    codes = np.arange(-60, 60, dtype=np.int8).reshape(3, 40)
    locations = np.arange(8, dtype=np.float32).reshape(4, 2)
    for array in (codes, locations, np.zeros((0, 2), np.float32)):
        back = _decode(_encode(array))
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
    with pytest.raises(ValueError):
        _decode(b"\x00\x00\x00\x00garbage")
    cache = MemoryLocationCache()
    cache.put_many(codes_namespace("m"), {"img": codes})
    assert cache.get_many("m", ["img"]) == {}  # locations and codes never answer for each other
    np.testing.assert_array_equal(cache.get_many(codes_namespace("m"), ["img"])["img"], codes)
