"""The connectivity check: can this host reach every cache endpoint it is configured to use?

For each endpoint (the local node or store, the primary of a secondary, the secondaries of a
primary, the HA peers, any extra URL) it runs Ping, Add, Get, Put, Delete and Lock, under a
fresh key ``hypercacheio:check:<uuid>`` and a fresh lock name, and removes both afterwards,
whatever failed. A connection failure comes with firewall advice for this host's system.

Replication paths: on a secondary its primary's Forward and Push, on a primary its Push to
each secondary (``check_paths.py``, run from ``run_check`` after each such endpoint).

Peers are configured as ``host:repl_port`` (the binary replication port), which says nothing
about their HTTP API port. The check assumes that every node of a cluster serves its HTTP
API on the same port as this host (``HYPERCACHEIO_NODE_PORT``); pass ``--endpoint URL`` for a
node where that is not true.

The firewall advice for an endpoint that did not answer is in ``firewall.py``; the report is
printed by ``cli/service.py``. The module stays at about 550 lines because endpoint discovery,
the six checks and the run that sequences them are one flow read top to bottom.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..auth import FROM_DEFAULT, FROM_ENV, TOKEN_FILE, TOKEN_VAR, client_token
from ..config import API_PATH, Settings
from ..errors import AuthError, HypercacheioError, NodeUnavailable
from .firewall import (  # noqa: F401 - part of this module's API
    DEBIAN_LIKE,
    OS_RELEASE,
    RHEL_LIKE,
    SOCKETFILTERFW,
    firewall_advice,
    firewall_family,
    read_os_release,
)

if TYPE_CHECKING:
    from ..node.options import NodeOptions
    from ..node.supervise import LocalNode

log = logging.getLogger(__name__)

CHECKS = ("Ping", "Add", "Get", "Put", "Delete", "Lock")
FORWARD, PUSH = "Forward", "Push"
PUSH_WAIT_FACTOR = 2.0
"""A pushed key must appear within this many request timeouts (2 s by default)."""
POLL_SECONDS = 0.02
KEY_PREFIX = "hypercacheio:check:"
CHECK_TTL = 60.0
"""Every key and lock the check writes expires by itself, even if the cleanup cannot run."""
LOCK_TTL = 30.0
LOOPBACK = "127.0.0.1"

PASS, FAIL, SKIP = "pass", "fail", "skip"



class CheckFailed(Exception):
    """A check got an answer, but the wrong one (not raised with ``assert``: ``-O`` would
    strip it and every check would pass)."""


def _expect(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class Endpoint:
    """One place the check talks to. ``url`` is None for the in-process (embedded) store."""

    label: str
    url: str | None
    note: str = ""
    unix_socket: str | None = None
    insecure: bool = False  # the local node's TLS certificate is not checked
    replica: str = ""  # "primary": this secondary's primary; "secondary": a primary's secondary
    configured: str = ""  # the URL as configured (the primary's push names it so)

    @property
    def host(self) -> str | None:
        return urlsplit(self.url).hostname if self.url else None

    @property
    def port(self) -> int | None:
        if not self.url:
            return None
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def where(self) -> str:
        if self.unix_socket:
            return f"unix:{self.unix_socket}"
        return self.url or "in-process store"


@dataclass
class CheckRow:
    endpoint: Endpoint
    check: str
    status: str
    detail: str = ""
    ms: float | None = None


@dataclass(frozen=True)
class ServerInfo:
    """What this host is: embedded or node, primary or secondary, and where its API is."""

    server_type: str
    role: str
    host: str
    port: int
    listen_host: str
    directory: str
    found: str = ""  # how a running node was found when the settings say embedded


@dataclass
class Report:
    server: ServerInfo
    rows: list[CheckRow] = field(default_factory=list)
    unreachable: list[Endpoint] = field(default_factory=list)
    auth_failed: list[Endpoint] = field(default_factory=list)
    token_source: str = FROM_ENV

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.status == PASS for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def server_info(settings: Settings) -> ServerInfo:
    return ServerInfo(server_type=settings.server_type, role=settings.role,
                      host=settings.node_host, port=settings.node_port,
                      listen_host=settings.node_listen_host, directory=settings.directory)


def api_url(host: str, port: int, scheme: str = "http") -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return f"{scheme}://{bracketed}:{port}{API_PATH}"


def check_token(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The token a client on this host uses (``hypercacheio.auth.client_token``)."""
    return client_token(settings, environ)[0]


def _local_tls(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return bool(environ.get("HYPERCACHEIO_NODE_TLS_CERT"))


def _normalize(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    path = parts.path.rstrip("/") or API_PATH
    return f"{parts.scheme}://{parts.netloc.lower()}{path}"


def remote_endpoints(settings: Settings, extra: Iterable[str] = ()) -> list[Endpoint]:
    """The other hosts this host is configured to talk to, each once."""
    found: list[Endpoint] = []
    if settings.role == "secondary":
        found.append(Endpoint("primary", _normalize(settings.primary_url), replica="primary",
                              configured=settings.primary_url.rstrip("/")))
    else:
        for i, url in enumerate(settings.secondary_urls, 1):
            found.append(Endpoint(f"secondary {i}", _normalize(url), replica="secondary",
                                  configured=url.rstrip("/")))
    if settings.ha_enabled:
        for peer in settings.peer_addrs:
            host = peer.rpartition(":")[0]
            found.append(Endpoint(
                f"peer {peer}", api_url(host, settings.node_port),
                f"HTTP port assumed = HYPERCACHEIO_NODE_PORT ({settings.node_port}); "
                "peers list only the replication port"))
    for url in extra:
        found.append(Endpoint("--endpoint", _normalize(url)))
    unique: dict[str, Endpoint] = {}
    for ep in found:
        unique.setdefault(ep.url or "", ep)
    return list(unique.values())


ClientFactory = Callable[[Endpoint, str, float], Any]


def remote_client(endpoint: Endpoint, token: str, timeout: float) -> Any:
    """A ``RemoteCache`` for ``endpoint`` (imported late: it needs the server extra)."""
    from ..node.client import RemoteCache

    if endpoint.url is None:
        raise ValueError(f"{endpoint.label} has no URL")
    return RemoteCache(endpoint.url, token, timeout=timeout, unix_socket=endpoint.unix_socket,
                       verify=not endpoint.insecure)


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000.0


def is_connection_failure(exc: BaseException) -> bool:
    """True when the request did not get through (refused, timed out, no route), as opposed
    to a node that answered wrongly (5xx, not JSON): only then can a firewall be the cause."""
    if not isinstance(exc, NodeUnavailable):
        return False
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return True
    try:
        import urllib3
    except ImportError:  # pragma: no cover
        return False
    return isinstance(cause, urllib3.exceptions.HTTPError)


def _network_reason(exc: BaseException) -> str:
    """The useful end of a transport error ("[Errno 111] Connection refused", "timed out")."""
    if not is_connection_failure(exc):
        return str(exc)
    cause = exc.__cause__
    reason = getattr(cause, "reason", None) or cause or exc
    args: tuple[Any, ...] = tuple(getattr(reason, "args", ()))
    # urllib3 errors carry (connection object, message): keep the message.
    text = args[-1] if len(args) >= 2 and isinstance(args[-1], str) else str(reason)
    marker = "Failed to establish a new connection: "
    if marker in text:
        text = text.split(marker, 1)[1].rstrip("\"')")
    elif text.startswith(("HTTPConnectionPool(", "HTTPSConnectionPool(")) and "): " in text:
        text = text.split("): ", 1)[1]
    return text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AuthError):
        return "authentication failed: the node refused the API token (see the advice below)"
    if is_connection_failure(exc):
        return f"connection failed: {_network_reason(exc)}"
    if isinstance(exc, NodeUnavailable):
        return f"bad answer: {exc}"
    return f"{type(exc).__name__}: {exc}"


class _Checker:
    """Runs the six checks against one endpoint and cleans up after them."""

    def __init__(self, report: Report, endpoint: Endpoint, target: Any, redact: Callable[[str],
                 str]) -> None:
        self.report = report
        self.endpoint = endpoint
        self.target = target
        self.redact = redact
        run = uuid.uuid4().hex
        self.key = f"{KEY_PREFIX}{run}"
        self.lock_name = f"{KEY_PREFIX}lock:{run}"
        self.value = f"hypercacheio check {run}"
        self.held: list[Any] = []
        self.stopped: str | None = None
        self.wrote = False  # the key may exist on the endpoint: delete it at the end

    def add_row(self, check: str, status: str, detail: str, ms: float | None = None) -> None:
        self.report.rows.append(CheckRow(self.endpoint, check, status, self.redact(detail), ms))

    def step(self, check: str, fn: Callable[[], str]) -> bool:
        """Run one check; on failure, record why and skip the rest of this endpoint."""
        if self.stopped:
            self.add_row(check, SKIP, self.stopped)
            return False
        start = time.monotonic()
        try:
            detail = fn()
        except CheckFailed as exc:
            self.add_row(check, FAIL, str(exc), _ms(start))
            return False
        except Exception as exc:  # the check reports every failure; it never crashes on one
            log.debug("check %s on %s failed", check, self.endpoint.where, exc_info=True)
            self.add_row(check, FAIL, _describe(exc), _ms(start))
            if isinstance(exc, NodeUnavailable):
                if is_connection_failure(exc):
                    self._unreachable()
                self.stopped = "skipped: endpoint not reachable"
            elif isinstance(exc, AuthError):
                if self.endpoint not in self.report.auth_failed:
                    self.report.auth_failed.append(self.endpoint)
                self.stopped = "skipped: token refused"
            return False
        self.add_row(check, PASS, detail, _ms(start))
        return True

    def _unreachable(self) -> None:
        if self.endpoint not in self.report.unreachable:
            self.report.unreachable.append(self.endpoint)

    def run(self, ping: Callable[[], str]) -> None:
        try:
            if not self.step("Ping", ping) and not self.stopped:
                self.stopped = "skipped: ping failed"
            self.step("Add", self.check_add)
            self.step("Get", self.check_get)
            self.step("Put", self.check_put)
            self.step("Delete", self.check_delete)
            self.step("Lock", self.check_lock)
        finally:
            self.cleanup()

    def check_add(self) -> str:
        self.wrote = True
        _expect(self.target.add(self.key, self.value, CHECK_TTL),
                f"add of the fresh key {self.key} was refused")
        _expect(not self.target.add(self.key, "second", CHECK_TTL),
                "a second add of the same key succeeded: add is not atomic")
        return "added once, second add refused"

    def check_get(self) -> str:
        got = self.target.get(self.key)
        _expect(got == self.value, f"read back {got!r}, expected {self.value!r}")
        return "read back the added value"

    def check_put(self) -> str:
        new = self.value + " (put)"
        self.target.set(self.key, new, CHECK_TTL)
        got = self.target.get(self.key)
        _expect(got == new, f"after put read back {got!r}, expected {new!r}")
        return "overwrote and read back"

    def check_delete(self) -> str:
        _expect(self.target.delete(self.key), "delete said the key was not there")
        marker = "<missing>"
        got = self.target.get(self.key, marker)
        _expect(got == marker, f"key still reads {got!r} after delete")
        return "deleted, reads as missing"

    def check_lock(self) -> str:
        mine = self.target.lock(self.lock_name, LOCK_TTL, owner=f"check-{uuid.uuid4().hex}")
        _expect(mine.acquire(blocking=False), f"lock {self.lock_name} was not granted")
        self.held.append(mine)
        other = self.target.lock(self.lock_name, LOCK_TTL, owner=f"check-{uuid.uuid4().hex}")
        if other.acquire(blocking=False):
            self.held.append(other)
            raise CheckFailed("a second owner got the same lock: no mutual exclusion")
        _expect(mine.release(), "release of the held lock failed")
        self.held.remove(mine)
        fence = getattr(mine, "fence", None)
        return "acquired, contended, released" + (f" (fence {fence})" if fence else "")

    def cleanup(self) -> None:
        """Remove the check's key and release its locks; each expires anyway (CHECK_TTL)."""
        for lock in self.held:
            try:
                lock.release()
            except Exception as exc:
                log.warning("check: could not release lock %s on %s (%s); it expires in %g s",
                            self.lock_name, self.endpoint.where, self.redact(str(exc)),
                            LOCK_TTL)
        if not self.wrote:
            return
        try:
            self.target.delete(self.key)
        except Exception as exc:
            log.warning("check: could not delete %s on %s (%s); it expires in %g s",
                        self.key, self.endpoint.where, self.redact(str(exc)), CHECK_TTL)


def _ping_detail(doc: Mapping[str, Any]) -> str:
    parts = []
    for name in ("role", "node_id", "version"):
        if doc.get(name) not in (None, ""):
            parts.append(f"{name.replace('_', ' ')} {doc[name]}")
    return "alive" + (f" ({', '.join(parts)})" if parts else "")


def _ping_via(client: Any) -> str:
    return _ping_detail(client.ping())


def _check_remote(report: Report, endpoint: Endpoint, token: str, timeout: float,
                  factory: ClientFactory, redact: Callable[[str], str]) -> str | None:
    """The six checks on ``endpoint``; returns why they stopped (None: it answered)."""
    client = factory(endpoint, token, timeout)
    try:
        checker = _Checker(report, endpoint, client, redact)
        checker.run(partial(_ping_via, client))
        return checker.stopped
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()


def _check_local_node(report: Report, settings: Settings, token: str, timeout: float,
                      factory: ClientFactory, redact: Callable[[str], str],
                      found: LocalNode | None = None) -> Endpoint | None:
    """Ping the local node (where its pid file says it listens, else on 127.0.0.1), else on
    HYPERCACHEIO_NODE_HOST; check the first that answers and return it. When none answers,
    one failed Ping row says what was tried (and None is returned)."""
    tls = _local_tls() or bool(found and found.url.startswith("https:"))
    scheme = "https" if tls else "http"
    first = found.url if found else api_url(LOOPBACK, settings.node_port, scheme)
    candidates = [Endpoint("local node", first, insecure=tls)]
    if settings.node_host not in (LOOPBACK, "localhost"):
        candidates.append(Endpoint(
            "local node", api_url(settings.node_host, settings.node_port, scheme),
            "127.0.0.1 did not answer: HYPERCACHEIO_NODE_HOST used", insecure=tls))
    tried: list[str] = []
    unreachable = False
    for ep in candidates:
        client = factory(ep, token, timeout)
        try:
            try:
                client.ping()
            except AuthError:
                pass  # it answers; the full run below reports the refused token
            except Exception as exc:
                unreachable = unreachable or is_connection_failure(exc)
                tried.append(f"{ep.url}: {_describe(exc)}")
                continue
            checker = _Checker(report, ep, client, redact)
            checker.run(partial(_ping_via, client))
            return None if checker.stopped else ep
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()
    ep = candidates[-1]
    if unreachable:
        report.unreachable.append(ep)
    checker = _Checker(report, ep, None, redact)
    checker.add_row("Ping", FAIL, "no answer; tried " + "; ".join(tried))
    checker.stopped = "skipped: local node not reachable"
    for name in CHECKS[1:]:
        checker.step(name, lambda: "")
    return None


def _check_embedded(report: Report, settings: Settings, redact: Callable[[str], str]) -> bool:
    """Embedded mode has no local API: check the store in this process instead."""
    from ..cache import Cache

    ep = Endpoint("local store", None)
    cache: Any = None

    def ping() -> str:
        nonlocal cache
        cache = Cache(settings=settings, l1_max_items=0)
        figures = cache.stats()
        checker.target = cache
        return f"store open ({figures.get('entries', '?')} entries)"

    checker = _Checker(report, ep, None, redact)
    try:
        checker.run(ping)
    finally:
        if cache is not None:
            cache.close()
    return checker.stopped is None


def local_node(settings: Settings, options: NodeOptions | None = None) -> LocalNode | None:
    """The node running for this storage directory, found as the CLI finds it (its pid file,
    and the address it recorded there)."""
    try:
        from ..node.options import NodeOptions
        from ..node.supervise import find_local_node

        return find_local_node(settings, options or NodeOptions.from_env())
    except (ImportError, HypercacheioError) as exc:  # bad node options: say so, go on
        log.warning("check: cannot look for a local node: %s", exc)
        return None


def run_check(settings: Settings, *, extra_endpoints: Iterable[str] = (),
              timeout: float | None = None, client_factory: ClientFactory = remote_client,
              include_local: bool = True, token: str | None = None,
              options: NodeOptions | None = None, push_wait: float | None = None) -> Report:
    """Run every check for ``settings`` and return the report (nothing is printed).

    A node running for the storage directory is checked even when the settings say
    ``embedded``: the report's server line says how it was found. With the local checks, a
    secondary also checks its primary's Forward and Push paths, and a primary its Push to
    each secondary (a pushed key must appear within ``push_wait`` seconds, by default
    ``PUSH_WAIT_FACTOR`` times the request timeout).
    """
    from .check_paths import LocalSide, check_paths, local_side  # it builds on this module

    timeout = settings.timeout if timeout is None else timeout
    wait = PUSH_WAIT_FACTOR * timeout if push_wait is None else push_wait
    report = Report(server_info(settings))
    if token is None:
        token, report.token_source = client_token(settings)

    def redact(text: str) -> str:
        return text.replace(token, "***") if len(token) >= 4 else text

    local: LocalSide | None = None  # where the replication checks write and read here
    if include_local:
        found = local_node(settings, options)
        if found is not None and settings.server_type != "node":
            port = urlsplit(found.url).port or settings.node_port
            report.server = dataclasses.replace(
                report.server, server_type="node", port=port,
                found=f"found by its pid file {found.pid_file} (pid {found.pid}); "
                      "HYPERCACHEIO_SERVER_TYPE says embedded")
        if found is not None or settings.server_type == "node":
            answered = _check_local_node(report, settings, token, timeout, client_factory,
                                         redact, found)
            local = local_side(settings, token, timeout, client_factory, answered, None)
            sock = settings.node_socket
            if sock and os.path.exists(sock):
                ep = Endpoint("local node (unix socket)", settings.node_url, unix_socket=sock)
                _check_remote(report, ep, token, timeout, client_factory, redact)
        else:
            passed = _check_embedded(report, settings, redact)
            local = local_side(settings, token, timeout, client_factory, None, passed)
    local_urls = {r.endpoint.url for r in report.rows if r.endpoint.url}
    for ep in remote_endpoints(settings, extra_endpoints):
        if ep.url in local_urls:
            continue
        stopped = _check_remote(report, ep, token, timeout, client_factory, redact)
        if local is not None and ep.replica:
            check_paths(report, ep, stopped, local, token, timeout, wait, client_factory,
                         redact)
    return report


def auth_advice(report: Report) -> str:
    """What to do about a refused token, depending on where the token came from."""
    directory = report.server.directory
    saved = os.path.join(directory, TOKEN_FILE)
    if report.token_source == FROM_DEFAULT:
        return (f"{TOKEN_VAR} is not set and there is no node token in {directory} ({saved}): "
                "if the node keeps its data in another directory, pass --directory or set "
                f"HYPERCACHEIO_SQLITE_PATH to it; or set {TOKEN_VAR} to the node's token.")
    if report.token_source != FROM_ENV:
        return (f"the token in {saved} was refused: is that node serving another storage "
                f"directory? Pass --directory, or set {TOKEN_VAR}.")
    return f"set the same {TOKEN_VAR} on every host."
