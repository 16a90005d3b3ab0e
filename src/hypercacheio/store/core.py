"""The Store: opening a database, reads, and the one write path.

Every mutation goes through ``Store.transaction``: BEGIN IMMEDIATE, the change, a version
from the database clock (``clock.py``), the oplog row when the store is clustered, COMMIT,
then fresh L1 tokens for the changed keys (``Store._finish``). The one shortcut, a single
blind ``set``, is one autocommit statement that stamps its own version (SQLite's own
transaction; clustered, a trigger writes its oplog row in it) and then the same
``_finish``. Records and snapshots from another store (``Store.apply``,
``Store.apply_snapshot``: ``replica.py``, ``snapshot.py``) take the same transaction path.

The module runs a little over 500 lines because the ``Store`` methods are each a few lines
over the one write path, and reading them next to it is the point; schema, connections,
clock, upkeep and replication already live in their own modules.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..codec import INT64_MAX, INT64_MIN, TAG_INT, TAG_TOMBSTONE, Payload, payload_size
from ..errors import StorageCorruptError, StorageError
from ..l1 import TokenTable
from . import counters, replica, upkeep
from .clock import CLOCK_NAME, SQL_OBSERVE, SQL_PUT_LOGGED, SQL_PUT_STAMPED, DatabaseClock
from .connections import ConnectionOwner, _Connection, _fork_generation
from .diagnose import storage_error
from .fs import file_size, prepare_directory
from .opening import initialize
from .replica_methods import Replication
from .schema import (
    DB_NAME,
    SQL_ADD,
    SQL_CLEAR,
    SQL_COUNT_LIVE,
    SQL_COUNT_LOCKS,
    SQL_DELETE,
    SQL_FENCE_IF_FREE,
    SQL_GET,
    SQL_INCR,
    SQL_LOCK_EXTEND,
    SQL_LOCK_FORCE,
    SQL_LOCK_GET,
    SQL_LOCK_PUT,
    SQL_LOCK_RELEASE,
    SQL_META_GET,
    SQL_META_SET,
    SQL_OPLOG,
    SQL_OWN_SEQ,
    SQL_PAGES,
    SQL_PUT,
    SQL_TOMBSTONE,
    SQL_TOMBSTONE_PUT,
    SQL_TOUCH,
    SQL_TOUCH_ROW,
    TOKENS_NAME,
)
from .upkeep import GC_EVERY, SIZE_CHECK_EVERY, TOMBSTONE_SECONDS
from .writes import Txn, _Transaction

log = logging.getLogger("hypercacheio.store")

Row = tuple[int, Any, "float | None"]  # (tag, payload, expire_at)


class Store(Replication, ConnectionOwner):
    """SQLite storage of (tag, payload, expiry) rows, locks and the oplog.

    ``clustered=True`` marks the database clustered (see ``mark_clustered``); False, the
    default, leaves the database's flag as it is.
    """

    node_id: str  # this database's id (``meta``), stamped on every row it writes

    def __init__(
        self,
        directory: str,
        *,
        busy_timeout: float = 60.0,
        max_bytes: int | None = None,
        max_entries: int | None = None,
        cull_frequency: int = 3,
        clustered: bool = False,
        allow_network_fs: bool = False,
        clock: Callable[[], float] = time.time,
        mountinfo: str = "/proc/self/mountinfo",
        max_clock_skew: float = replica.SKEW_WARNING_SECONDS,
    ) -> None:
        super().__init__()
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.path = os.path.join(self.directory, DB_NAME)
        self.busy_timeout = busy_timeout
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.cull_frequency = cull_frequency
        self.clustered = False  # the database's flag as last read; every write refreshes it
        self.multi_writer = False  # likewise, the active-active flag (store/counters.py)
        # a replicated version this far ahead of the wall clock is counted and logged
        self.max_clock_skew = max_clock_skew
        self.skew_counts: dict[str, int] = {}  # per origin: records applied that far ahead
        self._skew_logged: dict[str, float] = {}
        self.clock = clock
        self._writes = 0
        self._page_size = 4096
        self._corrupt_reads = 0
        self._flag_generation = -1  # of the clock file when ``clustered`` was last read
        prepare_directory(self.directory, allow_network_fs, mountinfo)
        clock_path = os.path.join(self.directory, CLOCK_NAME)
        try:
            self._clock = DatabaseClock(clock_path)
        except OSError as exc:
            raise storage_error(exc, clock_path, "open the clock file", busy_timeout) from exc
        initialize(self, clustered)
        try:
            self.tokens = TokenTable(os.path.join(self.directory, TOKENS_NAME))
        except OSError as exc:
            raise storage_error(exc, os.path.join(self.directory, TOKENS_NAME),
                                "open the L1 token file", busy_timeout) from exc

    def _connect(self, keep_busy: bool = False) -> _Connection:
        conn = super()._connect(keep_busy)
        conn.create_function("hcio_hlc", 1, self._clock.stamping(self))
        return conn

    # ---- the one write path ----------------------------------------------------------

    def transaction(self) -> _Transaction:
        """BEGIN IMMEDIATE … COMMIT, then new L1 tokens for every changed key.

        Use as ``with store.transaction() as txn:``; an exception rolls everything back.
        """
        return _Transaction(self)

    def _publish(self, changed: list[str], everything: bool = False,
                 slots: list[int] | None = None) -> list[int] | None:
        """Fresh L1 tokens for the changed keys (every slot for ``everything``).

        Called after the COMMIT (a reader that saw the old token must refetch) and also
        just before it: a writer killed between its COMMIT and the second publish has
        then still invalidated every L1 entry that other processes filled before.
        The slots computed the first time are given back to spare the second the hashing.
        """
        if everything:
            self.tokens.publish_all()
        elif slots is not None:
            self.tokens.publish_slots(slots)
        elif changed:
            return self.tokens.publish(changed)
        return slots

    def _finish(self, changed: list[str], everything: bool = False,
                slots: list[int] | None = None) -> None:
        """After a COMMIT: publish the new tokens, then the amortized upkeep."""
        self._publish(changed, everything, slots)
        self._writes += 1
        if self._writes % GC_EVERY == 0:
            upkeep.collect_amortized(self)
        elif self.max_bytes is not None and self._writes % SIZE_CHECK_EVERY == 0:
            # The write is committed: a failure now must not look like a failed write (the
            # node would run it again), so it is logged as the amortized collection's is.
            try:
                upkeep.enforce_max_bytes(self)
            except StorageError as exc:
                log.warning("size check in %s failed: %s", self.directory, exc)

    def _write_one(self, sql: str, params: Sequence[Any], changed: list[str],
                   doing: str = "write") -> bool:
        """The one-statement door of the write path: autocommit, then ``_finish``; True if
        the statement changed a row (its triggers' changes count: ``total_changes``, since
        an insert into a view reports a rowcount of 0).

        For one write statement that needs no oplog row, or writes it itself (a trigger):
        it is its own transaction, and a fresh write statement retries on busy as BEGIN
        IMMEDIATE does and reads nothing before it, so it sees no stale snapshot.
        """
        slots = self._publish(changed)  # before the write too: see _publish
        conn = self._lease()
        try:
            before = conn.total_changes
            conn.execute(sql, params)
            wrote = conn.total_changes != before
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, doing, self.busy_timeout) from exc
        finally:
            conn.busy -= 1
        self._finish(changed, False, slots)
        return wrote

    def record(self, txn: Txn, op: str, key: str | None, tag: int | None = None,
               value: Any = None, expire_at: float | None = None,
               delta: int | None = None, base: tuple[int, str] | None = None,
               total: int | None = None) -> int:
        """Note a change: its key gets a new L1 token; clustered stores log it too (what
        each op's oplog row holds: ``hypercacheio.replication.records``) with this node's
        next own sequence number, which is returned (0 when not clustered)."""
        if key is None:
            txn.everything = True
        else:
            txn.changed.append(key)
        if not txn.clustered:
            return 0
        conn = txn.conn
        seq = int(conn.execute(SQL_OWN_SEQ, (self.node_id,)).fetchone()[0]) + 1
        conn.execute(SQL_OPLOG, (op, key, tag, value, expire_at, txn.hlc, self.node_id, delta,
                                 seq, None if base is None else base[0],
                                 None if base is None else base[1], total))
        return seq

    # ---- the clock and the clustered flag --------------------------------------------

    def last_version(self) -> int:
        """The version of the last write this thread committed to this store (0: none yet).

        Kept per thread (a ``threading.local``): a node's handler runs a write and reads
        this in the same thread to tell a secondary the version its primary gave the write
        (read-your-writes: ``hypercacheio.replication.forward``). A write that changed
        nothing (an ``add`` of a live key, a ``delete`` of a missing one) takes no version
        and leaves it as it was; records applied from another store keep their own.
        """
        version: int = getattr(self._local, "version", 0)
        return version

    def last_hlc(self) -> int:
        """The last version this database handed out (or observed from a peer)."""
        return self._clock.last()

    def local_stamps(self) -> int:
        """How many versions this database handed out to its own writes (any process's;
        a version observed from a peer does not count): what a node shipping this store's
        writes watches, one word of a shared map."""
        return self._clock.stamps()

    def observe(self, remote_hlc: int) -> None:
        """Move the database clock to a peer's version if it is ahead: later writes stamp
        beyond it."""
        with self.transaction() as txn:
            self._clock.observe(remote_hlc)
            txn.conn.execute(SQL_OBSERVE, (remote_hlc, remote_hlc))  # survives a reboot

    def mark_clustered(self, clustered: bool = True, *, multi_writer: bool | None = None) -> None:
        """Record in the database whether it is clustered: every process writing it then
        keeps tombstones and oplog rows (or stops, with False). ``multi_writer=True`` marks
        it active-active (increments replicate as contributions: ``store/counters.py``);
        None leaves that flag as it is."""
        with self.transaction() as txn:
            txn.conn.execute(SQL_META_SET, (int(clustered), "clustered"))
            if multi_writer is not None:
                txn.conn.execute(SQL_META_SET, (int(multi_writer), "multi_writer"))
            self._clock.bump_generation()  # under the write lock: others read the flag again
        self.clustered = clustered
        if multi_writer is not None:
            self.multi_writer = multi_writer

    def _clustered_now(self, conn: sqlite3.Connection) -> bool:
        """Inside a write transaction: the database's flag (read again only if it changed)."""
        generation = self._clock.generation
        if generation != self._flag_generation:
            row = conn.execute(SQL_META_GET, ("clustered",)).fetchone()
            self.clustered = bool(row and row[0])
            row = conn.execute(SQL_META_GET, ("multi_writer",)).fetchone()
            self.multi_writer = bool(row and row[0])
            self._flag_generation = generation
        return self.clustered

    # ---- reads ----------------------------------------------------------------------

    def get(self, key: str) -> Row | None:
        """The live row of a key, or None (missing, expired, deleted, or a damaged page)."""
        local = self._local  # _lease() inlined: this is the L2 read path
        try:
            conn = local.conn
            if conn is None or local.gen != _fork_generation[0]:
                conn = self.conn()
        except AttributeError:  # this thread's first use
            conn = self.conn()
        conn.busy += 1
        if conn.dead:
            conn.busy -= 1
            conn = self._lease()
        try:
            row: Row | None = conn.execute(SQL_GET, (key,)).fetchone()
        except sqlite3.Error as exc:
            error = storage_error(exc, self.path, "read", self.busy_timeout)
            if not isinstance(error, StorageCorruptError):
                raise error from exc
            self._corrupt_read(error)
            return None
        finally:
            conn.busy -= 1
        if row is None or row[0] == TAG_TOMBSTONE:
            return None
        if row[2] is not None and row[2] <= self.clock():
            return None
        return row

    def _corrupt_read(self, error: StorageCorruptError) -> None:
        """A read of a damaged page is a miss (this is a cache); the first one is logged."""
        self._corrupt_reads += 1
        if self._corrupt_reads == 1:
            log.error("%s (reads of damaged pages count as misses from now on)", error)

    def node_meta(self, name: str) -> Any:
        """A value of the ``meta`` table (schema_version, node_id, ...), or None."""
        row = self._read_one(SQL_META_GET, (name,))
        return None if row is None else row[0]

    # ---- writes ---------------------------------------------------------------------

    def set(self, key: str, tag: int, payload: Payload, expire_at: float | None) -> None:
        """Store a row (replacing any).

        One autocommit statement that stamps its own version: the plain row
        (``SQL_PUT_STAMPED``) or, clustered, the row and its oplog row through the view
        ``logged_put`` (``SQL_PUT_LOGGED``; the trigger writes what ``record`` would). Each
        writes nothing when the store's flag is not what this process last read; the
        transaction path then reads the flag again and does the write. ``max_entries``
        culls inside a transaction: the transaction path.
        """
        if self.max_entries is None:
            size = len(key) + (len(payload) if type(payload) is bytes else payload_size(payload))
            if self._write_one(SQL_PUT_LOGGED if self.clustered else SQL_PUT_STAMPED,
                               (key, tag, payload, expire_at, size,
                                int(self.clock() * 1000) << 16, self.node_id), [key]):
                return
            self._flag_generation = -1  # marked (or unmarked) clustered since
        with self.transaction() as txn:
            self._put(txn, key, tag, payload, expire_at)

    def set_many(self, items: Iterable[tuple[str, int, Payload, float | None]]) -> None:
        """Store several rows in one transaction (of a key given twice, the last)."""
        # One row per key: the rows of a transaction share its version, and a replica
        # could not tell which of two same-version rows of a key came last.
        rows = {key: (tag, payload, expire_at) for key, tag, payload, expire_at in items}
        with self.transaction() as txn:
            for key, (tag, payload, expire_at) in rows.items():
                self._put(txn, key, tag, payload, expire_at)

    def _put(self, txn: Txn, key: str, tag: int, payload: Payload,
             expire_at: float | None, op: str = "set", delta: int | None = None) -> None:
        size = len(key) + payload_size(payload)
        txn.conn.execute(SQL_PUT, (key, tag, payload, expire_at, size, txn.hlc, self.node_id))
        txn.inserted += 1
        self.record(txn, op, key, tag, payload, expire_at, delta)

    def add(self, key: str, tag: int, payload: Payload, expire_at: float | None) -> bool:
        """Store only if the key is missing or expired; True if stored."""
        with self.transaction() as txn:
            cur = txn.conn.execute(SQL_ADD, {
                "key": key, "tag": tag, "value": payload, "expire_at": expire_at,
                "size": len(key) + payload_size(payload), "hlc": txn.hlc,
                "node": self.node_id, "now": txn.now,
            })
            if cur.rowcount <= 0:
                return False
            txn.inserted += 1
            self.record(txn, "set", key, tag, payload, expire_at)
            return True

    def delete(self, key: str) -> bool:
        """Remove a key; True if a live value was removed."""
        with self.transaction() as txn:
            return self._delete(txn, key)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove several keys in one transaction; how many live values went."""
        with self.transaction() as txn:
            return sum(self._delete(txn, key) for key in keys)

    def _delete(self, txn: Txn, key: str) -> bool:
        row = txn.conn.execute(SQL_GET, (key,)).fetchone()
        if row is None or row[0] == TAG_TOMBSTONE:
            if txn.clustered and self.multi_writer:
                # active-active: a value a peer wrote before this delete may still be on
                # its way; the delete is a write of its own (a newer tombstone), or it
                # would lose to that older value (found by tests/cluster, aa kill-restart)
                txn.conn.execute(SQL_TOMBSTONE_PUT, (key, txn.now + TOMBSTONE_SECONDS,
                                                     txn.hlc, self.node_id))
                self.record(txn, "delete", key, None, None, txn.now + TOMBSTONE_SECONDS)
            return False
        live = row[2] is None or row[2] > txn.now
        until = txn.now + TOMBSTONE_SECONDS
        if txn.clustered:  # keep a tombstone so that a late replica cannot resurrect it
            txn.conn.execute(SQL_TOMBSTONE, (until, txn.hlc, self.node_id, key))
        else:
            txn.conn.execute(SQL_DELETE, (key,))
        self.record(txn, "delete", key, None, None, until)
        return live

    def pull(self, key: str) -> Row | None:
        """Read and delete a key in one transaction."""
        with self.transaction() as txn:
            row = txn.conn.execute(SQL_GET, (key,)).fetchone()
            if row is None or row[0] == TAG_TOMBSTONE:
                return None
            self._delete(txn, key)
            if row[2] is not None and row[2] <= txn.now:
                return None
            return row

    def incr(self, key: str, delta: int, expire_if_new: float | None, *,
             create: bool = True) -> int:
        """Add ``delta`` atomically; a missing key starts from 0 (KeyError if not ``create``).

        Raises TypeError for a non-integer value and OverflowError past int64.
        """
        return self.incr_row(key, delta, expire_if_new, create=create)[0]

    def incr_row(self, key: str, delta: int, expire_if_new: float | None, *,
                 create: bool = True) -> tuple[int, float | None]:
        """``incr``, answering the counter's row: (new value, its expiry)."""
        if not INT64_MIN <= delta <= INT64_MAX:
            raise OverflowError(f"delta {delta} is outside the 64-bit integer range")
        with self.transaction() as txn:
            if txn.clustered and self.multi_writer:
                return counters.local_incr(self, txn, key, delta, expire_if_new, create)
            row = txn.conn.execute(SQL_INCR, {
                "delta": delta, "hlc": txn.hlc, "node": self.node_id, "key": key,
                "now": txn.now, "max": INT64_MAX, "min": INT64_MIN,
            }).fetchone()
            if row is not None:  # the oplog row holds the result too (see records.py)
                self.record(txn, "incr", key, TAG_INT, row[0], row[1], delta)
                return int(row[0]), row[1]
            current = txn.conn.execute(SQL_GET, (key,)).fetchone()
            if current is not None and current[0] != TAG_TOMBSTONE and (
                    current[2] is None or current[2] > txn.now):
                if current[0] != TAG_INT:
                    raise TypeError(f"cannot increment {key!r}: its value is not an integer")
                raise OverflowError(
                    f"incrementing {key!r} ({current[1]}) by {delta} leaves the 64-bit range")
            if not create:
                raise KeyError(key)
            self._put(txn, key, TAG_INT, delta, expire_if_new, "incr", delta)
            return delta, expire_if_new

    def touch(self, key: str, expire_at: float | None) -> bool:
        """Set a new expiry on a live key; True if the key was there."""
        with self.transaction() as txn:
            if txn.clustered and self.multi_writer:
                return self._touch_row(txn, key, expire_at) is not None
            cur = txn.conn.execute(SQL_TOUCH, (expire_at, txn.hlc, self.node_id, key, txn.now))
            if cur.rowcount <= 0:
                return False
            self.record(txn, "touch", key, None, None, expire_at)
            return True

    def touch_row(self, key: str, expire_at: float | None) -> Row | None:
        """``touch``, answering the touched row (tag, value, new expiry), or None if the key
        was missing: what a secondary applies as the touch's whole result, since a touch
        alone could land on an older copy of the value there."""
        with self.transaction() as txn:
            return self._touch_row(txn, key, expire_at)

    def _touch_row(self, txn: Txn, key: str, expire_at: float | None) -> Row | None:
        row: Row | None = txn.conn.execute(SQL_TOUCH_ROW, (
            expire_at, txn.hlc, self.node_id, key, txn.now)).fetchone()
        if row is None:
            return None
        if txn.clustered and self.multi_writer:
            # the touched row whole: it starts a new counter base (store/counters.py)
            self.record(txn, "set", key, row[0], row[1], expire_at)
        else:
            self.record(txn, "touch", key, None, None, expire_at)
        return row

    def clear(self) -> int:
        """Remove every entry (locks stay); returns how many rows went."""
        with self.transaction() as txn:
            count = txn.conn.execute(SQL_CLEAR).rowcount
            replica.set_cleared(txn, txn.hlc, self.node_id)  # no older write comes back
            if txn.clustered:  # a contribution waiting for a newer base stays
                txn.conn.execute(counters.SQL_CLEAR_OLDER, (txn.hlc, self.node_id))
            self.record(txn, "clear", None)
            return int(count)

    # ---- locks ----------------------------------------------------------------------

    def lock_acquire(self, name: str, owner: str, expire_at: float | None) -> int | None:
        """Grant the lock to ``owner`` if free, expired or already theirs: the fence, or None."""
        with self.transaction() as txn:
            row = txn.conn.execute(SQL_FENCE_IF_FREE, (name, owner, txn.now)).fetchone()
            if row is None:  # held by another owner, not expired
                return None
            fence = int(row[0])
            txn.conn.execute(SQL_LOCK_PUT, (name, owner, expire_at, fence, txn.now))
            return fence

    def lock_release(self, name: str, owner: str) -> bool:
        """Release the lock if ``owner`` holds it; True if released."""
        # One conditional DELETE: atomic alone, and locks have no L1 token and no oplog row.
        return self._write_one(SQL_LOCK_RELEASE, (name, owner), [], "release a lock")

    def lock_force_release(self, name: str) -> bool:
        """Release the lock whoever holds it; True if it was held."""
        with self.transaction() as txn:
            return bool(txn.conn.execute(SQL_LOCK_FORCE, (name,)).rowcount > 0)

    def lock_extend(self, name: str, owner: str, expire_at: float | None) -> bool:
        """Give ``owner``'s live lock a new expiry; False if they no longer hold it."""
        with self.transaction() as txn:
            cur = txn.conn.execute(SQL_LOCK_EXTEND, (expire_at, name, owner, txn.now))
            return bool(cur.rowcount > 0)

    def lock_info(self, name: str) -> tuple[str, float | None, int] | None:
        """(owner, expire_at, fence) of a held lock, or None if free or expired."""
        row = self._read_one(SQL_LOCK_GET, (name,))
        if row is None or (row[1] is not None and row[1] <= self.clock()):
            return None
        return row[0], row[1], int(row[2])

    # ---- upkeep and introspection -----------------------------------------------------

    def purge_expired(self, limit: int | None = None) -> int:
        """Remove expired entries, tombstones past their window and expired locks."""
        return upkeep.purge_expired(self, limit)

    def enforce_max_bytes(self) -> int:
        """Evict (expired first, then oldest written) until under ``max_bytes``."""
        return upkeep.enforce_max_bytes(self)

    def defer_checkpoints(self) -> None:
        """This thread's commits no longer checkpoint the WAL (``wal_autocheckpoint=0``):
        for a thread whose commits must stay short, when another one runs ``checkpoint``."""
        conn = self._lease()
        try:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        finally:
            conn.busy -= 1

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Run a WAL checkpoint: (busy, log frames, checkpointed frames)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        row = self._read_one(f"PRAGMA wal_checkpoint({mode})", (), "checkpoint")
        return int(row[0]), int(row[1]), int(row[2])

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (free pages left out)."""
        return int(self._read_one(SQL_PAGES)[0]) * self._page_size

    def stats(self) -> dict[str, Any]:
        """Counts and sizes: entries, locks, value bytes, file sizes."""
        entries, value_bytes = self._read_one(SQL_COUNT_LIVE, (self.clock(),))
        locks = self._read_one(SQL_COUNT_LOCKS, (self.clock(),))[0]
        return {
            "path": self.path,
            "node_id": self.node_id,
            "entries": int(entries),
            "locks": int(locks),
            "value_bytes": int(value_bytes),
            "db_bytes": file_size(self.path),
            "wal_bytes": file_size(self.path + "-wal"),
            "used_bytes": self.used_bytes(),
        }


__all__ = ["Row", "Store", "Txn", "_Connection"]
