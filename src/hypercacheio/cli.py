"""The ``hypercacheio`` command: thin translation from arguments to modules, printed with rich."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .cache import Cache
from .config import ENV_VARS, Settings
from .errors import HypercacheioError

console = Console()
err_console = Console(stderr=True)


def load_settings(directory: str | None) -> Settings:
    """Settings from the environment, with ``--directory`` overriding the path."""
    overrides: dict[str, Any] = {}
    if directory:
        overrides["directory"] = directory
    try:
        return Settings.from_env(**overrides)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc


def open_cache(settings: Settings) -> Cache:
    try:
        return Cache(settings=settings, l1_max_items=0)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc


directory_option = click.option(
    "--directory", "-d", envvar=None, default=None, metavar="PATH",
    help="Storage directory (default: HYPERCACHEIO_SQLITE_PATH or ~/.cache/hypercacheio).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hypercacheio")
def main() -> None:
    """hypercacheio: a cache shared by every process of a host and every server of a cluster."""


@main.command()
@directory_option
@click.option("--write-env", type=click.Path(dir_okay=False), default=None,
              help="Also write the settings as KEY=value lines to this file.")
def install(directory: str | None, write_env: str | None) -> None:
    """Create the storage directory and database, and show the settings (idempotent)."""
    settings = load_settings(directory)
    existed = os.path.exists(os.path.join(settings.directory, "hypercacheio.sqlite"))
    cache = open_cache(settings)
    stats = cache.store.stats()
    cache.close()
    verb = "exists" if existed else "created"
    console.print(f"[green]database {verb}[/green]: {stats['path']} (node id {stats['node_id']})")
    lines = settings_lines(settings)
    table = Table(title="settings", show_lines=False)
    table.add_column("variable")
    table.add_column("value")
    for name, value in lines:
        table.add_row(name, value)
    console.print(table)
    if write_env:
        with open(write_env, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{n}={v}\n" for n, v in lines))
        os.chmod(write_env, 0o600)
        console.print(f"settings written to {write_env}")


def settings_lines(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) for every setting; the token is masked."""
    out = []
    for field_name, names in ENV_VARS.items():
        value = getattr(settings, field_name)
        if field_name == "api_token":
            text = ("(default: a node generates its own unless one is set)"
                    if value in ("changeme", "") else "(set, hidden)")
        elif isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = ""
        else:
            text = str(value)
        out.append((names[0], text))
    return out


@main.command()
@directory_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(directory: str | None, as_json: bool) -> None:
    """Entries, locks, bytes on disk and WAL size of the store."""
    cache = open_cache(load_settings(directory))
    figures = cache.store.stats()
    cache.close()
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title="hypercacheio store")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, str(value))
    console.print(table)


@main.command("get")
@directory_option
@click.argument("key")
def get_cmd(directory: str | None, key: str) -> None:
    """Print the value of KEY (exit 1 if missing)."""
    cache = open_cache(load_settings(directory))
    try:
        value = cache.get(key, _MISSING)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc
    if value is _MISSING:
        err_console.print(f"{key!r}: not found")
        sys.exit(1)
    if isinstance(value, bytes):
        sys.stdout.buffer.write(value + b"\n")
    elif isinstance(value, str):
        click.echo(value)
    else:
        click.echo(repr(value))


_MISSING = object()


@main.command("set")
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
    cache = open_cache(load_settings(directory))
    try:
        cache.set(key, parsed, ttl=ttl)
    except (HypercacheioError, ValueError) as exc:  # ValueError: a NaN --ttl
        raise click.ClickException(str(exc)) from exc
    console.print(f"stored {key!r}")


@main.command("delete")
@directory_option
@click.argument("key")
def delete_cmd(directory: str | None, key: str) -> None:
    """Delete KEY (exit 1 if it was not there)."""
    cache = open_cache(load_settings(directory))
    try:
        deleted = cache.delete(key)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"deleted {key!r}" if deleted else f"{key!r}: not found")
    if not deleted:
        sys.exit(1)


@main.command("clear")
@directory_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear_cmd(directory: str | None, yes: bool) -> None:
    """Remove every entry of the store (locks stay)."""
    settings = load_settings(directory)
    if not yes:
        click.confirm(f"Remove every entry in {settings.directory}?", abort=True)
    cache = open_cache(settings)
    cache.clear()
    console.print("cleared")


@main.command("purge")
@directory_option
def purge_cmd(directory: str | None) -> None:
    """Remove expired entries and locks now, and checkpoint the WAL."""
    cache = open_cache(load_settings(directory))
    removed = cache.purge_expired()
    cache.store.checkpoint("TRUNCATE")
    console.print(f"removed {removed} expired entries")


from .service_commands import check_cmd, service_group  # noqa: E402

main.add_command(service_group)
main.add_command(check_cmd)


from .node.commands import node_group  # noqa: E402

main.add_command(node_group)

if __name__ == "__main__":  # pragma: no cover
    main()
