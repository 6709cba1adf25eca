"""Shared fixtures.  Model fixtures are session-scoped: building a backbone takes seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["services_fixture"]

# Resolved: file ids are canonical paths (symlinks resolved, delf_es/ids.py), so tests that compare
# ids with these paths hold where ../shared is a symlink too.
SHARED_DATA = (Path(__file__).resolve().parents[1].parent / "shared" / "data").resolve()


def shared(path: str) -> Path:
    """A file of ../shared/data; skips the test when the folder is absent (e.g. a user's checkout)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not available: {SHARED_DATA}")
    full = SHARED_DATA / path
    if not full.exists():  # the folder is there: a wrong name is a bug in the test, not a skip
        pytest.fail(f"missing shared file: {full}")
    return full


@pytest.fixture(scope="session")
def extractor():
    from delf_es.features import Extractor
    from delf_es.settings import Settings

    return Extractor(Settings())


@pytest.fixture(scope="session")
def raw_extractor():
    from delf_es.features import Extractor
    from delf_es.settings import Settings

    return Extractor(Settings(use_pca=False, scales=(0.5, 1.0), global_scales=(1.0,)))


@pytest.fixture()
def photo() -> np.ndarray:
    """A real photo (scikit-image's 'coffee', 600x400) as (H, W, 3) uint8."""
    from skimage import data

    return np.ascontiguousarray(data.coffee())


#: pytest-timeout for tests marked integration or slow that set no timeout themselves: long enough
#: for a cold services start (delf-es services downloads Elasticsearch, up to 900 s) plus the
#: test, short enough that a hang fails the run instead of stalling CI.  Others: pyproject's 900 s.
LONG_TEST_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None and (
            item.get_closest_marker("integration") or item.get_closest_marker("slow")
        ):
            item.add_marker(pytest.mark.timeout(LONG_TEST_TIMEOUT_S))
