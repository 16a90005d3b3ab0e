"""``hypercacheio top``: a live view of a node and its cluster, from its ``/metrics`` and ``/ping``.

On a terminal: a full screen (rich ``Live``) refreshed every ``--interval`` seconds; keys
``q`` quit, ``p`` pause, ``s`` sort (by name, ops/s, p99). Not on a terminal: one plain line
per interval. ``--once``: one snapshot as text, or as JSON with ``--json`` (two scrapes
``--interval`` apart, so that rates are over that interval).

The node is the local one (the pid file of the storage directory, as ``node status`` finds
it) unless ``--url`` names another; the token is the one every client verb sends
(``HYPERCACHEIO_API_TOKEN``, else the storage directory's token file).
"""

from __future__ import annotations

import json
import math
import os
import select
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import click
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..auth import client_token
from ..errors import HypercacheioError
from ..node import protocol as p
from .common import directory_option, err, load_settings, out

BLOCKS = " ▁▂▃▄▅▆▇█"
HISTORY = 30
"""Samples kept per operation for its sparkline."""
SORTS = ("ops/s", "name", "p99")
LAG_WARN_MS = 1000.0
BACKLOG_WARN = 1000
LATENCY = "hypercacheio_request_duration_seconds"
NOT_ERRORS = frozenset({"404"})
"""Statuses of ``hypercacheio_requests_total`` that answer rather than fail: a miss (404).
Every other 4xx and 5xx counts as an error."""

Metrics = dict[str, list[tuple[dict[str, str], float]]]


# ---- scraping -----------------------------------------------------------------------------

def parse_metrics(text: str) -> Metrics:
    """Prometheus text -> {name: [(labels, value), ...]} (comments skipped)."""
    found: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        labels: dict[str, str] = {}
        if brace:
            for part in _split_labels(rest.rstrip("}")):
                key, _, quoted = part.partition("=")
                labels[key.strip()] = quoted.strip().strip('"')
        try:
            number = float(value)
        except ValueError:
            continue
        found.setdefault(name.strip(), []).append((labels, number))
    return found


def _split_labels(text: str) -> Iterator[str]:
    part, quoted = "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            yield part
            part = ""
        else:
            part += ch
    if part:
        yield part


def scalar(metrics: Metrics, name: str, default: float = 0.0) -> float:
    rows = metrics.get(f"hypercacheio_{name}")
    return rows[0][1] if rows else default


@dataclass
class Sample:
    """One scrape of ``/metrics`` and ``/ping``."""

    at: float
    metrics: Metrics
    ping: dict[str, Any]


class Source:
    """The node being watched: its URL and token."""

    def __init__(self, url: str, token: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = ssl._create_unverified_context() if url.startswith("https") else None

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path,
                                         headers={p.TOKEN_HEADER: self.token})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.context) as resp:
                body: bytes = resp.read()
                return body
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise HypercacheioError(
                    f"the node at {self.url} refused the token (401); set "
                    "HYPERCACHEIO_API_TOKEN to its token") from exc
            raise HypercacheioError(f"{self.url}{path} answered {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HypercacheioError(f"no node answers at {self.url} ({reason}); start one "
                                    "with `hypercacheio node start` or pass --url") from exc

    def sample(self) -> Sample:
        ping = json.loads(self._get("/ping"))
        text = self._get("/metrics").decode("utf-8", "replace")
        return Sample(time.monotonic(), parse_metrics(text), ping)


# ---- figures ------------------------------------------------------------------------------

def _by_op(metrics: Metrics) -> dict[str, dict[str, float]]:
    ops: dict[str, dict[str, float]] = {}
    for labels, value in metrics.get("hypercacheio_requests_total", []):
        row = ops.setdefault(labels.get("op", "?"), {"total": 0.0, "errors": 0.0})
        row["total"] += value
        if labels.get("status", "200") not in NOT_ERRORS and labels.get("status", "")[:1] in (
                "4", "5"):
            row["errors"] += value
    return ops


def _buckets(metrics: Metrics) -> dict[str, list[tuple[float, float]]]:
    """Per op: [(upper bound, cumulative count), ...] sorted by bound."""
    found: dict[str, list[tuple[float, float]]] = {}
    for labels, value in metrics.get(f"{LATENCY}_bucket", []):
        le = labels.get("le", "+Inf")
        bound = math.inf if le == "+Inf" else float(le)
        found.setdefault(labels.get("op", "?"), []).append((bound, value))
    for rows in found.values():
        rows.sort()
    return found


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket holding rank q;
    ``None`` without observations. A rank in the +Inf bucket gives the highest bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _delta_buckets(cur: list[tuple[float, float]], prev: list[tuple[float, float]] | None
                   ) -> list[tuple[float, float]]:
    if not prev or len(prev) != len(cur):
        return cur
    return [(b, c - pc) for (b, c), (_, pc) in zip(cur, prev, strict=True)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def peers_of(sample: Sample) -> list[dict[str, Any]]:
    """Every peer the node knows, in one shape: secondaries (a primary's push), mesh peers
    (active-active), each with a ``health`` of ok, lagging or down."""
    ping = sample.ping
    rows: list[dict[str, Any]] = []
    for sec in (ping.get("replication") or {}).get("secondaries") or []:
        backlog = sec.get("backlog_rows")
        seconds = sec.get("backlog_seconds")
        rows.append({"role": "secondary", "address": sec.get("url", "?"),
                     "connected": bool(sec.get("connected")),
                     "backlog_records": backlog,
                     "lag_ms": None if seconds is None else round(seconds * 1000, 3),
                     "last_error": sec.get("last_error") or ""})
    for peer in (ping.get("mesh") or {}).get("peers") or []:
        rows.append({"role": "mesh peer", "address": peer.get("address", "?"),
                     "connected": bool(peer.get("connected")),
                     "backlog_records": peer.get("backlog_records"),
                     "lag_ms": peer.get("lag_ms"),
                     "last_error": peer.get("last_error") or ""})
    for row in rows:
        if not row["connected"]:
            row["health"] = "down"
        elif ((row["backlog_records"] or 0) > BACKLOG_WARN
              or (row["lag_ms"] or 0) > LAG_WARN_MS):
            row["health"] = "lagging"
        else:
            row["health"] = "ok"
    return rows


def snapshot(url: str, cur: Sample, prev: Sample | None) -> dict[str, Any]:
    """What the view shows, as one JSON-able document (``--once --json`` prints it)."""
    m = cur.metrics
    span = cur.at - prev.at if prev is not None else 0.0
    ops_now = _by_op(m)
    ops_before = _by_op(prev.metrics) if prev is not None else {}
    hist_now = _buckets(m)
    hist_before = _buckets(prev.metrics) if prev is not None else {}
    ops: dict[str, Any] = {}
    for op in sorted(set(ops_now) | set(hist_now)):
        row = ops_now.get(op, {"total": 0.0, "errors": 0.0})
        before = ops_before.get(op, {"total": 0.0, "errors": 0.0})
        window = _delta_buckets(hist_now.get(op, []), hist_before.get(op))
        if not window or window[-1][1] <= 0:
            window = hist_now.get(op, [])  # nothing new: the figures since the start
        ops[op] = {
            "requests_total": int(row["total"]),
            "errors_total": int(row["errors"]),
            "per_s": round((row["total"] - before["total"]) / span, 2) if span > 0 else None,
            "p50_ms": _ms(quantile(0.50, window)),
            "p99_ms": _ms(quantile(0.99, window)),
        }
    hits, misses = scalar(m, "hits_total"), scalar(m, "misses_total")
    gc_runs, gc_removed = scalar(m, "gc_runs_total"), scalar(m, "gc_removed_total")
    ping = cur.ping
    return {
        "url": url,
        "role": ping.get("role"),
        "node_id": ping.get("node_id"),
        "version": ping.get("version"),
        "uptime": ping.get("uptime"),
        "interval": round(span, 3) if span > 0 else None,
        "ops": ops,
        "hits_total": int(hits),
        "misses_total": int(misses),
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "entries": int(scalar(m, "entries")),
        "locks": int(scalar(m, "locks")),
        "db_bytes": int(scalar(m, "db_bytes")),
        "wal_bytes": int(scalar(m, "wal_bytes")),
        "connections": int(scalar(m, "connections")),
        "l1_items": int(scalar(m, "l1_items")),
        "l1_bytes": int(scalar(m, "l1_bytes")),
        "gc": {"runs_total": int(gc_runs), "removed_total": int(gc_removed),
               "failures_total": int(scalar(m, "gc_failures_total")),
               "removed_per_s": (round((gc_removed - scalar(prev.metrics, "gc_removed_total"))
                                       / span, 2) if prev is not None and span > 0 else None)},
        "peers": peers_of(cur),
    }


# ---- rendering ----------------------------------------------------------------------------

def sparkline(values: Any, width: int = HISTORY) -> str:
    """Unicode blocks, one per value, scaled to the largest (all blank when all zero)."""
    values = list(values)[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        return BLOCKS[1] * len(values) if values else ""
    return "".join(BLOCKS[min(8, max(1 if v > 0 else 0, round(v / top * 8)))]
                   for v in values)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def short_address(address: str) -> str:
    """``http://host:port/api/hypercacheio`` -> ``host:port`` (a mesh peer's is already)."""
    return urlsplit(address).netloc if "://" in address else address


HEALTH_STYLE = {"ok": "green", "lagging": "yellow", "down": "bold red"}


@dataclass
class View:
    """What the screen keeps between refreshes: rate history, sort order, pause."""

    url: str
    sort: int = 0
    paused: bool = False
    error: str = ""
    history: dict[str, deque[float]] = field(default_factory=dict)
    width: int = 200  # the terminal's columns (the sparklines shrink to fit)

    def record(self, doc: dict[str, Any]) -> None:
        for op, row in doc["ops"].items():
            if row["per_s"] is not None:
                self.history.setdefault(op, deque(maxlen=HISTORY)).append(row["per_s"])

    def ordered(self, ops: dict[str, Any]) -> list[str]:
        key = SORTS[self.sort]
        if key == "name":
            return sorted(ops)
        field_name = "per_s" if key == "ops/s" else "p99_ms"
        return sorted(ops, key=lambda op: (-(ops[op][field_name] or 0.0), op))


def render(doc: dict[str, Any] | None, view: View | None = None, keys: bool = True
           ) -> RenderableType:
    """The whole screen (or, without ``keys``, the ``--once`` text) for one snapshot."""
    view = view or View(url=doc["url"] if doc else "")
    parts: list[RenderableType] = []
    if doc is None:
        parts.append(Text(f"hypercacheio top  {view.url}", style="bold"))
    else:
        ratio = doc["hit_ratio"]
        gc = doc["gc"]
        gc_text = (f"gc {gc['runs_total']} runs, {gc['removed_total']} removed"
                   + (f", [red]{gc['failures_total']} failed[/]" if gc["failures_total"]
                      else ""))
        lines = [
            f"[bold]hypercacheio top[/]  {escape(doc['url'])}   role {doc['role']}   "
            f"version {doc['version']}   uptime {_num(doc['uptime'], '{:.0f}')} s",
            f"hit ratio [bold]{'-' if ratio is None else f'{ratio * 100:.1f}%'}[/] "
            f"({doc['hits_total']} hits, {doc['misses_total']} misses)   "
            f"entries [bold]{doc['entries']}[/]   locks {doc['locks']}   "
            f"connections [bold]{doc['connections']}[/]",
            f"db {human_bytes(doc['db_bytes'])}   wal {human_bytes(doc['wal_bytes'])}   "
            f"l1 {doc['l1_items']} items / {human_bytes(doc['l1_bytes'])}   {gc_text}",
        ]
        parts += [Text.from_markup(line, overflow="fold") for line in lines]
        ops = Table(title=f"operations (sorted by {SORTS[view.sort]})", title_justify="left",
                    expand=False)
        shown = [op for op, row in doc["ops"].items() if row["requests_total"]]
        # the other columns take about 60 cells: the sparkline gets what is left
        trend = max(5, min(HISTORY, view.width - 60 - max(map(len, shown), default=2)))
        widths = {"op": max(map(len, shown), default=2), "trend": trend, "ops/s": 7,
                  "total": 7, "errors": 6, "p50 ms": 7, "p99 ms": 7}
        for name, justify in (("op", "left"), ("ops/s", "right"), ("trend", "left"),
                              ("total", "right"), ("errors", "right"), ("p50 ms", "right"),
                              ("p99 ms", "right")):
            ops.add_column(name, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                           min_width=widths.get(name))
        for op in view.ordered(doc["ops"]):
            row = doc["ops"][op]
            if not row["requests_total"]:
                continue  # a route never called: no row
            ops.add_row(escape(op), _num(row["per_s"], "{:.1f}"),
                        Text(sparkline(view.history.get(op, ()), trend), style="cyan"),
                        str(row["requests_total"]),
                        Text(str(row["errors_total"]),
                             style="red" if row["errors_total"] else ""),
                        _num(row["p50_ms"], "{:.3f}"), _num(row["p99_ms"], "{:.3f}"))
        parts.append(ops)
        if doc["peers"]:
            peers = Table(title="peers", title_justify="left")
            longest = max(len(short_address(peer["address"])) for peer in doc["peers"])
            for name, least in (("peer", longest), ("role", 9), ("state", 7),
                                ("backlog", 7), ("lag ms", 8)):
                peers.add_column(name, no_wrap=True, min_width=least)
            peers.add_column("last error", overflow="fold", max_width=60)
            for peer in doc["peers"]:
                style = HEALTH_STYLE[peer["health"]]
                peers.add_row(escape(short_address(peer["address"])), peer["role"],
                              Text("up" if peer["connected"] else "down", style=style)
                              if peer["health"] != "lagging" else Text("lagging", style=style),
                              _num(peer["backlog_records"], "{:.0f}"),
                              _num(peer["lag_ms"], "{:.1f}"),
                              Text(peer["last_error"] or "", style="dim"))
            parts.append(peers)
    if view.error:
        parts.append(Text(view.error, style="bold red"))
    if keys:
        parts.append(Text(("PAUSED  " if view.paused else "")
                          + "q quit  p pause  s sort", style="dim"))
    return Group(*parts)


def plain_line(doc: dict[str, Any]) -> str:
    """One line per refresh when stdout is not a terminal."""
    ops = " ".join(f"{op}={row['per_s'] if row['per_s'] is not None else '-'}/s"
                   for op, row in doc["ops"].items() if row["requests_total"])
    ratio = doc["hit_ratio"]
    down = [peer["address"] for peer in doc["peers"] if peer["health"] == "down"]
    return (f"{time.strftime('%H:%M:%S')} entries={doc['entries']} "
            f"hit_ratio={'-' if ratio is None else f'{ratio:.3f}'} "
            f"connections={doc['connections']} wal_bytes={doc['wal_bytes']} {ops}"
            + (f" peers_down={','.join(down)}" if down else ""))


# ---- keys ---------------------------------------------------------------------------------

class KeyReader:
    """Single keys from a terminal's stdin without Enter (cbreak: Ctrl-C still works),
    read without blocking; the terminal's settings come back on exit."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.saved: Any = None

    def __enter__(self) -> KeyReader:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return self
        if os.isatty(fd):
            import termios
            import tty

            self.saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self.fd = fd
        return self

    def read(self, timeout: float) -> str:
        """Keys typed within ``timeout`` seconds ("" if none); sleeps when not a terminal."""
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        return os.read(self.fd, 64).decode("utf-8", "replace")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.fd = None


# ---- the command --------------------------------------------------------------------------

def _target(url: str | None, directory: str | None) -> Source:
    settings = load_settings(directory)
    token = client_token(settings)[0]
    if url is None:
        from ..node import supervise
        from ..node.options import NodeOptions

        try:
            options = NodeOptions.from_env()
        except HypercacheioError as exc:
            raise click.ClickException(str(exc)) from exc
        local = supervise.find_local_node(settings, options)
        url = local.url if local is not None else supervise.client_url(settings, options)
    return Source(url, token)


def _sample(source: Source) -> Sample:
    try:
        return source.sample()
    except HypercacheioError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _screen(console: Console) -> Iterator[Any]:
    from rich.live import Live

    with Live(console=console, screen=True, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        yield live


def _watch(source: Source, interval: float) -> None:
    console = Console()
    view = View(url=source.url)
    prev: Sample | None = None
    cur = _sample(source)
    doc = snapshot(source.url, cur, None)
    view.width = console.size.width
    with KeyReader() as keys, _screen(console) as live:
        live.update(render(doc, view), refresh=True)
        while True:
            deadline = time.monotonic() + interval
            while (remaining := deadline - time.monotonic()) > 0:
                typed = keys.read(remaining)
                if not typed:
                    continue
                for ch in typed.lower():
                    if ch == "q":
                        return
                    if ch == "p":
                        view.paused = not view.paused
                    elif ch == "s":
                        view.sort = (view.sort + 1) % len(SORTS)
                live.update(render(doc, view), refresh=True)
            if view.paused:
                continue
            try:
                prev, cur = cur, source.sample()
                view.error = ""
            except (HypercacheioError, ValueError) as exc:
                view.error = f"{time.strftime('%H:%M:%S')} {exc}"
                live.update(render(doc, view), refresh=True)
                continue
            doc = snapshot(source.url, cur, prev)
            view.record(doc)
            view.width = console.size.width
            live.update(render(doc, view), refresh=True)


def _lines(source: Source, interval: float) -> None:
    cur = _sample(source)
    while True:
        time.sleep(interval)
        try:
            prev, cur = cur, source.sample()
        except (HypercacheioError, ValueError) as exc:
            click.echo(f"{time.strftime('%H:%M:%S')} error: {exc}", err=True)
            continue
        click.echo(plain_line(snapshot(source.url, cur, prev)))


@click.command("top")
@click.option("--url", default=None, metavar="URL",
              help="A node's API URL (e.g. http://10.0.0.5:8080/api/hypercacheio); "
                   "default: the local node of the storage directory.")
@click.option("--interval", "-n", type=click.FloatRange(min=0.05), default=1.0,
              show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print JSON.")
@directory_option
def top_cmd(url: str | None, interval: float, once: bool, as_json: bool,
            directory: str | None) -> None:
    """A live view of a node and its peers: ops/s, hit ratio, latency, size, replication.

    Keys: q quit, p pause, s sort. Not on a terminal: one line per interval.
    """
    if as_json and not once:
        raise click.UsageError("--json goes with --once")
    source = _target(url, directory)
    if once:
        first = _sample(source)
        time.sleep(interval)
        doc = snapshot(source.url, _sample(source), first)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            out().print(render(doc, View(url=source.url), keys=False))
        return
    try:
        if sys.stdout.isatty():  # keys only when stdin is a terminal too; Ctrl-C always
            _watch(source, interval)
        else:
            _lines(source, interval)
    except KeyboardInterrupt:
        pass
    except click.ClickException:
        raise
    except HypercacheioError as exc:  # pragma: no cover - sampling errors are caught above
        err().print(f"[red]{escape(str(exc))}[/]")
        sys.exit(1)


__all__ = ["parse_metrics", "quantile", "snapshot", "sparkline", "top_cmd"]
