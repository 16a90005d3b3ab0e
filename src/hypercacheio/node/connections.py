"""Client connections of the node: a cap, a deadline for the first request head, file limits.

A flood of idle or half-open connections must not starve real clients, so every connection
passes ``ConnectionGate`` (the protocol factory of the listening sockets):

- over ``max_connections`` open at once, the newest connection is closed at once (a metric
  counts it; one log line per burst, not one per connection);
- a connection that has not sent a complete request head within ``read_timeout`` seconds
  of connecting is closed (aiohttp's keep-alive timer covers the time *between* requests;
  before the first one, older aiohttp versions wait for ever);
- ``raise_open_file_limit`` lifts the soft ``RLIMIT_NOFILE`` to the hard limit at start-up,
  and the cap is kept below it, so that the node never fails ``accept`` or ``open`` for
  want of descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .state import NodeState

log = logging.getLogger("hypercacheio.node")

RESERVED_FDS = 64  # descriptors kept for the store, the log, the listening sockets
BURST_LOG_INTERVAL = 10.0  # seconds: at most one "cap reached" line this often


def raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (when allowed); returns the soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s",
                        soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(wanted: int, fd_limit: int) -> int:
    """``wanted``, lowered so that the connections never use the last descriptors."""
    cap = max(1, min(wanted, fd_limit - RESERVED_FDS))
    if cap < wanted:
        log.warning("HYPERCACHEIO_NODE_MAX_CONNECTIONS lowered from %d to %d: the open-file "
                    "limit is %d (raise it, e.g. LimitNOFILE= in the service file)",
                    wanted, cap, fd_limit)
    return cap


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:  # pragma: no cover
            transport.close()


class ConnectionGate:
    """The protocol factory of the node's listening sockets (see the module)."""

    def __init__(self, server: web.Server, state: NodeState, cap: int, read_timeout: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.state = state
        self.cap = cap
        self.read_timeout = read_timeout
        self._monotonic = monotonic
        self._logged_at = -BURST_LOG_INTERVAL
        self._unlogged = 0
        state.open_connections = self.open_connections

    def open_connections(self) -> int:
        conns: Any = getattr(self.server, "_connections", None)
        return len(conns) if conns is not None else len(self.server.connections)

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open_connections() >= self.cap:
            self._refused()
            return _Refused()
        handler = self.server()
        asyncio.get_running_loop().call_later(self.read_timeout, self._head_deadline, handler)
        return handler

    def _refused(self) -> None:
        self.state.refused_connections += 1
        self._unlogged += 1
        now = self._monotonic()
        if now - self._logged_at >= BURST_LOG_INTERVAL:
            log.warning("connection cap reached: %d connections open "
                        "(HYPERCACHEIO_NODE_MAX_CONNECTIONS %d); closing new ones "
                        "(%d refused since the last such line)",
                        self.open_connections(), self.cap, self._unlogged)
            self._logged_at = now
            self._unlogged = 0

    def _head_deadline(self, handler: Any) -> None:
        """Close the connection if no complete request head came within the read timeout."""
        if handler.transport is None:
            return  # closed already
        if getattr(handler, "_request_count", 1) == 0:
            self.state.timed_out_connections += 1
            handler.force_close()
