"""delf-es over HTTP (FastAPI): see :mod:`delf_es.api.app` and docs/api.md."""

from delf_es.api.app import create_app

__all__ = ["create_app"]
