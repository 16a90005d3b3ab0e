"""The store's verbs: install, stats, get, set, delete, clear, purge."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from ..auth import TOKEN_VAR, token_display
from ..cache import Cache
from ..config import Settings
from ..errors import HypercacheioError
from ..store import DB_NAME
from .common import directory_option, err, load_settings, out, show_storage
from .replication import (
    mesh_state,
    print_mesh,
    print_replication,
    replication_state,
    running_node,
)

_MISSING = object()


@contextmanager
def open_cache(directory: str | None, *also: type[Exception]) -> Iterator[Cache]:
    """An L1-less cache on the store (closed afterwards), after the storage line. A
    HypercacheioError (or one of ``also``) inside becomes click's one-line error, exit 1."""
    settings = load_settings(directory)
    show_storage(settings)
    caught: tuple[type[Exception], ...] = (HypercacheioError, *also)
    try:
        cache = Cache(settings=settings, l1_max_items=0)
        try:
            yield cache
        finally:
            cache.close()
    except caught as exc:
        raise click.ClickException(str(exc)) from exc


def settings_lines(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) for every setting; the token is never shown."""
    lines = list(settings.to_env(token=False).items())
    return [*lines, (TOKEN_VAR, token_display(settings))]


@click.command()
@directory_option
@click.option("--write-env", type=click.Path(dir_okay=False), default=None,
              help="Also write the settings as KEY=value lines to this file (mode 0600; "
                   "without the API token).")
def install(directory: str | None, write_env: str | None) -> None:
    """Create the storage directory and database, and show the settings (idempotent)."""
    settings = load_settings(directory)
    existed = os.path.exists(os.path.join(settings.directory, DB_NAME))
    with open_cache(directory) as cache:
        stats = cache.store.stats()
    console = out()
    verb = "exists" if existed else "created"
    console.print(f"[green]database {verb}[/green]: {escape(str(stats['path']))} "
                  f"(node id {stats['node_id']})")
    table = Table(title="settings")
    table.add_column("variable")
    table.add_column("value")
    for name, value in settings_lines(settings):
        table.add_row(name, escape(value))
    console.print(table)
    if write_env:
        fd = os.open(write_env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{n}={v}\n" for n, v in settings.to_env(token=False).items()))
        console.print(f"settings written to {escape(write_env)} (not the API token: add "
                      f"{TOKEN_VAR}=... yourself if the node needs a fixed one)")


@click.command()
@directory_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(directory: str | None, as_json: bool) -> None:
    """Entries, locks, bytes on disk and WAL size of the store; and replication: per
    secondary on a primary, the position held on a secondary, per peer in active-active."""
    with open_cache(directory) as cache:
        figures = cache.store.stats()
        settings = cache.settings
        wanted = bool(settings.secondary_urls) or settings.active_active
        node = running_node(settings) if wanted else None  # one /ping for both
        replication = replication_state(settings, cache.store, node)
        mesh = mesh_state(settings, cache.store, node)
    if as_json:
        if replication is not None:
            figures = {**figures, "replication": replication}
        if mesh is not None:
            figures = {**figures, "mesh": mesh}
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title="hypercacheio store")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, escape(str(value)))
    out().print(table)
    if replication is not None:
        print_replication(replication)
    if mesh is not None:
        print_mesh(mesh)


def _text(value: Any) -> str:
    """A value as ``get`` prints it: JSON when it is JSON (``set --type json`` round-trips),
    else its repr."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


@click.command("get")
@directory_option
@click.argument("key")
def get_cmd(directory: str | None, key: str) -> None:
    """Print the value of KEY (exit 1 if missing)."""
    with open_cache(directory) as cache:
        value = cache.get(key, _MISSING)
    if value is _MISSING:
        err().print(f"{escape(repr(key))}: not found")
        sys.exit(1)
    if isinstance(value, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(value + b"\n")
        sys.stdout.buffer.flush()
    elif isinstance(value, str):
        click.echo(value)
    else:
        click.echo(_text(value))


@click.command("set")
@directory_option
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=float, default=None, help="Seconds to keep it (default: forever).")
@click.option("--type", "kind", type=click.Choice(["str", "int", "json"]), default="str",
              show_default=True, help="How to read VALUE.")
def set_cmd(directory: str | None, key: str, value: str, ttl: float | None, kind: str) -> None:
    """Store VALUE under KEY."""
    try:
        parsed: Any = value
        if kind == "int":
            parsed = int(value)
        elif kind == "json":
            parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not valid {kind}: {exc}") from exc
    with open_cache(directory, ValueError) as cache:  # ValueError: a NaN --ttl
        cache.set(key, parsed, ttl=ttl)
    out().print(f"stored {escape(repr(key))}")


@click.command("delete")
@directory_option
@click.argument("key")
def delete_cmd(directory: str | None, key: str) -> None:
    """Delete KEY (exit 1 if it was not there)."""
    with open_cache(directory) as cache:
        deleted = cache.delete(key)
    out().print(f"deleted {escape(repr(key))}" if deleted else f"{escape(repr(key))}: not found")
    if not deleted:
        sys.exit(1)


@click.command("clear")
@directory_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear_cmd(directory: str | None, yes: bool) -> None:
    """Remove every entry of the store (locks stay)."""
    if not yes:
        where = load_settings(directory).directory
        click.confirm(f"Remove every entry in {where}?", abort=True)
    with open_cache(directory) as cache:
        cache.clear()
    out().print("cleared")


@click.command("purge")
@directory_option
def purge_cmd(directory: str | None) -> None:
    """Remove expired entries and locks now, and checkpoint the WAL."""
    with open_cache(directory) as cache:
        removed = cache.purge_expired()
        cache.store.checkpoint("TRUNCATE")
    out().print(f"removed {removed} expired entries")


COMMANDS = (install, stats, get_cmd, set_cmd, delete_cmd, clear_cmd, purge_cmd)


def register(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)
