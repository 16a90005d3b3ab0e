"""The replication paths of the connectivity check: Forward and Push.

On a secondary, Forward (a write through the local node, or the library when embedded,
reaches the primary and reads back here) and Push (a key written on the primary appears here
within ``PUSH_WAIT_FACTOR`` request timeouts); on a primary, Push to each secondary (read back
from the secondary's API). Their keys have CHECK_TTL and are deleted afterwards. The
endpoints, the six checks and the report are in ``check.py``, which calls ``check_paths``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..config import Settings
from .check import (
    CHECK_TTL,
    FAIL,
    FORWARD,
    KEY_PREFIX,
    POLL_SECONDS,
    PUSH,
    CheckFailed,
    ClientFactory,
    Endpoint,
    Report,
    _Checker,
    _describe,
    _expect,
    _ms,
)

log = logging.getLogger(__name__)


@dataclass
class LocalSide:
    """Where the replication checks write and read on this host: the local node (by its
    API) or, embedded, the store in this process (``prefix``: its keys' prefix, which a
    node's API does not add). ``problem``: why it cannot be used (the rows are skipped)."""

    open: Callable[[], Any]
    where: str
    node: bool
    prefix: str = ""
    problem: str | None = None


def _wait_for(read: Callable[[], Any], want: Any, seconds: float) -> bool:
    """True once ``read()`` returns ``want``, polling for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        if read() == want:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


class _PathChecker(_Checker):
    """The Forward and Push checks, in the group of the remote endpoint they involve.
    Every key it writes has CHECK_TTL and is deleted afterwards."""

    def __init__(self, report: Report, endpoint: Endpoint, redact: Callable[[str], str],
                 local: LocalSide, wait: float) -> None:
        super().__init__(report, endpoint, None, redact)
        self.local = local
        self.wait = wait
        self.mine: Any = None  # the local side (a RemoteCache or a Cache)
        self.remote: Any = None  # the primary or the secondary, by its API
        self.via_local: list[str] = []  # keys written here: deleted here (forwarded)
        self.via_remote: list[str] = []  # keys written on the remote: deleted there

    def fresh(self, what: str) -> tuple[str, str]:
        run = uuid.uuid4().hex
        return f"{KEY_PREFIX}{what}:{run}", f"hypercacheio check {what} {run}"

    def forward(self) -> str:
        key, value = self.fresh("forward")
        self.via_local.append(key)
        self.mine.set(key, value, CHECK_TTL)
        got = self.remote.get(self.local.prefix + key)
        _expect(got == value,
                f"a write through the {self.local.where} did not reach the primary (it reads "
                f"{got!r}): is HYPERCACHEIO_SERVER_ROLE=secondary set for it, with "
                "HYPERCACHEIO_PRIMARY_URL naming this primary?")
        got = self.mine.get(key)
        _expect(got == value, f"the write reached the primary, but this host reads {got!r} "
                              "back (no read-your-writes)")
        return "written here, read back on the primary and here"

    def push_here(self) -> str:
        key, value = self.fresh("push")
        self.via_remote.append(self.local.prefix + key)
        start = time.monotonic()
        self.remote.set(self.local.prefix + key, value, CHECK_TTL)
        if not _wait_for(lambda: self.mine.get(key), value, self.wait):
            why = ("does the primary's HYPERCACHEIO_SECONDARY_URLS list this node's URL, "
                   "with the same HYPERCACHEIO_API_TOKEN?" if self.local.node else
                   "no node runs for this storage directory, and the primary pushes to a "
                   "secondary's node: start one (hypercacheio node start)")
            raise CheckFailed(f"a key written on the primary did not appear here within "
                              f"{self.wait:g} s: {why}")
        return f"written on the primary, read here after {_ms(start):.0f} ms"

    def push_there(self, status: Callable[[], str]) -> str:
        key, value = self.fresh("push")
        self.via_local.append(key)
        start = time.monotonic()
        self.mine.set(key, value, CHECK_TTL)
        if not _wait_for(lambda: self.remote.get(self.local.prefix + key), value, self.wait):
            raise CheckFailed(f"a key written on this primary did not appear on the "
                              f"secondary within {self.wait:g} s; {status()}")
        return f"written here, read on the secondary after {_ms(start):.0f} ms"

    def cleanup(self) -> None:
        for target, keys in ((self.mine, self.via_local), (self.remote, self.via_remote)):
            for key in keys:
                try:
                    target.delete(key)
                except Exception as exc:
                    log.warning("check: could not delete %s via %s (%s); it expires in %g s",
                                key, self.endpoint.where, self.redact(str(exc)), CHECK_TTL)


def _push_status(local: LocalSide, endpoint: Endpoint) -> str:
    """What the primary's own node says of its push to ``endpoint`` (``/ping``)."""
    if not local.node:
        return ("no node runs for this storage directory: a primary's node does the push "
                "(hypercacheio node start)")
    try:
        client = local.open()
        try:
            doc = client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"the primary's node did not say why ({_describe(exc)})"
    rows = (doc.get("replication") or {}).get("secondaries")
    if rows is None:
        return ("the local node pushes to no secondary: set HYPERCACHEIO_SERVER_ROLE=primary "
                "and HYPERCACHEIO_SECONDARY_URLS for it and restart it")
    for row in rows:
        if row.get("url") == endpoint.configured:
            state = "connected" if row.get("connected") else "not connected"
            text = (f"the primary's node reports its push {state}, backlog "
                    f"{row.get('backlog_rows', '?')} rows ({row.get('backlog_seconds', '?')} s)")
            if row.get("last_error"):
                text += f", last error: {row['last_error']}"
            return text
    return (f"the primary's node does not push to {endpoint.configured}: restart it after "
            "changing HYPERCACHEIO_SECONDARY_URLS")


def check_paths(report: Report, endpoint: Endpoint, remote_stopped: str | None,
                 local: LocalSide, token: str, timeout: float, wait: float,
                 factory: ClientFactory, redact: Callable[[str], str]) -> None:
    """Forward and Push on a secondary host (``endpoint``: its primary), or Push on a
    primary (``endpoint``: one of its secondaries)."""
    checker = _PathChecker(report, endpoint, redact, local, wait)
    names = (FORWARD, PUSH) if endpoint.replica == "primary" else (PUSH,)
    if local.problem:
        checker.stopped = local.problem
    elif remote_stopped and endpoint.replica == "primary":
        checker.stopped = remote_stopped
    elif remote_stopped:
        # a primary whose secondary does not answer: its push is broken, say what it sees
        reason = remote_stopped.removeprefix("skipped: ")
        checker.add_row(PUSH, FAIL, f"cannot read from the secondary ({reason}); "
                                    f"{_push_status(local, endpoint)}")
        return
    if checker.stopped:
        for name in names:
            checker.step(name, lambda: "")
        return
    try:
        try:
            checker.remote = factory(endpoint, token, timeout)
            checker.mine = local.open()
        except Exception as exc:  # e.g. the embedded store cannot open: report, go on
            for name in names:
                checker.add_row(name, FAIL, f"cannot open the {local.where}: {_describe(exc)}")
            return
        if endpoint.replica == "primary":
            checker.step(FORWARD, checker.forward)
            checker.step(PUSH, checker.push_here)
        else:
            checker.step(PUSH, partial(checker.push_there,
                                       partial(_push_status, local, endpoint)))
    finally:
        checker.cleanup()
        for side in (checker.mine, checker.remote):
            close = getattr(side, "close", None)
            if close is not None:
                close()


def local_side(settings: Settings, token: str, timeout: float, factory: ClientFactory,
                node: Endpoint | None, embedded_ok: bool | None) -> LocalSide:
    """The local side of the replication checks, after the local checks ran: ``node`` is
    the local node that answered (None if none did), ``embedded_ok`` whether the in-process
    store passed (None: the node was checked instead)."""
    if embedded_ok is None:
        if node is None:
            return LocalSide(lambda: None, "local node", True,
                             problem="skipped: local node not reachable")
        return LocalSide(lambda: factory(node, token, timeout), "local node", True)
    from ..cache import Cache

    return LocalSide(lambda: Cache(settings=settings, l1_max_items=0), "library (embedded)",
                     False, prefix=settings.prefix,
                     problem=None if embedded_ok else "skipped: the local store failed")


__all__ = ["LocalSide", "check_paths", "local_side"]
