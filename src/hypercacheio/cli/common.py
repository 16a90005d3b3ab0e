"""What every verb shares: its consoles, its settings, and the storage line it prints first."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ..config import Settings
from ..errors import HypercacheioError

WIDE = 10_000
"""Width of a console that is not a terminal: a pipe gets whole lines, never a value folded
mid-word at 80 columns."""


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if tty else WIDE)


def out() -> Console:
    """A console on stdout (made per call: click's test runner swaps the stream)."""
    return _console(stderr=False)


def err() -> Console:
    """A console on stderr."""
    return _console(stderr=True)


DIRECTORY_HELP = ("Storage directory (default: HYPERCACHEIO_SQLITE_PATH, else "
                  "$XDG_CACHE_HOME/hypercacheio, i.e. ~/.cache/hypercacheio).")

directory_option = click.option("--directory", "-d", default=None, metavar="PATH",
                                help=DIRECTORY_HELP)


def load_settings(directory: str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment; ``--directory`` and other given options win."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if directory:
        values["directory"] = directory
    try:
        return Settings.from_env(**values)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc


def show_storage(settings: Settings) -> None:
    """The first line of every verb that touches the store: which directory (on stderr, so
    that values and ``--json`` on stdout stay clean)."""
    err().print(f"[dim]storage: {escape(settings.directory)}[/dim]")
