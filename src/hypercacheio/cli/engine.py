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

from ..auth import TOKEN_VAR, client_token, token_display
from ..cache import Cache
from ..config import Settings
from ..errors import HypercacheioError
from ..store import DB_NAME, Store
from .common import directory_option, err, load_settings, out, show_storage

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


PRIMARY_PEER_PREFIX = "primary:"
"""How a secondary's store names the position it holds per primary (``primary:`` + the
primary's node id; ``node.replica_routes.PEER_PREFIX``, not imported: it needs aiohttp)."""


def _backlog_seconds(store: Store, acked: int) -> float:
    """Age of the oldest oplog row after ``acked`` (0 when there is none), as the node's
    push computes it."""
    oldest = store.oplog_since(acked, 1)
    if not oldest:
        return 0.0
    return round(max(0.0, store.clock() - (oldest[0].hlc >> 16) / 1000), 3)


def _running_node(settings: Settings) -> tuple[str | None, dict[str, Any] | None, str]:
    """(url, /ping answer, what to say) of the node running for this storage directory,
    found by its pid file as the other verbs find it; (None, None, why) when none answers."""
    try:
        from ..node.options import NodeOptions
        from ..node.supervise import find_local_node, ping
    except ImportError:
        return None, None, "not running (the server extra is not installed)"
    try:
        found = find_local_node(settings, NodeOptions.from_env())
    except HypercacheioError as exc:
        return None, None, f"unknown ({exc})"
    if found is None:
        return None, None, "not running"
    try:
        doc = ping(found.url, client_token(settings)[0], timeout=settings.timeout)
    except Exception as exc:  # refused token, not answering: say so, show the store's view
        return found.url, None, f"running (pid {found.pid}) but its /ping failed: {exc}"
    return found.url, doc, f"running (pid {found.pid}) on {found.url}"


def replication_state(settings: Settings, store: Store) -> dict[str, Any] | None:
    """What ``stats`` shows of replication: on a primary, per secondary (from the running
    node's ``/ping`` when it answers, else from the store alone); on a secondary, the
    position held per primary. None when this host does not replicate."""
    if settings.role == "secondary":
        sources = [{"source": pos.peer[len(PRIMARY_PEER_PREFIX):], "position": pos.acked,
                    "updated_at": pos.updated_at}
                   for pos in store.peer_positions() if pos.peer.startswith(PRIMARY_PEER_PREFIX)]
        return {"role": "secondary", "primary_url": settings.primary_url, "sources": sources}
    if not settings.secondary_urls:
        return None
    position = store.oplog_position()
    acked = {pos.peer: pos.acked for pos in store.peer_positions()
             if pos.source == store.node_id}
    url, doc, node_state = _running_node(settings)
    live = {row.get("url"): row
            for row in ((doc or {}).get("replication") or {}).get("secondaries", [])}
    rows = []
    for configured in settings.secondary_urls:
        name = configured.rstrip("/")
        row = live.get(name)
        if row is not None:
            rows.append({"url": name, "connected": bool(row.get("connected")),
                         "acked": row.get("acked", 0),
                         "backlog_rows": row.get("backlog_rows", 0),
                         "backlog_seconds": row.get("backlog_seconds", 0.0),
                         "last_error": row.get("last_error")})
            continue
        mine = acked.get(name, 0)
        rows.append({"url": name, "connected": None, "acked": mine,
                     "backlog_rows": max(0, position - mine),
                     "backlog_seconds": _backlog_seconds(store, mine), "last_error": None})
    return {"role": "primary", "node": node_state, "node_running": doc is not None,
            "node_url": url, "oplog_position": position, "secondaries": rows}


def _print_replication(state: dict[str, Any]) -> None:
    console = out()
    if state["role"] == "secondary":
        console.print(f"secondary of {escape(state['primary_url'])}")
        table = Table(title="replication: positions received")
        table.add_column("primary (node id)")
        table.add_column("position", justify="right")
        for row in state["sources"]:
            table.add_row(escape(row["source"]), str(row["position"]))
        if not state["sources"]:
            table.add_row("(none yet)", "0")
        console.print(table)
        return
    console.print(f"node: {escape(state['node'])}"
                  + ("" if state["node_running"] else
                     "; the figures below are what the store alone knows"))
    table = Table(title=f"replication: oplog position {state['oplog_position']}")
    for name, justify in (("secondary", "left"), ("connected", "left"),
                          ("acked", "right"), ("backlog rows", "right"),
                          ("backlog s", "right"), ("last error", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in state["secondaries"]:
        connected = {True: "yes", False: "[red]no[/red]", None: "unknown"}[row["connected"]]
        table.add_row(escape(row["url"]), connected, str(row["acked"]),
                      str(row["backlog_rows"]), f"{row['backlog_seconds']:g}",
                      escape(row["last_error"] or ""))
    console.print(table)


@click.command()
@directory_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(directory: str | None, as_json: bool) -> None:
    """Entries, locks, bytes on disk and WAL size of the store; and replication: per
    secondary on a primary, the position held on a secondary."""
    with open_cache(directory) as cache:
        figures = cache.store.stats()
        replication = replication_state(cache.settings, cache.store)
    if as_json:
        if replication is not None:
            figures = {**figures, "replication": replication}
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title="hypercacheio store")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, escape(str(value)))
    out().print(table)
    if replication is not None:
        _print_replication(replication)


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
