"""``hypercacheio service ...`` and ``hypercacheio check``: arguments in, messages out.

The work is in ``hypercacheio/ops/service.py`` and ``hypercacheio/ops/check.py``; this module only
parses options, calls them and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from ..auth import TOKEN_VAR, token_path, weak_token_refused
from ..errors import HypercacheioError
from ..node.options import NodeOptions
from ..ops import check as check_mod
from ..ops import service as svc
from ..ops import service_verbs
from ..ops.firewall import firewall_advice
from .common import directory_option, err, load_settings, out, show_storage

kind_option = click.option(
    "--kind", type=click.Choice(svc.KINDS), default=None,
    help="systemd or launchd (default: systemd on Linux, launchd on macOS).")
scope_option = click.option(
    "--scope", type=click.Choice(svc.SCOPES), default=None,
    help="system-wide or per-user service (default: system for systemd, user for launchd).")
dir_option = click.option(
    "--unit-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
    help="Where the service file is installed (default: the service manager's directory).")


@click.group("service", context_settings={"help_option_names": ["-h", "--help"]})
def service_group() -> None:
    """Run the node as a systemd (Linux) or launchd (macOS) service with auto-restart."""


@service_group.command("make")
@directory_option
@kind_option
@scope_option
@click.option("--output", "-o", type=click.Path(), default=None, metavar="PATH",
              help="File or directory to write (default: the current directory).")
@click.option("--install", is_flag=True,
              help="Write straight into the service manager's directory (see --unit-dir).")
@dir_option
@click.option("--python", "python", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Interpreter the service runs (default: this one).")
@click.option("--run-as", default=None, metavar="USER",
              help="User of a system service (default: you, unless you are root).")
@click.option("--env-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="systemd: keep the API token in this 0600 file (EnvironmentFile=) instead "
                   "of the unit, where `systemctl show` would reveal it to local users.")
def make_cmd(directory: str | None, kind: str | None, scope: str | None, output: str | None,
             install: bool, unit_dir: str | None, python: str | None, run_as: str | None,
             env_file: str | None) -> None:
    """Write the service file with the whole configuration (HYPERCACHEIO_* of this shell)."""
    settings = load_settings(directory)
    show_storage(settings)
    try:
        spec = svc.build_spec(settings, kind=kind, scope=scope, python=python, run_as=run_as,
                              env_file=env_file)
        if install:
            folder = Path(unit_dir) if unit_dir else svc.install_dir(spec.kind, spec.scope)
            target = folder / spec.file_name
        else:
            target = Path(output) if output else Path.cwd()
        path = svc.write_service_file(spec, target)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {path} ({spec.kind}, {spec.scope} scope, mode 0600)")
    if TOKEN_VAR not in spec.environment:
        click.echo(f"No API token in it ({TOKEN_VAR} is not set): the node uses the one it "
                   f"generates in {token_path(settings)}.")
    elif spec.env_file:
        click.echo(f"wrote {spec.env_file} (the API token, mode 0600)")
    else:
        click.echo(f"It contains {TOKEN_VAR}: keep it private.")
    if TOKEN_VAR in spec.environment and weak_token_refused(settings):
        err().print("[yellow]warning:[/yellow] the node refuses to listen on "
                    f"{escape(settings.node_listen_host)} with an empty or default token; set "
                    f"{TOKEN_VAR} and run make again")
    if not install:
        installed = svc.install_dir(spec.kind, spec.scope) / spec.file_name
        sudo = "sudo " if spec.scope == "system" else ""
        click.echo(f"Install it:  {sudo}cp {path} {installed}   (or run again with --install)")
    click.echo("Then:        hypercacheio service start")


def _run_verb(verb: str, kind: str | None, scope: str | None, unit_dir: str | None) -> None:
    try:
        manager = service_verbs.manager_for(kind, scope, unit_dir)
        result = manager.run(verb)
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc
    output = result.output.rstrip()
    if output:
        click.echo(output)
    if result.ok:
        out().print(f"[green]{escape(result.message)}[/green]")
    else:
        err().print(f"[red]{verb}:[/red] {escape(result.message)}")
    sys.exit(result.exit_code)


def _verb_command(verb: str, doc: str) -> None:
    @service_group.command(verb, help=doc)
    @kind_option
    @scope_option
    @dir_option
    def command(kind: str | None, scope: str | None, unit_dir: str | None) -> None:
        _run_verb(verb, kind, scope, unit_dir)


_verb_command("start", "Load, enable at boot and start the service.")
_verb_command("stop", "Stop the service.")
_verb_command("restart", "Restart the service.")
_verb_command("status", "Show the service manager's status (exit 3 when not running).")
_verb_command("remove", "Stop, disable and delete the installed service file.")


@click.command("check")
@directory_option
@click.option("--endpoint", "endpoints", multiple=True, metavar="URL",
              help="Also check this node API URL (repeatable), e.g. a peer on another port.")
@click.option("--timeout", type=float, default=None,
              help="Seconds per request (default: HYPERCACHEIO_TIMEOUT); a replicated "
                   "key must appear within twice this.")
def check_cmd(directory: str | None, endpoints: tuple[str, ...], timeout: float | None) -> None:
    """Ping, Add, Get, Put, Delete and Lock against every configured endpoint; Forward
    and Push between a primary and its secondaries."""
    settings = load_settings(directory)
    show_storage(settings)
    if timeout is not None and timeout <= 0:
        raise click.BadParameter("must be > 0 seconds", param_hint="--timeout")
    try:
        options = NodeOptions.from_env()
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc
    report = check_mod.run_check(settings, extra_endpoints=endpoints, timeout=timeout,
                                 options=options)
    render_report(report, out())
    sys.exit(report.exit_code)


_STYLE = {check_mod.PASS: "[green]PASS[/green]", check_mod.FAIL: "[red]FAIL[/red]",
          check_mod.SKIP: "[yellow]SKIP[/yellow]"}


def render_report(report: check_mod.Report, console: Any, *, family: str | None = None) -> None:
    """Print the server line, the table of checks, a summary and, if needed, advice."""
    s = report.server
    where = (f"host {s.host} port {s.port} (listening on {s.listen_host})"
             if s.server_type == "node" else f"in-process store at {s.directory}")
    console.print(f"Server type: [bold]{s.server_type.upper()}[/bold], role {s.role}, "
                  f"{escape(where)}")
    if s.found:
        console.print(f"  (a node {escape(s.found)})")
    table = Table(title="hypercacheio connectivity check")
    for name, justify in (("endpoint", "left"), ("address", "left"), ("check", "left"),
                          ("result", "left"), ("ms", "right"), ("detail", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    last = None
    for row in report.rows:
        first = row.endpoint is not last
        last = row.endpoint
        table.add_row(escape(row.endpoint.label) if first else "",
                      escape(row.endpoint.where) if first else "",
                      row.check, _STYLE[row.status],
                      "" if row.ms is None else f"{row.ms:.1f}", escape(row.detail))
    console.print(table)
    for ep in {r.endpoint: None for r in report.rows if r.endpoint.note}:
        console.print(f"note: {escape(ep.label)}: {escape(ep.note)}")
    failed = sum(1 for r in report.rows if r.status == check_mod.FAIL)
    if report.ok:
        console.print(f"[green]all {len(report.rows)} checks passed[/green]")
    else:
        console.print(f"[red]{failed} check(s) failed[/red], "
                      f"{sum(1 for r in report.rows if r.status == check_mod.SKIP)} skipped")
    if report.auth_failed:
        console.print("[red]authentication failed[/red] on "
                      + ", ".join(escape(ep.where) for ep in report.auth_failed)
                      + ": " + escape(check_mod.auth_advice(report)))
    ports = [ep.port for ep in report.unreachable if ep.port is not None]
    if ports:
        console.print("[bold]connection failed[/bold] to "
                      + ", ".join(escape(ep.where) for ep in report.unreachable))
        for line in firewall_advice(ports, family=family):
            console.print(escape(line), highlight=False)


__all__ = ["check_cmd", "render_report", "service_group"]
