"""A regular (non-editable) wheel install is complete: every module of the source tree, and the
top-level mappings/ (index templates, Kibana objects) found by the loaders from inside the package.

Builds the wheel offline (``pip wheel --no-build-isolation``) from a copy of what the Dockerfile
copies, installs it with ``pip install --target`` and imports it in a fresh interpreter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "delf_es", "mappings")

PROBE = """
import json
import delf_es
from delf_es.index.es import MAPPINGS_DIR, render_template
from delf_es.index.es.failures import MAPPING
from delf_es.workers.kibana import SAVED_OBJECTS, saved_objects
body = render_template(model_id="m@1", local_dims=40, global_dims=1280)
print(json.dumps({"package": delf_es.__file__, "mappings": str(MAPPINGS_DIR), "failures": str(MAPPING),
                  "kibana": str(SAVED_OBJECTS), "kibana_objects": len(saved_objects()),
                  "model_id": body["mappings"]["_meta"]["model_id"]}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to the sources
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(source)], check=True, capture_output=True)
    (built,) = out.glob("delf_es-*.whl")
    return built


def test_the_wheel_holds_every_module_and_the_mappings(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "delf_es").rglob("*.py")}
    assert modules - names == set()  # pyproject.toml lists the packages: a new one must be added there
    mappings = {"delf_es/mappings/" + str(p.relative_to(ROOT / "mappings"))
                for p in (ROOT / "mappings").rglob("*") if p.is_file()}
    assert mappings and mappings <= names


def test_an_installed_wheel_finds_its_mappings_inside_the_package(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                           check=True, capture_output=True, text=True)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    package = target / "delf_es"
    assert Path(found["package"]).parent == package  # the installed copy, not the checkout
    assert Path(found["mappings"]) == package / "mappings"
    assert Path(found["failures"]) == package / "mappings" / "failures-v1.json"
    assert Path(found["kibana"]) == package / "mappings" / "kibana" / "delf-es.ndjson"
    assert found["kibana_objects"] > 0 and found["model_id"] == "m@1"


def test_test_modules_have_unique_basenames():
    # tests/ has no __init__.py files (rootdir-relative "rootdir" import mode): two modules with the
    # same basename in different folders abort the whole collection ("import file mismatch"), which
    # happened twice (test_api.py, test_services.py) when work from two branches met on main.
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    names = Counter(path.name for path in tests.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
