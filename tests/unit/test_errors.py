"""Every error delf-es raises on purpose is a DelfEsError defined in delf_es/errors.py.

Checked on the source (an ast walk): a ``raise`` of a builtin exception is allowed only for the
few internal invariants listed here (a broken invariant is a bug, not input to report); an
exception class defined outside errors.py must be private (internal control flow).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import pickle
from pathlib import Path

import pytest

from delf_es import errors

PACKAGE = Path(__file__).resolve().parents[2] / "delf_es"

#: (module, exception): builtin raises that guard internal invariants, never user input.
INTERNAL_INVARIANTS = {
    ("model/backbone.py", "RuntimeError"),        # the network's stride does not match its preset
    ("model/receptive_field.py", "ValueError"),   # a layer table entry the formula does not cover
    ("model/pooling.py", "ValueError"),           # a tensor of the wrong rank inside the model
    ("index/embedded/keypoint_index.py", "RuntimeError"),  # faiss and SQLite out of step (rebuilt from SQLite)
    ("cache.py", "ValueError"),                   # a foreign cache value, caught as a miss next to it
    ("fetch.py", "TimeoutError"),                 # the download deadline, turned into FetchFailed
    ("fetch.py", "OSError"),                      # a dropped connection, turned into FetchFailed
    ("index/es/templates.py", "KeyError"),        # a shipped index template names an unknown parameter
    ("settings.py", "ValueError"),                # pydantic's validator protocol: raised as ValidationError
    ("__init__.py", "AttributeError"),            # the module __getattr__ protocol (PEP 562)
}


def _raised_builtins() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                if isinstance(getattr(builtins, name, None), type):
                    found.add((str(path.relative_to(PACKAGE)), name))
    return found


def test_user_input_never_gets_a_bare_builtin_exception():
    assert _raised_builtins() - INTERNAL_INVARIANTS == set()


def test_public_exception_classes_live_in_errors_py():
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in {"DelfEsError", "InvalidImage"} for b in bases):
                    outside.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert outside == []


def _error_classes() -> list[type[BaseException]]:
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, BaseException) and obj.__module__ == errors.__name__]


def test_every_error_derives_from_delf_es_error():
    # Interrupted is a KeyboardInterrupt on purpose (an ``except Exception`` must not swallow Ctrl-C)
    outside = [cls.__name__ for cls in _error_classes()
               if not issubclass(cls, (errors.DelfEsError, KeyboardInterrupt))]
    assert outside == []


def test_every_error_type_is_used_somewhere_else():
    files = list(PACKAGE.rglob("*.py"))
    sources = "\n".join(p.read_text() for p in files if p.name != "errors.py")
    unused = [cls.__name__ for cls in _error_classes() if cls.__name__ not in sources]
    assert unused == []


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    values = {"failures": [errors.ItemFailure("a", "bad")], "retries": 3, "status": 400, "report": "report"}
    exc = cls(*[values.get(p.name, f"{p.name} text") for p in params] or ["message"])
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls and str(copy) == str(exc) and copy.args == exc.args
