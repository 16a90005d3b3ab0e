"""``hypercacheio node run|start|stop|status|restart``: parse, call ``node/supervise.py``, print.

Exit codes: 0 done; 1 failed (the server extra is missing, the port is taken, the node
exited at start, or, for ``start``, a node already runs; for ``status``, a stale pid file or
a node that does not answer); 3 not running (``stop`` and ``status``, as LSB init scripts say).
"""

from __future__ import annotations

import errno
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

import hypercacheio

from ..auth import TOKEN_VAR, client_token, resolve_token, token_explicit, token_path
from ..config import Settings
from ..errors import HypercacheioError
from ..node import supervise
from ..node.options import NodeOptions
from .common import DIRECTORY_HELP, err, out, show_storage


def node_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that starts or finds a node accepts."""
    options = [
        click.option("--directory", "-d", default=None, metavar="PATH", help=DIRECTORY_HELP),
        click.option("--host", default=None, metavar="ADDR",
                     help="Listen address (HYPERCACHEIO_NODE_LISTEN_HOST; default 127.0.0.1)."),
        click.option("--port", "-p", type=int, default=None,
                     help="Listen port (HYPERCACHEIO_NODE_PORT; default 8080)."),
        click.option("--socket", "unix_socket", default=None, metavar="PATH",
                     help="Also listen on this unix socket (HYPERCACHEIO_NODE_SOCKET)."),
        click.option("--pid-file", default=None, metavar="PATH",
                     help="Pid file (HYPERCACHEIO_NODE_PID_FILE; default DIRECTORY/node.pid)."),
        click.option("--log-file", default=None, metavar="PATH",
                     help="Log file (HYPERCACHEIO_NODE_LOG_FILE; run: stderr, start: "
                          "DIRECTORY/node.log)."),
        click.option("--gc-interval", type=float, default=None,
                     help="Seconds between collections of expired rows (default 30)."),
        click.option("--max-value-bytes", type=int, default=None,
                     help="Largest value accepted (default 16 MiB; larger gets 413)."),
        click.option("--rate-limit", type=float, default=None,
                     help="Requests per second per client address (default 0: no limit)."),
        click.option("--tls-cert", default=None, metavar="PATH", help="TLS certificate (PEM)."),
        click.option("--tls-key", default=None, metavar="PATH", help="TLS private key (PEM)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load(kwargs: dict[str, Any]) -> tuple[Settings, NodeOptions]:
    """Settings and NodeOptions from the environment, command-line options winning; checks
    that the server extra is installed and prints the storage line."""
    missing = supervise.missing_server_extra()
    if missing:
        err().print(f"[red]error:[/] {escape(missing)}")
        sys.exit(supervise.EXIT_FAILED)
    overrides: dict[str, Any] = {}
    for arg, field_name in (("directory", "directory"), ("host", "node_listen_host"),
                            ("port", "node_port"), ("unix_socket", "node_socket")):
        if kwargs.get(arg) is not None:
            overrides[field_name] = kwargs[arg]
    try:
        settings = Settings.from_env(**overrides)
        options = NodeOptions.from_env(**{k: kwargs.get(k) for k in (
            "pid_file", "log_file", "gc_interval", "max_value_bytes", "rate_limit",
            "tls_cert", "tls_key")})
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc
    show_storage(settings)
    return settings, options


def _node_token(settings: Settings) -> tuple[str, bool]:
    try:
        return resolve_token(settings, token_explicit())
    except (HypercacheioError, OSError) as exc:
        err().print(f"[red]cannot start:[/] {escape(str(exc))}")
        sys.exit(supervise.EXIT_FAILED)


def banner(settings: Settings, options: NodeOptions, token: str, generated: bool,
           url: str) -> None:
    """What a person sees when a node comes up: where, which token, and a curl to try."""
    console = out()
    console.print(f"[bold green]hypercacheio node[/] listening on [bold]{escape(url)}[/]"
                  + (f" and unix:{escape(settings.node_socket)}" if settings.node_socket
                     else ""))
    console.print(f"storage: {escape(settings.directory)}")
    path = token_path(settings)
    if generated:
        console.print(f"API token (generated now, shown only this once; saved with mode 0600 "
                      f"in {escape(path)}):\n  [bold yellow]{escape(token)}[/]")
        quoted_header = shlex.quote(f"X-Hypercacheio-Token: {token}")
    elif token_explicit():
        console.print(f"API token: from {TOKEN_VAR}")
        quoted_header = f'"X-Hypercacheio-Token: ${TOKEN_VAR}"'
    else:
        console.print(f"API token: in {escape(path)}")
        quoted_header = f'"X-Hypercacheio-Token: $(cat {shlex.quote(path)})"'
    insecure = " -k" if options.tls_cert else ""
    console.print("try:")
    for line in (f"  curl{insecure} -H {quoted_header} -d 'hello' {url}/cache/greeting",
                 f"  curl{insecure} -H {quoted_header} {url}/cache/greeting"):
        console.print(escape(line))


def _report(outcome: supervise.Outcome) -> None:
    for note in outcome.notes:
        out().print(escape(note))
    if outcome.ok:
        out().print(f"[green]{escape(outcome.message)}[/]")
    elif outcome.code == supervise.EXIT_NOT_RUNNING:
        out().print(escape(outcome.message))
    else:
        err().print(f"[red]{escape(outcome.message)}[/]")


@click.group("node")
def node_group() -> None:
    """Run and manage the node daemon: the HTTP API over this host's store.

    Exit codes: 0 done; 1 failed; 3 not running (stop, status).
    """


@node_group.command("run")
@node_options
@click.option("--quiet", "-q", is_flag=True, help="No banner on stdout.")
def run_cmd(quiet: bool, **kwargs: Any) -> None:
    """Run the node in the foreground until Ctrl-C or SIGTERM."""
    settings, options = load(kwargs)
    from ..node import daemon

    token, generated = _node_token(settings)
    daemon.configure_logging(options)

    def ready(state: Any) -> None:
        if not quiet:
            banner(settings, options, token, generated, supervise.client_url(settings, options))

    try:
        daemon.run(settings, options, token, version=hypercacheio.__version__, on_ready=ready)
    except supervise.AlreadyRunning as exc:
        err().print(f"[red]not started:[/] {escape(str(exc))}")
        sys.exit(supervise.EXIT_FAILED)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            err().print(f"[red]not started:[/] {escape(supervise.port_in_use_message(settings))}")
        else:
            err().print(f"[red]the node failed:[/] {escape(str(exc))}")
        sys.exit(supervise.EXIT_FAILED)
    except HypercacheioError as exc:
        err().print(f"[red]the node failed:[/] {escape(str(exc))}")
        sys.exit(supervise.EXIT_FAILED)


def _start(settings: Settings, options: NodeOptions, wait: float) -> int:
    token, generated = _node_token(settings)
    outcome = supervise.start(settings, options, token, wait)
    _report(outcome)
    if outcome.ok and generated:
        banner(settings, options, token, generated, outcome.details["url"])
    return outcome.code


@node_group.command("start")
@node_options
@click.option("--wait", type=float, default=15.0, show_default=True,
              help="Seconds to wait for the node to answer.")
def start_cmd(wait: float, **kwargs: Any) -> None:
    """Start the node in the background (pid file, log file) and wait until it answers."""
    settings, options = load(kwargs)
    sys.exit(_start(settings, options, wait))


@node_group.command("stop")
@node_options
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the node to finish.")
@click.option("--force", is_flag=True, help="SIGKILL it if it has not stopped by then.")
def stop_cmd(timeout: float, force: bool, **kwargs: Any) -> None:
    """Stop the node (SIGTERM: in-flight requests finish, the database closes cleanly)."""
    settings, options = load(kwargs)
    outcome = supervise.stop(settings, options, timeout, force)
    _report(outcome)
    sys.exit(outcome.code)


@node_group.command("restart")
@node_options
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the old node to finish.")
@click.option("--wait", type=float, default=15.0, show_default=True,
              help="Seconds to wait for the new node to answer.")
def restart_cmd(timeout: float, wait: float, **kwargs: Any) -> None:
    """Stop the node if it runs, then start it."""
    settings, options = load(kwargs)
    stopped = supervise.stop(settings, options, timeout, force=False)
    _report(stopped)
    if stopped.code not in (supervise.EXIT_OK, supervise.EXIT_NOT_RUNNING):
        sys.exit(stopped.code)
    sys.exit(_start(settings, options, wait))


@node_group.command("status")
@node_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_cmd(as_json: bool, **kwargs: Any) -> None:
    """Pid, uptime, address and a live ping (exit 0 running, 3 stopped, 1 stale or mute)."""
    settings, options = load(kwargs)
    outcome = supervise.status(settings, options, client_token(settings)[0])
    details = outcome.details
    if as_json:
        click.echo(json.dumps(details, indent=2))
        sys.exit(outcome.code)
    color = {supervise.EXIT_OK: "green", supervise.EXIT_NOT_RUNNING: "yellow"}.get(
        outcome.code, "red")
    out().print(f"[{color}]{escape(outcome.message)}[/]")
    node = details.get("node")
    if node and "uptime" in node:
        table = Table(show_header=False, box=None)
        rows = [("pid", str(node.get("pid"))), ("uptime", f"{node['uptime']:.1f} s"),
                ("listen", ", ".join(node.get("listen", []))),
                ("role", str(node.get("role"))), ("node id", str(node.get("node_id"))),
                ("version", str(node.get("version"))), ("entries", str(node.get("entries"))),
                ("db bytes", str(node.get("db_bytes"))), ("wal bytes", str(node.get("wal_bytes"))),
                ("ping", f"{details['ping_ms']} ms")]
        for name, value in rows:
            table.add_row(name, escape(value))
        out().print(table)
    sys.exit(outcome.code)
