"""``python -m delf_es.cli ...`` = the ``delf-es`` console script."""

from delf_es.cli import app

app()
