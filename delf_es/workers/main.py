"""``celery -A delf_es.workers.main worker|beat``: the application built from ``DELF_ES_*`` settings."""

from delf_es.settings import Settings
from delf_es.workers.app import make_app

app = make_app(Settings())
