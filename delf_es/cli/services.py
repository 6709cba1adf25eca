"""``delf-es services start|stop|status [es|redis|all]``: the local Elasticsearch (one node or a
cluster on 127.0.0.1) and Redis (delf_es/services/).  Progress goes to stderr; ``start`` prints
``DELF_ES_*=...`` lines on stdout for ``eval``; ``status`` exits 0 only if every service is up."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer

from delf_es.cli.context import fail, settings_of
from delf_es.errors import DelfEsError

services_app = typer.Typer(no_args_is_help=True, help="Local Elasticsearch and Redis (installed on first use).")

TARGET = typer.Argument("all", help="es, redis or all")
NODES = typer.Option(None, "--nodes", min=1, max=9, help="Elasticsearch nodes on 127.0.0.1 as one cluster "
                     "(default DELF_ES_ES_NODES, 1)")


def _config(ctx: typer.Context, nodes: Optional[int]):
    from delf_es.services import services_config

    _progress_to_stderr()
    try:
        return services_config(settings_of(ctx), nodes)
    except DelfEsError as error:
        fail(error)


def _progress_to_stderr() -> None:
    logger = logging.getLogger("delf_es.services")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[services] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@services_app.command()
def start(ctx: typer.Context, target: str = TARGET, nodes: Optional[int] = NODES) -> None:
    """Install if needed, start (or start what is down of a cluster), wait until healthy."""
    from delf_es.services import start as start_services, status

    config = _config(ctx, nodes)
    try:
        started = start_services(config, target)
        lines, ok = status(config, target)
    except DelfEsError as error:
        fail(error)
    for line in lines:
        print(line, file=sys.stderr)
    for line in started.assignments():
        print(line)
    if not ok:
        raise typer.Exit(code=1)


@services_app.command()
def stop(
    ctx: typer.Context,
    target: str = TARGET,
    nodes: Optional[int] = NODES,
    node: Optional[int] = typer.Option(None, "--node", min=0, help="only this Elasticsearch node (0-based) of the "
                                       "--nodes cluster"),
    kill: bool = typer.Option(False, "--kill", help="with --node: SIGKILL it (a crash) instead of SIGTERM"),
) -> None:
    """Stop what delf-es started (never another process); without --nodes, every Elasticsearch node under the services home."""
    from delf_es.errors import ServiceFailed
    from delf_es.services import stop as stop_services

    config = _config(ctx, nodes)
    try:
        if kill and node is None:
            raise ServiceFailed("--kill needs --node K (SIGKILL one node)")
        stop_services(config, target, node=node, every_layout=nodes is None, sigkill=kill)
    except DelfEsError as error:
        fail(error)


@services_app.command()
def status(ctx: typer.Context, target: str = TARGET, nodes: Optional[int] = NODES) -> None:
    """One line per service (and per node of a cluster); exit 0 only if every one is up."""
    from delf_es.services import status as service_status

    config = _config(ctx, nodes)
    try:
        lines, ok = service_status(config, target)
    except DelfEsError as error:
        fail(error)
    for line in lines:
        print(line)
    if not ok:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.add_typer(services_app, name="services")
