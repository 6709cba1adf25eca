"""What every command shares: the settings built from the global options (carried in the typer
context, never in module or class state), the console, error exits and progress bars."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from delf_es.errors import ConfigurationError
from delf_es.settings import Settings

console = Console(stderr=True)


@dataclass(frozen=True)
class CliContext:
    """The global options of one run (``ctx.obj``): Settings overrides, applied over the
    ``DELF_ES_*`` environment when a command builds its settings."""

    overrides: Mapping[str, Any] = field(default_factory=dict)

    def settings(self, **extra: Any) -> Settings:
        """The run's Settings with ``extra`` on top; a bad value is a ConfigurationError."""
        try:
            return Settings(**{**self.overrides, **extra})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
            raise ConfigurationError(f"invalid settings: {problems}") from None


def cli_context(ctx: typer.Context) -> CliContext:
    """The run's :class:`CliContext` (a bare one when a command is invoked without the callback)."""
    found = ctx.find_object(CliContext)
    return found if found is not None else CliContext()


def settings_of(ctx: typer.Context, **extra: Any) -> Settings:
    """The run's Settings (global options over the environment) with ``extra`` on top."""
    return cli_context(ctx).settings(**extra)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )


def fail(error: BaseException) -> NoReturn:
    """Print ``error`` and exit with status 2 (bad input or a service down: nothing to retry here)."""
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(code=2)
