"""BulkLoad's bookkeeping (delf_es/index/es/bulk_load.py) with a FAKE transport and aliases that
record the calls: which error wins when the restore fails too, nested loads, no index yet.  The
behaviour against the real Elasticsearch is in tests/integration/test_bulk_load.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from delf_es.errors import IndexUnavailable
from delf_es.index.es.bulk_load import BULK_SETTINGS, BulkLoad

INDICES = SimpleNamespace(images="a-v1-x", keypoints="a-keypoints-v1-x")
BEFORE = {"index.refresh_interval": "5s", "index.number_of_replicas": "1"}


class FakeTransport:
    """Answers get_settings with BEFORE; records every put_settings / refresh; can fail restores."""

    def __init__(self, fail_restore: bool = False) -> None:
        self.calls: list[tuple[str, str, dict | None]] = []
        self.fail_restore = fail_restore
        self.client = SimpleNamespace(indices=SimpleNamespace(
            get_settings=lambda index, flat_settings: {n: {"settings": dict(BEFORE)} for n in index.split(",")},
            put_settings=lambda index, settings: self.calls.append(("put", index, settings)),
            refresh=lambda index: self.calls.append(("refresh", index, None)),
        ))

    def call(self, action, function, *args, **kwargs):
        if self.fail_restore and action.startswith("restoring"):
            raise IndexUnavailable(f"down during {action}")
        return function(*args, **kwargs)


def load(transport: FakeTransport, indices=INDICES, writer=None) -> BulkLoad:
    writer = writer or SimpleNamespace(writers=1, bulk_loading=False)
    return BulkLoad(transport, SimpleNamespace(load=lambda: indices), writer, writers=3)


def test_settings_are_put_back_and_the_writers_reset_after_the_load():
    transport, writer = FakeTransport(), SimpleNamespace(writers=1, bulk_loading=False)
    with load(transport, writer=writer):
        assert writer.writers == 3 and writer.bulk_loading
    assert writer.writers == 1 and not writer.bulk_loading
    puts = [(index, settings) for op, index, settings in transport.calls if op == "put"]
    assert puts == [(INDICES.images, BULK_SETTINGS), (INDICES.keypoints, BULK_SETTINGS),
                    (INDICES.images, BEFORE), (INDICES.keypoints, BEFORE)]
    assert transport.calls[-1][0] == "refresh"


def test_the_loads_own_error_wins_when_the_restore_fails_too(caplog):
    transport = FakeTransport(fail_restore=True)
    with pytest.raises(RuntimeError, match="the load failed"):
        with load(transport):
            raise RuntimeError("the load failed")
    assert "restoring the settings" in caplog.text


def test_a_failed_restore_after_a_good_load_is_raised():
    with pytest.raises(IndexUnavailable, match="restoring"):
        with load(FakeTransport(fail_restore=True)):
            pass


def test_a_nested_load_changes_nothing():
    transport, writer = FakeTransport(), SimpleNamespace(writers=1, bulk_loading=False)
    with load(transport, writer=writer):
        calls = len(transport.calls)
        with load(transport, writer=writer):
            pass
        assert len(transport.calls) == calls and writer.writers == 3
    assert writer.writers == 1


def test_no_index_yet_changes_nothing():
    transport = FakeTransport()
    with load(transport, indices=None):
        pass
    assert transport.calls == []
