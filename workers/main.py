"""``celery -A workers.main worker|beat``: the application built from ``DELF_ES_*`` settings."""

from delf_es.settings import Settings
from workers.celery_app import make_app

app = make_app(Settings())
