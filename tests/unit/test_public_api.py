"""The package's front door: ``from delf_es import DelfEs`` works and ``import delf_es`` is cheap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "faiss", "numpy", "pydantic", "elasticsearch", "celery", "redis", "cv2")


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return proc.stdout


def test_the_readme_import_line_works():
    from delf_es import DelfEs
    from delf_es.sdk import DelfEs as defined

    assert DelfEs is defined


@pytest.mark.parametrize("name", ["DelfEs", "Settings", "ModelSpec", "Features", "SearchHit", "Correspondences", "DelfEsError",
                                  "InvalidImage", "InvalidRequest"])
def test_every_public_name_resolves(name):
    import delf_es

    assert name in delf_es.__all__
    assert getattr(delf_es, name).__name__ == name


def test_an_unknown_name_is_an_attribute_error():
    import delf_es

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        delf_es.nope  # noqa: B018


def test_import_delf_es_loads_no_heavy_library():
    loaded = json.loads(run(f"import sys, json, delf_es; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"))
    assert loaded == []


def test_submodules_still_import_through_the_package():
    assert run("from delf_es import verify; print(verify.__name__)").strip() == "delf_es.verify"
