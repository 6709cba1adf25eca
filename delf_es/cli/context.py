"""What every command shares: the settings built from the global options (carried in the typer
context, never in module or class state), the console, error exits, inputs and progress bars."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from delf_es.errors import DelfEsError
from delf_es.settings import Settings

console = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line, whatever the width

#: Settings field -> the global option that sets it (for error messages).
OPTION_NAMES = {"backbone": "--backbone", "backbone_weights": "--backbone-weights", "scales": "--scales",
                "max_feature_num": "--max-features", "pca_path": "--pca", "use_pca": "--no-pca", "device": "--device",
                "scoring": "--scoring", "attention_weights": "--attention-weights"}


@dataclass(frozen=True)
class CliContext:
    """The global options of one run (``ctx.obj``): Settings overrides, applied over the
    ``DELF_ES_*`` environment when a command builds its settings."""

    overrides: Mapping[str, Any] = field(default_factory=dict)

    def settings(self, **extra: Any) -> Settings:
        """Validated settings (delf_es/validation.py); raises InvalidSetting (a DelfEsError)."""
        from delf_es.validation import load_settings

        return load_settings({**self.overrides, **extra}, OPTION_NAMES)

    def checked(self, *, model: bool = True, index: bool = False, **extra: Any) -> Settings:
        """Settings checked before anything heavy runs (device, files, index folder, URLs);
        a problem ends the command with a one-line error."""
        from delf_es.validation import preflight

        try:
            return preflight(self.settings(**extra), model=model, index=index,
                             overrides={**self.overrides, **extra}, options=OPTION_NAMES)
        except DelfEsError as error:
            fail(error)


def cli_context(ctx: typer.Context) -> CliContext:
    """The run's :class:`CliContext` (a bare one when a command is invoked without the callback)."""
    found = ctx.find_object(CliContext)
    return found if found is not None else CliContext()


def settings_of(ctx: typer.Context, **extra: Any) -> Settings:
    """The run's Settings (global options over the environment) with ``extra`` on top."""
    return cli_context(ctx).settings(**extra)


def checked_of(ctx: typer.Context, *, model: bool = True, index: bool = False, **extra: Any) -> Settings:
    """:func:`settings_of`, checked before anything heavy runs (:meth:`CliContext.checked`)."""
    return cli_context(ctx).checked(model=model, index=index, **extra)


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given; folders expanded to the images below them (sorted); ``@list.txt`` read line
    by line (delf_es/inputs.py: special files are never read, so a FIFO cannot hang the run).
    A bad ``@list`` or no image at all ends the command with a one-line error; an unreadable
    sub-folder is reported."""
    from delf_es.errors import UnreadableFile
    from delf_es.inputs import IMAGE_SUFFIXES, expand_inputs as expand

    inputs = list(inputs)
    try:
        found = expand(inputs)
    except DelfEsError as error:
        fail(error)
    for problem in found.unreadable:
        console.print(f"[yellow]skipped[/yellow] {escape(str(problem))}")
    if not found.sources:  # an empty folder or list: say so rather than "0 extracted"
        fail(UnreadableFile(f"no image files found (image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})",
                            " ".join(inputs)))
    return found.sources


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )


def fail(error: BaseException) -> NoReturn:
    """Print ``error`` and exit with status 2 (bad input or a service down: nothing to retry here)."""
    from delf_es.errors import IndexUnavailable

    message = str(error)
    if isinstance(error, IndexUnavailable) and message.startswith("Elasticsearch at "):
        message += " -- is it running? Check DELF_ES_ES_URL, or start it with delf-es services start"
    console.print(f"[red]error:[/red] {escape(message)}")  # paths may hold "[...]": never markup
    raise typer.Exit(code=2)
