"""Connections: one per process and thread, and the fork handshake that keeps them apart.

SQLite keeps the lock state of every open file in process-wide tables. A child that
inherits them believes it holds locks it does not; when the parent later closes its last
connection it deletes the -wal file the child still writes into, and every write of the
child after that is lost to other processes. So fork() first closes this process's idle
connections (``_before_fork``); each thread reopens on its next use, and a forked child
never touches what it inherited.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from .diagnose import storage_error
from .schema import PRAGMAS_CONNECTION

log = logging.getLogger("hypercacheio.store")

FORK_WAIT = 5.0  # seconds fork() waits for other threads to leave SQLite


class _Connection(sqlite3.Connection):
    """A connection that ``_before_fork`` can find (a WeakSet holds it) and close safely.

    ``busy`` counts the uses in progress (a thread inside SQLite with it); ``dead`` is set
    by ``_before_fork`` when it means to close it. A user raises ``busy`` and then checks
    ``dead``; the fork hook sets ``dead`` and then waits for ``busy`` to fall to 0. Under
    the GIL one of the two always sees the other, so a connection is never closed while a
    thread is inside SQLite with it (that crashes the process).
    """

    __slots__ = ("__weakref__", "busy", "dead")
    busy: int
    dead: bool


# Connections inherited through fork() are parked here and never used or closed: closing
# them in the child could release locks the parent holds on the same file.
_INHERITED: list[sqlite3.Connection] = []
_fork_generation = [0]
_owners: weakref.WeakSet[ConnectionOwner] = weakref.WeakSet()
_open: weakref.WeakSet[_Connection] = weakref.WeakSet()
_forking = [False]  # set by _before_fork: connections wait before they open
_opening = [0]  # connections being opened right now
_opening_mutex = threading.Lock()


def _before_fork() -> None:
    """Close this process's idle connections before fork(); each thread reopens on next use."""
    deadline = time.monotonic() + FORK_WAIT
    _forking[0] = True  # no thread opens a new connection until the fork is done
    while _opening[0] and time.monotonic() < deadline:
        time.sleep(0.001)
    for conn in list(_open):
        conn.dead = True  # from now on its owner takes a fresh connection instead
        while conn.busy and time.monotonic() < deadline:
            time.sleep(0.001)  # lets another thread finish its statement or transaction
        if conn.busy:
            log.warning("fork(): a connection to %s still in use after %s s stays open; "
                        "the child must not use hypercacheio", conn, FORK_WAIT)
            continue
        try:
            conn.close()
        except sqlite3.Error:  # already closed
            pass
    for owner in list(_owners):
        owner._local = threading.local()


def _after_fork_in_parent() -> None:
    _forking[0] = False


def _after_fork_in_child() -> None:
    _forking[0] = False
    _fork_generation[0] += 1
    for owner in list(_owners):
        owner._forget_connections()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def connect(path: str, timeout: float, keep_busy: bool = False) -> _Connection:
    """A new connection with the per-connection pragmas (``busy`` left at 1 if asked)."""
    while True:  # the same handshake as busy/dead, with _before_fork (see _Connection)
        with _opening_mutex:  # connecting is rare: a lock makes the count exact anywhere
            _opening[0] += 1
        if not _forking[0]:
            break
        with _opening_mutex:
            _opening[0] -= 1
        time.sleep(0.001)
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                               check_same_thread=False, cached_statements=256,
                               factory=_Connection)
        conn.busy = 1
        conn.dead = False
        _open.add(conn)
        for pragma in PRAGMAS_CONNECTION:
            conn.execute(pragma)
        conn.busy = 1 if keep_busy else 0
    except sqlite3.Error as exc:
        raise storage_error(exc, path, "open the database", timeout) from exc
    finally:
        with _opening_mutex:
            _opening[0] -= 1
    return conn


class ConnectionOwner:
    """This process's connections to one database file, one per thread (a base of Store)."""

    path: str
    busy_timeout: float

    def __init__(self) -> None:
        self._local = threading.local()
        self._thread_busy_timeout: dict[int, float] = {}
        _owners.add(self)

    def _connect(self, keep_busy: bool = False) -> _Connection:
        timeout = self._thread_busy_timeout.get(threading.get_ident(), self.busy_timeout)
        return connect(self.path, timeout, keep_busy)

    def set_thread_busy_timeout(self, seconds: float) -> None:
        """How long this thread's connections (this one and any reopened later) wait for
        another connection's lock; the node's event loop sets 0 so it never waits."""
        self._thread_busy_timeout[threading.get_ident()] = seconds
        self.conn().execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    def conn(self) -> _Connection:
        """This thread's connection in this process (opened on first use)."""
        local = self._local
        conn: _Connection | None = getattr(local, "conn", None)
        if conn is None or local.gen != _fork_generation[0]:
            if conn is not None:
                _INHERITED.append(conn)
            conn = self._connect()
            local.conn = conn
            local.gen = _fork_generation[0]
        return conn

    def _lease(self) -> _Connection:
        """This thread's connection, marked busy; give it back with ``conn.busy -= 1``."""
        while True:
            conn = self.conn()
            conn.busy += 1
            if not conn.dead:
                return conn
            conn.busy -= 1  # the fork hook is closing it: drop it and open another
            self._local.conn = None

    def _read_one(self, sql: str, params: Sequence[Any] = (), doing: str = "read") -> Any:
        """One row of a read-only statement (the first row, or None)."""
        conn = self._lease()
        try:
            return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, doing, self.busy_timeout) from exc
        finally:
            conn.busy -= 1

    def _forget_connections(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            _INHERITED.append(conn)
            self._local.conn = None

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.gen == _fork_generation[0]:
            conn.busy += 1  # a fork in another thread waits for the PRAGMA (see _Connection)
            try:
                if not conn.dead:
                    conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            finally:
                conn.busy -= 1
            conn.close()
        self._local.conn = None
