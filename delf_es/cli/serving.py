"""``delf-es serve``: the HTTP API and its page (delf_es/api/)."""

from __future__ import annotations

import typer

from delf_es.cli.context import cli_context, fail, settings_of
from delf_es.errors import DelfEsError


def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="address to listen on; beyond loopback only with DELF_ES_API_TOKEN"),
    port: int = typer.Option(8080, help="TCP port"),
    workers: int = typer.Option(1, help="processes (more than 1 needs Elasticsearch)"),
) -> None:
    """HTTP search server and web page (docs/api.md); OpenAPI at /docs."""
    from delf_es.api.serve import serve as run

    try:
        run(settings_of(ctx), host=host, port=port, workers=workers, overrides=cli_context(ctx).overrides)
    except DelfEsError as error:
        fail(error)


def register(app: typer.Typer) -> None:
    app.command()(serve)
