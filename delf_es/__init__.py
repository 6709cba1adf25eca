"""delf-es: instance-level image search with DELF/DELG features.

    from delf_es import DelfEs
    engine = DelfEs()

``import delf_es`` stays cheap (no torch, faiss, pydantic or Elasticsearch client): the public
names below are imported on first use (PEP 562 module ``__getattr__``), so a CLI ``--help`` or a
worker that only needs the errors does not pay for the model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from delf_es.errors import DelfEsError, InvalidImage, InvalidRequest

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these load lazily
    from delf_es.model.spec import ModelSpec
    from delf_es.sdk import DelfEs
    from delf_es.settings import Settings
    from delf_es.types import Correspondences, Features, SearchHit

#: public name -> module that defines it (imported on first access)
_LAZY = {
    "DelfEs": "delf_es.sdk",
    "ModelSpec": "delf_es.model.spec",
    "Settings": "delf_es.settings",
    "Correspondences": "delf_es.types",
    "Features": "delf_es.types",
    "SearchHit": "delf_es.types",
}

__all__ = ["Correspondences", "DelfEs", "DelfEsError", "Features", "InvalidImage", "InvalidRequest", "ModelSpec",
           "SearchHit", "Settings"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'delf_es' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
