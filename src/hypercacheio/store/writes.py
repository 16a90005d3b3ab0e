"""The write transaction: BEGIN IMMEDIATE, the change, a version, COMMIT, new L1 tokens.

``Store.transaction()`` returns a ``_Transaction``; its ``Txn`` is what the statements of
one write see and note (connection, time, version, changed keys). A failure rolls back and
leaves as a ``hypercacheio.errors`` storage error (``diagnose.storage_error``).
"""

from __future__ import annotations

import sqlite3
from types import TracebackType
from typing import TYPE_CHECKING

from . import upkeep
from .diagnose import storage_error

if TYPE_CHECKING:
    from .core import Store


class Txn:
    """One write transaction: its connection, time, version and what it changed.

    The version (``hlc``) is taken from the database clock on first use, inside the
    transaction: a lock grant or a purge that needs none leaves the clock as it is.
    """

    __slots__ = ("conn", "now", "changed", "everything", "inserted", "contributions",
                 "_store", "_hlc")

    def __init__(self, store: Store, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.changed: list[str] = []
        self.everything = False
        self.inserted = 0
        self.contributions: bool | None = None  # whether ``counters`` holds any (counters.py)
        self._store = store
        self._hlc = 0

    def _stamp(self) -> None:
        self._hlc = self._store._clock.next(self.now)  # under the write lock: see clock.py

    @property
    def hlc(self) -> int:
        """This transaction's version: unique and increasing in commit order."""
        if not self._hlc:
            self._stamp()
        return self._hlc

    @property
    def clustered(self) -> bool:
        """Whether the store is clustered now (tombstones and oplog rows)."""
        return self._store._clustered_now(self.conn)


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:  # SQLite rolled back already (a full disk, an I/O error)
        pass


class _Transaction:
    """The context manager of ``Store.transaction`` (a class: cheaper than a generator)."""

    __slots__ = ("store", "conn", "txn")

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Txn:
        store = self.store
        conn = self.conn = store._lease()  # busy until __exit__ gives it back
        try:
            conn.execute("BEGIN IMMEDIATE")
            txn = self.txn = Txn(store, conn, store.clock())
        except BaseException as exc:
            try:
                _rollback(conn)
            finally:
                conn.busy -= 1
            if isinstance(exc, sqlite3.Error):
                raise storage_error(exc, store.path, "start a write", store.busy_timeout) \
                    from exc
            raise
        return txn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn, store = self.conn, self.store
        try:
            if exc is not None:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise storage_error(exc, store.path, "write", store.busy_timeout) from exc
                return
            txn = self.txn
            try:
                if txn.inserted and store.max_entries is not None:
                    upkeep.enforce_max_entries(store, txn)
                slots = store._publish(txn.changed, txn.everything)  # before COMMIT too
                conn.execute("COMMIT")
                if txn._hlc and (txn.changed or txn.everything):  # a versioned change:
                    store._local.version = txn._hlc  # this thread's last (last_version)
            except BaseException as failure:
                _rollback(conn)
                if isinstance(failure, sqlite3.Error):
                    raise storage_error(failure, store.path, "write",
                                        store.busy_timeout) from failure
                raise
        finally:
            conn.busy -= 1
        store._finish(txn.changed, txn.everything, slots)
