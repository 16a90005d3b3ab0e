"""``hypercacheio node run|start|stop|status|restart``: thin click commands over daemon.py.

Exit codes: 0 done; 1 failed (or, for ``start``, a node already runs); 3 not running (``stop``
and ``status``, as LSB init scripts say); ``status`` exits 1 for a stale pid file.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..config import Settings
from ..errors import AuthError, HypercacheioError, NodeUnavailable
from .options import LOG_FILE, NodeOptions, read_token_file, resolve_token, token_path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STALE = 1
EXIT_NOT_RUNNING = 3

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

TOKEN_VAR = "HYPERCACHEIO_API_TOKEN"


def _version() -> str:
    from .. import __version__
    return __version__


def node_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that starts or finds a node accepts."""
    options = [
        click.option("--directory", "-d", default=None, metavar="PATH",
                     help="Storage directory (HYPERCACHEIO_SQLITE_PATH; default "
                          "~/.cache/hypercacheio)."),
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
    """Settings and NodeOptions from the environment, command-line options winning."""
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
    return settings, options


def token_explicit() -> bool:
    return TOKEN_VAR in os.environ


def known_token(settings: Settings) -> str | None:
    """The token a client on this host would use: the variable, else the node's file."""
    if token_explicit():
        return settings.api_token
    return read_token_file(settings)


def client_url(settings: Settings, options: NodeOptions) -> str:
    """Where a client on this host reaches the node (a wildcard listen address -> loopback)."""
    host = settings.node_listen_host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if options.tls_cert else "http"
    return f"{scheme}://{host}:{settings.node_port}/api/hypercacheio"


def ping(url: str, token: str | None, timeout: float = 1.0) -> dict[str, Any]:
    from .client import RemoteCache
    client = RemoteCache(url, token or "", timeout=timeout, verify=False)
    try:
        return client.ping()
    finally:
        client.close()


def banner(settings: Settings, options: NodeOptions, token: str, generated: bool,
           url: str) -> None:
    """What a person sees when a node comes up: where, which token, and a curl to try."""
    console.print(f"[bold green]hypercacheio node[/] listening on [bold]{url}[/]"
                  + (f" and unix:{settings.node_socket}" if settings.node_socket else ""))
    console.print(f"storage: {settings.directory}")
    if generated:
        console.print(f"API token (generated now, shown only this once; saved with mode 0600 "
                      f"in {token_path(settings)}):\n  [bold yellow]{token}[/]")
        header = f"X-Hypercacheio-Token: {token}"
        quoted_header = shlex.quote(header)
    elif token_explicit():
        console.print(f"API token: from {TOKEN_VAR}")
        quoted_header = f'"X-Hypercacheio-Token: ${TOKEN_VAR}"'
    else:
        console.print(f"API token: in {token_path(settings)}")
        quoted_header = f'"X-Hypercacheio-Token: $(cat {shlex.quote(token_path(settings))})"'
    insecure = " -k" if options.tls_cert else ""
    console.print("try:")
    console.print(f"  curl{insecure} -H {quoted_header} -d 'hello' {url}/cache/greeting",
                  soft_wrap=True)
    console.print(f"  curl{insecure} -H {quoted_header} {url}/cache/greeting", soft_wrap=True)


@click.group("node")
def node_group() -> None:
    """Run and manage the node daemon: the HTTP API over this host's store."""


@node_group.command("run")
@node_options
@click.option("--quiet", "-q", is_flag=True, help="No banner on stdout.")
def run_cmd(quiet: bool, **kwargs: Any) -> None:
    """Run the node in the foreground until Ctrl-C or SIGTERM."""
    from . import daemon
    settings, options = load(kwargs)
    try:
        token, generated = resolve_token(settings, token_explicit())
    except (HypercacheioError, OSError) as exc:
        err_console.print(f"[red]cannot start:[/] {exc}")
        sys.exit(EXIT_FAILED)
    daemon.configure_logging(options)
    url = client_url(settings, options)

    def ready(state: Any) -> None:
        if not quiet:
            banner(settings, options, token, generated, url)

    try:
        daemon.run(settings, options, token, version=_version(), on_ready=ready)
    except daemon.AlreadyRunning as exc:
        err_console.print(f"[red]not started:[/] {exc}")
        sys.exit(EXIT_FAILED)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            err_console.print(f"[red]not started:[/] {settings.node_listen_host}:"
                              f"{settings.node_port} is already in use by another program; "
                              "stop it or choose another --port (HYPERCACHEIO_NODE_PORT)")
        else:
            err_console.print(f"[red]the node failed:[/] {exc}")
        sys.exit(EXIT_FAILED)
    except HypercacheioError as exc:
        err_console.print(f"[red]the node failed:[/] {exc}")
        sys.exit(EXIT_FAILED)


def _child_env(settings: Settings, options: NodeOptions, log_file: str) -> dict[str, str]:
    """The environment of a background node: this one plus every resolved setting."""
    env = dict(os.environ)
    env.update({
        "HYPERCACHEIO_SQLITE_PATH": settings.directory,
        "HYPERCACHEIO_NODE_LISTEN_HOST": settings.node_listen_host,
        "HYPERCACHEIO_NODE_PORT": str(settings.node_port),
        "HYPERCACHEIO_NODE_PID_FILE": options.pid_path(settings),
        "HYPERCACHEIO_NODE_LOG_FILE": log_file,
        "HYPERCACHEIO_NODE_GC_INTERVAL": repr(options.gc_interval),
        "HYPERCACHEIO_NODE_MAX_VALUE_BYTES": str(options.max_value_bytes),
        "HYPERCACHEIO_NODE_RATE_LIMIT": repr(options.rate_limit),
    })
    for name, value in (("HYPERCACHEIO_NODE_SOCKET", settings.node_socket),
                        ("HYPERCACHEIO_NODE_TLS_CERT", options.tls_cert),
                        ("HYPERCACHEIO_NODE_TLS_KEY", options.tls_key)):
        if value:
            env[name] = value
    return env


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def start_node(settings: Settings, options: NodeOptions, wait: float) -> int:
    """Start a background node and wait until it answers; returns an exit code."""
    from .daemon import pid_file_locked, read_pid
    pid_path = options.pid_path(settings)
    if pid_file_locked(pid_path):
        err_console.print(f"[yellow]already running[/] (pid {read_pid(pid_path)}, pid file "
                          f"{pid_path}); use `hypercacheio node restart` to restart it")
        return EXIT_FAILED
    if os.path.exists(pid_path):
        console.print(f"removing stale pid file {pid_path} "
                      f"(pid {read_pid(pid_path)} is not running)")
        os.unlink(pid_path)
    try:
        token, generated = resolve_token(settings, token_explicit())
    except (HypercacheioError, OSError) as exc:
        err_console.print(f"[red]cannot start:[/] {exc}")
        return EXIT_FAILED
    log_file = options.log_file or os.path.join(settings.directory, LOG_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    cmd = [sys.executable, "-m", "hypercacheio.cli", "node", "run", "--quiet"]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=_child_env(settings, options, log_file),
                                start_new_session=True, close_fds=True)
    url = client_url(settings, options)
    deadline = time.monotonic() + wait
    last_error = ""
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            err_console.print(f"[red]the node exited at start[/] (code {code}); "
                              f"last lines of {log_file}:\n{_tail(log_file)}")
            return EXIT_FAILED
        try:
            info = ping(url, token, timeout=0.5)
            if info.get("pid") == proc.pid:
                console.print(f"[green]started[/] (pid {proc.pid}) on {url}; log {log_file}")
                if generated:
                    banner(settings, options, token, generated, url)
                return EXIT_OK
            last_error = f"another process answers on {url} (pid {info.get('pid')})"
        except (NodeUnavailable, AuthError) as exc:
            last_error = str(exc)
        time.sleep(0.05)
    proc.terminate()
    err_console.print(f"[red]the node did not answer within {wait:g} s[/] ({last_error}); "
                      f"stopped it; last lines of {log_file}:\n{_tail(log_file)}")
    return EXIT_FAILED


def stop_node(settings: Settings, options: NodeOptions, timeout: float, force: bool) -> int:
    """SIGTERM the node and wait for it to finish; returns an exit code."""
    from .daemon import pid_file_locked, read_pid
    pid_path = options.pid_path(settings)
    pid = read_pid(pid_path)
    if not os.path.exists(pid_path):
        console.print(f"not running (no pid file at {pid_path})")
        return EXIT_NOT_RUNNING
    if not pid_file_locked(pid_path) or pid is None:
        os.unlink(pid_path)
        console.print(f"not running: removed the stale pid file {pid_path} "
                      f"(pid {pid} had exited)")
        return EXIT_NOT_RUNNING
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        console.print(f"not running (pid {pid} is gone)")
        return EXIT_NOT_RUNNING
    except PermissionError:
        err_console.print(f"[red]cannot signal pid {pid}[/]: it belongs to another user")
        return EXIT_FAILED
    while time.monotonic() - started < timeout:
        if not pid_file_locked(pid_path):
            console.print(f"[green]stopped[/] (pid {pid}) in "
                          f"{time.monotonic() - started:.2f} s")
            return EXIT_OK
        time.sleep(0.05)
    if force:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        console.print(f"[yellow]killed[/] (pid {pid}): it did not stop within {timeout:g} s")
        return EXIT_OK
    err_console.print(f"[red]pid {pid} did not stop within {timeout:g} s[/]; "
                      "try again with --force to kill it")
    return EXIT_FAILED


@node_group.command("start")
@node_options
@click.option("--wait", type=float, default=15.0, show_default=True,
              help="Seconds to wait for the node to answer.")
def start_cmd(wait: float, **kwargs: Any) -> None:
    """Start the node in the background (pid file, log file) and wait until it answers."""
    settings, options = load(kwargs)
    sys.exit(start_node(settings, options, wait))


@node_group.command("stop")
@node_options
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the node to finish.")
@click.option("--force", is_flag=True, help="SIGKILL it if it has not stopped by then.")
def stop_cmd(timeout: float, force: bool, **kwargs: Any) -> None:
    """Stop the node (SIGTERM: in-flight requests finish, the database closes cleanly)."""
    settings, options = load(kwargs)
    sys.exit(stop_node(settings, options, timeout, force))


@node_group.command("restart")
@node_options
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the old node to finish.")
@click.option("--wait", type=float, default=15.0, show_default=True,
              help="Seconds to wait for the new node to answer.")
def restart_cmd(timeout: float, wait: float, **kwargs: Any) -> None:
    """Stop the node if it runs, then start it."""
    settings, options = load(kwargs)
    code = stop_node(settings, options, timeout, force=False)
    if code not in (EXIT_OK, EXIT_NOT_RUNNING):
        sys.exit(code)
    sys.exit(start_node(settings, options, wait))


@node_group.command("status")
@node_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_cmd(as_json: bool, **kwargs: Any) -> None:
    """Pid, uptime, address and a live ping (exit 0 running, 3 stopped, 1 stale or mute)."""
    from .daemon import pid_file_locked, read_pid
    settings, options = load(kwargs)
    pid_path = options.pid_path(settings)
    pid = read_pid(pid_path)
    url = client_url(settings, options)
    out: dict[str, Any] = {"running": False, "pid": pid, "pid_file": pid_path, "url": url}
    if not os.path.exists(pid_path):
        out["state"] = "stopped"
        code, text = EXIT_NOT_RUNNING, f"not running (no pid file at {pid_path})"
    elif not pid_file_locked(pid_path):
        out["state"] = "stale"
        code, text = EXIT_STALE, (f"not running, but a stale pid file remains: {pid_path} "
                                  f"(pid {pid} has exited); `node start` will replace it")
    else:
        out.update(running=True, state="running")
        token = known_token(settings)
        t0 = time.perf_counter()
        try:
            info = ping(url, token)
            out["ping_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            out["node"] = info
            code, text = EXIT_OK, f"running (pid {pid}) on {url}"
            if info.get("pid") not in (None, pid):
                code, text = EXIT_FAILED, (f"pid {pid} holds the pid file but pid "
                                           f"{info.get('pid')} answers on {url}")
        except (NodeUnavailable, AuthError) as exc:
            out["state"] = "not answering"
            out["error"] = str(exc)
            code, text = EXIT_FAILED, f"running (pid {pid}) but not answering: {exc}"
    out["message"] = text
    if as_json:
        click.echo(json.dumps(out, indent=2))
        sys.exit(code)
    color = {EXIT_OK: "green", EXIT_NOT_RUNNING: "yellow"}.get(code, "red")
    console.print(f"[{color}]{text}[/]")
    node = out.get("node")
    if node and "uptime" in node:
        table = Table(show_header=False, box=None)
        rows = [("pid", str(node.get("pid"))), ("uptime", f"{node['uptime']:.1f} s"),
                ("listen", ", ".join(node.get("listen", []))),
                ("role", str(node.get("role"))), ("node id", str(node.get("node_id"))),
                ("version", str(node.get("version"))), ("entries", str(node.get("entries"))),
                ("db bytes", str(node.get("db_bytes"))), ("wal bytes", str(node.get("wal_bytes"))),
                ("ping", f"{out['ping_ms']} ms")]
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)
    sys.exit(code)
