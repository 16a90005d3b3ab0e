"""What the node's handlers share: the store, the token, the limits, the GET memory, counters.

``store_call`` runs a Store method from the event loop without ever blocking it on
another process's SQLite lock.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from ..config import Settings
from ..errors import StorageError
from ..l1 import L1
from ..store import Store
from .gc import Collector
from .options import NodeOptions

if TYPE_CHECKING:
    from ..replication.mesh import Mesh
    from ..replication.push import Pusher
    from .forward_routes import Primary

T = TypeVar("T")

STATS_MAX_AGE = 1.0  # seconds a stats() snapshot serves /ping and /metrics
RATE_BUCKETS_MAX = 10_000


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second, bursts of ``rate``."""

    def __init__(self, rate: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._monotonic = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, who: str) -> bool:
        now = self._monotonic()
        level, last = self._buckets.get(who, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        if level < 1.0:
            self._buckets[who] = (level, now)
            return False
        if len(self._buckets) >= RATE_BUCKETS_MAX and who not in self._buckets:
            self._buckets.clear()  # many addresses: forget them all rather than grow
        self._buckets[who] = (level - 1.0, now)
        return True


class NodeState:
    """What the handlers share: the store, the token, the limits and the counters."""

    def __init__(self, store: Store, settings: Settings, options: NodeOptions, token: str,
                 *, version: str = "", listen: list[str] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.options = options
        self.token = token.encode("utf-8")
        self.version = version
        self.listen = listen or []
        self.started = time.monotonic()
        self.started_at = time.time()
        self.limiter = RateLimiter(options.rate_limit) if options.rate_limit > 0 else None
        self.requests: dict[tuple[str, int], int] = {}
        self.auth_failures = 0
        self.rate_limited = 0
        self.waited_writes = 0  # store calls that had to wait for another process's lock
        self.refused_connections = 0  # connections closed at once: over the connection cap
        self.timed_out_connections = 0  # connections closed for a request head sent too slowly
        self.open_connections: Callable[[], int] = lambda: 0  # set by the ConnectionGate
        self.executor = ThreadPoolExecutor(max_workers=2,
                                           thread_name_prefix="hypercacheio-store")
        self.hits = 0
        self.misses = 0
        self.collector: Collector | None = None  # set by the daemon
        self.replication: Pusher | None = None  # a primary's push (set by the daemon)
        self.mesh: Mesh | None = None  # active-active replication (set by the daemon)
        self.primary: Primary | None = None  # a secondary's writes go there (forward_routes)
        self.replica_batches = 0  # replication frames applied here (replica_routes.py)
        self.replica_snapshot_chunks = 0
        self.replica_rows = 0
        self.replica_refused = 0
        self.openapi: bytes | None = None
        # The node's coherent memory for GET answers: the same L1 an app's Cache uses, its
        # entries the (body, headers) of the response, its default fill answering MISS.
        self.l1: L1 | None = L1(store.tokens, settings.l1_max_items, settings.l1_max_age,
                                max_bytes=settings.l1_max_bytes,
                                clock=store.clock) if settings.l1_max_items else None
        self._stats: dict[str, Any] = {}
        self._stats_at = -math.inf

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._stats_at > STATS_MAX_AGE:
            self._stats = self.store.stats()
            self._stats_at = now
        return self._stats

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def forget(self, key: str) -> None:
        """Drop the GET memory's copy of a key this node just wrote (its token moved anyway:
        this frees the bytes at once)."""
        if self.l1 is not None:
            self.l1.discard(key)


STATE = web.AppKey("hypercacheio_state", NodeState)


def _is_busy(exc: BaseException) -> bool:
    """True if SQLite refused because another connection holds the lock (nothing was done)."""
    for e in (exc, exc.__cause__):
        if isinstance(e, sqlite3.OperationalError) and (
                "locked" in str(e) or "busy" in str(e)):
            return True
    return False


async def store_call(state: NodeState, fn: Callable[..., T], *args: Any) -> T:
    """Run a Store method without ever blocking the event loop on SQLite's lock.

    The loop's own connection waits for no lock (busy_timeout 0, set at start-up), so the
    call runs inline when SQLite answers at once, which is nearly always. When another
    process holds the write lock it fails before doing anything, and runs again on a
    worker thread whose connection waits as usual, while the loop serves other requests.
    """
    try:
        return fn(*args)
    except (StorageError, sqlite3.OperationalError) as exc:
        if not _is_busy(exc):
            raise
    state.waited_writes += 1
    return await asyncio.get_running_loop().run_in_executor(state.executor, partial(fn, *args))
