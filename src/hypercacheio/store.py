"""The store (L2): one SQLite file in WAL mode per storage directory.

Schema, pragmas and statements are data at the top of this module. Every mutation goes
through ``Store.transaction``: BEGIN IMMEDIATE, the change, a version stamp, the oplog row
when clustered, COMMIT, then fresh L1 tokens for the changed keys (``Store._finish``). The
one shortcut, a single blind ``set`` of a standalone store, runs as one autocommit statement
(SQLite's own transaction) and then the same ``_finish``. Connections are per
process and thread; a forked child opens its own and never touches the inherited ones.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .codec import INT64_MAX, INT64_MIN, TAG_INT, TAG_TOMBSTONE, Payload, payload_size
from .errors import StorageError
from .l1 import TokenTable

log = logging.getLogger(__name__)

DB_NAME = "hypercacheio.sqlite"
TOKENS_NAME = "hypercacheio.l1"
INIT_LOCK_NAME = "hypercacheio.init.lock"
SCHEMA_VERSION = 1

# Applied once per database, under the init file lock (journal_mode is persistent).
PRAGMAS_DATABASE = ("PRAGMA journal_mode=WAL",)
# Applied on every connection.
PRAGMAS_CONNECTION = (
    "PRAGMA synchronous=NORMAL",
    "PRAGMA journal_size_limit=67108864",  # truncate the -wal file back to 64 MiB
    "PRAGMA wal_autocheckpoint=1000",
    "PRAGMA cache_size=-16384",  # 16 MiB page cache per connection
    "PRAGMA temp_store=MEMORY",
    "PRAGMA foreign_keys=OFF",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    key       TEXT PRIMARY KEY,
    tag       INTEGER NOT NULL,   -- codec tag; -1 marks a tombstone
    value,                        -- INTEGER, TEXT or BLOB by tag
    expire_at REAL,               -- wall-clock seconds; NULL never expires
    size      INTEGER NOT NULL,   -- bytes of key and value
    hlc       INTEGER NOT NULL,   -- hybrid logical clock of the last write
    node      TEXT NOT NULL       -- id of the node that wrote it
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_expire ON entries(expire_at) WHERE expire_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS locks (
    name        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expire_at   REAL,
    fence       INTEGER NOT NULL,
    acquired_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS oplog (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    op        TEXT NOT NULL,      -- set, delete, incr, touch, clear
    key       TEXT,
    tag       INTEGER,
    value,
    expire_at REAL,
    hlc       INTEGER NOT NULL,
    node      TEXT NOT NULL
);
"""

SQL_META_INIT = "INSERT OR IGNORE INTO meta(name, value) VALUES (?, ?)"
SQL_META_GET = "SELECT value FROM meta WHERE name = ?"
SQL_FENCE_NEXT = "UPDATE meta SET value = value + 1 WHERE name = 'fence' RETURNING value"
# lock grant in one statement: the next fence, only if the lock is free, expired or the owner's
SQL_FENCE_IF_FREE = (
    "UPDATE meta SET value = value + 1 WHERE name = 'fence' AND NOT EXISTS ("
    "SELECT 1 FROM locks WHERE name = ? AND owner != ? AND (expire_at IS NULL OR expire_at > ?)"
    ") RETURNING value"
)

SQL_GET = "SELECT tag, value, expire_at FROM entries WHERE key = ?"
SQL_GET_MANY = "SELECT key, tag, value, expire_at FROM entries WHERE key IN ({marks})"
SQL_PUT = ("INSERT OR REPLACE INTO entries(key, tag, value, expire_at, size, hlc, node) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")
# add: insert, or overwrite only a row that is expired or a tombstone
SQL_ADD = (
    "INSERT INTO entries(key, tag, value, expire_at, size, hlc, node) "
    "VALUES (:key, :tag, :value, :expire_at, :size, :hlc, :node) "
    "ON CONFLICT(key) DO UPDATE SET tag = excluded.tag, value = excluded.value, "
    "expire_at = excluded.expire_at, size = excluded.size, hlc = excluded.hlc, "
    "node = excluded.node "
    "WHERE entries.tag = -1 OR (entries.expire_at IS NOT NULL AND entries.expire_at <= :now)"
)
SQL_DELETE = "DELETE FROM entries WHERE key = ? AND tag != -1"
SQL_DELETE_LIVE_COUNT = ("DELETE FROM entries WHERE key = ? AND tag != -1 "
                         "AND (expire_at IS NULL OR expire_at > ?)")
SQL_TOMBSTONE = (
    "UPDATE entries SET tag = -1, value = NULL, expire_at = ?, size = 0, hlc = ?, node = ? "
    "WHERE key = ? AND tag != -1 RETURNING (expire_at)"
)
# incr: one statement; refuses (changes nothing) on a missing, expired, non-int or overflow
SQL_INCR = (
    "UPDATE entries SET value = value + :delta, hlc = :hlc, node = :node "
    "WHERE key = :key AND tag = 0 AND (expire_at IS NULL OR expire_at > :now) "
    "AND CASE WHEN :delta >= 0 THEN value <= :max - :delta ELSE value >= :min - :delta END "
    "RETURNING value"
)
SQL_TOUCH = ("UPDATE entries SET expire_at = ?, hlc = ?, node = ? "
             "WHERE key = ? AND tag != -1 AND (expire_at IS NULL OR expire_at > ?)")
SQL_CLEAR = "DELETE FROM entries"
SQL_COUNT_ALL = "SELECT COUNT(*) FROM entries"
SQL_COUNT_LIVE = ("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries "
                  "WHERE tag != -1 AND (expire_at IS NULL OR expire_at > ?)")
SQL_PURGE = ("DELETE FROM entries WHERE key IN (SELECT key FROM entries "
             "WHERE expire_at IS NOT NULL AND expire_at <= ? LIMIT ?) RETURNING key")
# oplog rows older than the tombstone window (by HLC): a peer that far behind resyncs in full
SQL_PURGE_OPLOG = ("DELETE FROM oplog WHERE seq IN (SELECT seq FROM oplog "
                   "WHERE hlc < ? ORDER BY seq LIMIT ?)")
SQL_COUNT_LOCKS = "SELECT COUNT(*) FROM locks WHERE expire_at IS NULL OR expire_at > ?"
SQL_PURGE_LOCKS = ("DELETE FROM locks WHERE name IN (SELECT name FROM locks "
                   "WHERE expire_at IS NOT NULL AND expire_at <= ? LIMIT ?)")
SQL_EVICT_OLDEST = ("DELETE FROM entries WHERE key IN (SELECT key FROM entries "
                    "ORDER BY hlc LIMIT ?) RETURNING key")
SQL_EVICT_ALL_BUT = "DELETE FROM entries WHERE key NOT IN ({marks}) RETURNING key"
SQL_PAGES = "SELECT (SELECT page_count FROM pragma_page_count) - " \
            "(SELECT freelist_count FROM pragma_freelist_count)"
SQL_OPLOG = ("INSERT INTO oplog(op, key, tag, value, expire_at, hlc, node) "
             "VALUES (?, ?, ?, ?, ?, ?, ?)")

SQL_LOCK_GET = "SELECT owner, expire_at, fence FROM locks WHERE name = ?"
SQL_LOCK_PUT = ("INSERT OR REPLACE INTO locks(name, owner, expire_at, fence, acquired_at) "
                "VALUES (?, ?, ?, ?, ?)")
SQL_LOCK_RELEASE = "DELETE FROM locks WHERE name = ? AND owner = ?"
SQL_LOCK_FORCE = "DELETE FROM locks WHERE name = ?"
SQL_LOCK_EXTEND = ("UPDATE locks SET expire_at = ? WHERE name = ? AND owner = ? "
                   "AND (expire_at IS NULL OR expire_at > ?)")

# File systems on which WAL's shared memory is unsafe (it needs one kernel).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "virtiofs",
    "fuse.sshfs", "sshfs", "fuse.s3fs", "fuse.gcsfuse", "glusterfs", "fuse.glusterfs",
    "ceph", "fuse.ceph", "lustre", "davfs", "fuse.davfs2", "vboxsf", "prl_fs", "vmhgfs",
    "fuse.vmhgfs-fuse", "fuse.rclone", "fuse.juicefs",
})

FORK_WAIT = 5.0  # seconds fork() waits for other threads to leave SQLite
GC_EVERY = 512  # writes of one process between two amortized collections
GC_BATCH = 256  # rows removed by one amortized collection
SIZE_CHECK_EVERY = 64  # writes between two checks of max_bytes
WAL_CHECKPOINT_BYTES = 16 << 20  # a larger -wal file gets a checkpoint from the collection
TOMBSTONE_SECONDS = 7 * 24 * 3600.0

Row = tuple[int, Any, "float | None"]  # (tag, payload, expire_at)

# Connections inherited through fork() are parked here and never used or closed: closing
# them in the child could release locks the parent holds on the same file.
_INHERITED: list[sqlite3.Connection] = []
_fork_generation = [0]
_stores: weakref.WeakSet[Store] = weakref.WeakSet()




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


_open: weakref.WeakSet[_Connection] = weakref.WeakSet()
_forking = [False]  # set by _before_fork: connections wait before they open
_opening = [0]  # connections being opened right now
_opening_mutex = threading.Lock()


def _before_fork() -> None:
    """Close this process's idle connections before fork(); each thread reopens on next use.

    SQLite keeps the lock state of every open file in process-wide tables. A child that
    inherits them believes it holds locks it does not; when the parent later closes its
    last connection it deletes the -wal file the child still writes into, and every write
    of the child after that is lost to other processes. Fresh connections opened in a
    child of a parent with no open connection share nothing.
    """
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
    for store in list(_stores):
        store._local = threading.local()


def _after_fork_in_parent() -> None:
    _forking[0] = False


def _after_fork_in_child() -> None:
    _forking[0] = False
    _fork_generation[0] += 1
    for store in list(_stores):
        store._forget_connections()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the file system holding ``path`` (Linux), or None if unknown."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, right.split()[0]
    return best_type


class HLC:
    """A hybrid logical clock: milliseconds << 16 | counter, monotonic in this process."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last = 0
        self._mutex = threading.Lock()

    def now(self) -> int:
        physical = int(self._clock() * 1000) << 16
        with self._mutex:
            self._last = physical if physical > self._last else self._last + 1
            return self._last

    def observe(self, remote: int) -> None:
        with self._mutex:
            if remote > self._last:
                self._last = remote


@dataclass
class Txn:
    """What one write transaction changed: keys to invalidate and oplog records."""

    conn: sqlite3.Connection
    hlc: int
    now: float
    changed: list[str] = field(default_factory=list)
    everything: bool = False
    inserted: int = 0



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
            txn = self.txn = Txn(conn, store.hlc.now(), store.clock())
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                conn.busy -= 1
            if isinstance(exc, sqlite3.OperationalError):
                raise StorageError(f"{store.path}: could not start a write within "
                                   f"{store.busy_timeout} s ({exc})") from exc
            raise
        return txn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn = self.conn
        try:
            if exc_type is not None:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return
            store, txn = self.store, self.txn
            try:
                if txn.inserted and store.max_entries is not None:
                    store._enforce_max_entries(txn)
                slots = store._publish(txn.changed, txn.everything)  # before COMMIT too
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.busy -= 1
        store._finish(txn.changed, txn.everything, slots)


class Store:
    """SQLite storage of (tag, payload, expiry) rows, locks and the oplog."""

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
    ) -> None:
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.path = os.path.join(self.directory, DB_NAME)
        self.busy_timeout = busy_timeout
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.cull_frequency = cull_frequency
        self.clustered = clustered
        self.clock = clock
        self.hlc = HLC(clock)
        self._local = threading.local()
        self._thread_busy_timeout: dict[int, float] = {}
        self._writes = 0
        self._page_size = 4096
        self._prepare_directory(allow_network_fs, mountinfo)
        self._initialize()
        self.tokens = TokenTable(os.path.join(self.directory, TOKENS_NAME))
        _stores.add(self)

    # ---- opening -------------------------------------------------------------------

    def _prepare_directory(self, allow_network_fs: bool, mountinfo: str) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            if os.path.exists(self.directory) and not os.path.isdir(self.directory):
                raise StorageError(f"the storage path {self.directory} exists and is not a "
                                   "directory; choose a directory path") from exc
            raise StorageError(
                f"cannot create the storage directory {self.directory}: {exc.strerror}; "
                "choose a writable directory (HYPERCACHEIO_SQLITE_PATH or directory=...)"
            ) from exc
        if not os.path.isdir(self.directory):
            raise StorageError(f"the storage path {self.directory} exists and is not a directory")
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StorageError(
                f"the storage directory {self.directory} is not writable by this user "
                f"(uid {os.getuid()}); fix its permissions or choose another directory"
            )
        fstype = filesystem_type(self.directory, mountinfo)
        if fstype in NETWORK_FILESYSTEMS and not allow_network_fs:
            raise StorageError(
                f"the storage directory {self.directory} is on a {fstype} file system; "
                "SQLite WAL needs local storage (its shared memory works within one kernel "
                "only) and would corrupt data here; use a local disk or tmpfs directory"
            )

    def _initialize(self) -> None:
        """Create the database once, safely when many processes start at the same moment."""
        lock_path = os.path.join(self.directory, INIT_LOCK_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            conn = self._connect(keep_busy=True)  # busy: a fork now waits for it
            try:
                for pragma in PRAGMAS_DATABASE:
                    mode = conn.execute(pragma).fetchone()
                    if mode and str(mode[0]).lower() != "wal":
                        raise StorageError(f"{self.path}: cannot switch to WAL mode ({mode[0]})")
                conn.executescript(SCHEMA)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(SQL_META_INIT, ("schema_version", SCHEMA_VERSION))
                conn.execute(SQL_META_INIT, ("node_id", uuid.uuid4().hex[:16]))
                conn.execute(SQL_META_INIT, ("fence", 0))
                conn.execute(SQL_META_INIT, ("created_at", self.clock()))
                conn.execute("COMMIT")
                version = conn.execute(SQL_META_GET, ("schema_version",)).fetchone()[0]
                if int(version) > SCHEMA_VERSION:
                    raise StorageError(
                        f"{self.path} has schema version {version}, newer than this "
                        f"hypercacheio understands ({SCHEMA_VERSION}); upgrade hypercacheio"
                    )
                self.node_id = str(conn.execute(SQL_META_GET, ("node_id",)).fetchone()[0])
                self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            except sqlite3.DatabaseError as exc:
                raise StorageError(
                    f"{self.path} cannot be used as a hypercacheio database ({exc}); "
                    "if it is corrupt or not a database, move it away and start again"
                ) from exc
            finally:
                conn.busy -= 1
                conn.close()
        finally:
            os.close(fd)

    def _connect(self, keep_busy: bool = False) -> _Connection:
        """A new connection with the per-connection pragmas (``busy`` left at 1 if asked)."""
        while True:  # the same handshake as busy/dead, with _before_fork (see _Connection)
            with _opening_mutex:  # connecting is rare: a lock makes the count exact anywhere
                _opening[0] += 1
            if not _forking[0]:
                break
            with _opening_mutex:
                _opening[0] -= 1
            time.sleep(0.001)
        timeout = self._thread_busy_timeout.get(threading.get_ident(), self.busy_timeout)
        try:
            conn = sqlite3.connect(self.path, timeout=timeout,
                                   isolation_level=None, check_same_thread=False,
                                   cached_statements=256, factory=_Connection)
            conn.busy = 1
            conn.dead = False
            _open.add(conn)
            for pragma in PRAGMAS_CONNECTION:
                conn.execute(pragma)
            conn.busy = 1 if keep_busy else 0
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"cannot open {self.path} ({exc}); check that the file is a hypercacheio "
                "database and that this user may read and write it"
            ) from exc
        finally:
            with _opening_mutex:
                _opening[0] -= 1
        return conn

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

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """One row of a read-only statement (the first row, or None)."""
        conn = self._lease()
        try:
            return conn.execute(sql, params).fetchone()
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
            self._collect_amortized()
        elif self.max_bytes is not None and self._writes % SIZE_CHECK_EVERY == 0:
            # The write is committed: a failure now must not look like a failed write (the
            # node would run it again), so it is logged as the amortized collection's is.
            try:
                self.enforce_max_bytes()
            except (sqlite3.Error, StorageError) as exc:
                log.warning("size check in %s failed: %s", self.directory, exc)

    def record(self, txn: Txn, op: str, key: str | None, tag: int | None = None,
               value: Any = None, expire_at: float | None = None) -> None:
        """Note a change: its key gets a new L1 token; clustered stores log it too."""
        if key is None:
            txn.everything = True
        else:
            txn.changed.append(key)
        if self.clustered:
            txn.conn.execute(SQL_OPLOG, (op, key, tag, value, expire_at, txn.hlc, self.node_id))

    # ---- reads ----------------------------------------------------------------------

    def get(self, key: str) -> Row | None:
        """The live row of a key, or None (missing, expired or deleted)."""
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
        finally:
            conn.busy -= 1
        if row is None or row[0] == TAG_TOMBSTONE:
            return None
        if row[2] is not None and row[2] <= self.clock():
            return None
        return row

    def get_many(self, keys: Sequence[str]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        now = self.clock()
        conn = self._lease()
        try:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                sql = SQL_GET_MANY.format(marks=",".join("?" * len(chunk)))
                for key, tag, value, expire_at in conn.execute(sql, chunk).fetchall():
                    if tag != TAG_TOMBSTONE and (expire_at is None or expire_at > now):
                        found[key] = (tag, value, expire_at)
        finally:
            conn.busy -= 1
        return found

    def node_meta(self, name: str) -> Any:
        row = self._read_one(SQL_META_GET, (name,))
        return None if row is None else row[0]

    # ---- writes ---------------------------------------------------------------------

    def set(self, key: str, tag: int, payload: Payload, expire_at: float | None) -> None:
        if self.clustered or self.max_entries is not None:
            with self.transaction() as txn:
                self._put(txn, key, tag, payload, expire_at)
            return
        size = len(key) + (len(payload) if type(payload) is bytes else payload_size(payload))
        self._write_one(SQL_PUT, (key, tag, payload, expire_at, size, self.hlc.now(),
                                  self.node_id), [key])

    def _write_one(self, sql: str, params: Sequence[Any], changed: list[str]) -> sqlite3.Cursor:
        """The one-statement door of the write path: autocommit, then ``_finish``.

        For a single write statement of a standalone store only (no oplog row to add): it is
        its own transaction, and a fresh write statement retries on busy as BEGIN IMMEDIATE
        does and reads nothing before, so no stale snapshot. It skips the BEGIN and COMMIT
        round trips (about 1.5 us, plus the transaction object, of a ~20 us write).
        """
        slots = self._publish(changed)  # before the write too: see _publish
        conn = self._lease()
        try:
            cur = conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise StorageError(f"{self.path}: could not write within "
                               f"{self.busy_timeout} s ({exc})") from exc
        finally:
            conn.busy -= 1
        self._finish(changed, False, slots)
        return cur

    def set_many(self, items: Iterable[tuple[str, int, Payload, float | None]]) -> None:
        with self.transaction() as txn:
            for key, tag, payload, expire_at in items:
                self._put(txn, key, tag, payload, expire_at)

    def _put(self, txn: Txn, key: str, tag: int, payload: Payload,
             expire_at: float | None) -> None:
        size = len(key) + payload_size(payload)
        txn.conn.execute(SQL_PUT, (key, tag, payload, expire_at, size, txn.hlc, self.node_id))
        txn.inserted += 1
        self.record(txn, "set", key, tag, payload, expire_at)

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
        with self.transaction() as txn:
            return sum(self._delete(txn, key) for key in keys)

    def _delete(self, txn: Txn, key: str) -> bool:
        row = txn.conn.execute(SQL_GET, (key,)).fetchone()
        if row is None or row[0] == TAG_TOMBSTONE:
            return False
        live = row[2] is None or row[2] > txn.now
        if self.clustered:  # keep a tombstone so that a late replica cannot resurrect it
            txn.conn.execute(SQL_TOMBSTONE,
                             (txn.now + TOMBSTONE_SECONDS, txn.hlc, self.node_id, key))
        else:
            txn.conn.execute(SQL_DELETE, (key,))
        self.record(txn, "delete", key)
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
        if not INT64_MIN <= delta <= INT64_MAX:
            raise OverflowError(f"delta {delta} is outside the 64-bit integer range")
        with self.transaction() as txn:
            row = txn.conn.execute(SQL_INCR, {
                "delta": delta, "hlc": txn.hlc, "node": self.node_id, "key": key,
                "now": txn.now, "max": INT64_MAX, "min": INT64_MIN,
            }).fetchone()
            if row is not None:
                self.record(txn, "incr", key, TAG_INT, delta)
                return int(row[0])
            current = txn.conn.execute(SQL_GET, (key,)).fetchone()
            if current is not None and current[0] != TAG_TOMBSTONE and (
                    current[2] is None or current[2] > txn.now):
                if current[0] != TAG_INT:
                    raise TypeError(f"cannot increment {key!r}: its value is not an integer")
                raise OverflowError(
                    f"incrementing {key!r} ({current[1]}) by {delta} leaves the 64-bit range")
            if not create:
                raise KeyError(key)
            self._put(txn, key, TAG_INT, delta, expire_if_new)
            return delta

    def touch(self, key: str, expire_at: float | None) -> bool:
        """Set a new expiry on a live key; True if the key was there."""
        with self.transaction() as txn:
            cur = txn.conn.execute(SQL_TOUCH, (expire_at, txn.hlc, self.node_id, key, txn.now))
            if cur.rowcount <= 0:
                return False
            self.record(txn, "touch", key, None, None, expire_at)
            return True

    def clear(self) -> int:
        """Remove every entry (locks stay); returns how many rows went."""
        with self.transaction() as txn:
            count = txn.conn.execute(SQL_CLEAR).rowcount
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
        # One conditional DELETE: atomic alone, and locks have no L1 token and no oplog row.
        return bool(self._write_one(SQL_LOCK_RELEASE, (name, owner), []).rowcount > 0)

    def lock_force_release(self, name: str) -> bool:
        with self.transaction() as txn:
            return bool(txn.conn.execute(SQL_LOCK_FORCE, (name,)).rowcount > 0)

    def lock_extend(self, name: str, owner: str, expire_at: float | None) -> bool:
        with self.transaction() as txn:
            cur = txn.conn.execute(SQL_LOCK_EXTEND, (expire_at, name, owner, txn.now))
            return bool(cur.rowcount > 0)

    def lock_info(self, name: str) -> tuple[str, float | None, int] | None:
        """(owner, expire_at, fence) of a held lock, or None if free or expired."""
        row = self._read_one(SQL_LOCK_GET, (name,))
        if row is None or (row[1] is not None and row[1] <= self.clock()):
            return None
        return row[0], row[1], int(row[2])

    # ---- collection and limits --------------------------------------------------------

    def purge_expired(self, limit: int | None = None) -> int:
        """Remove expired entries, tombstones past their window and expired locks."""
        removed = 0
        batch = GC_BATCH if limit is None else min(limit, GC_BATCH)
        while True:
            with self.transaction() as txn:
                keys = [r[0] for r in txn.conn.execute(SQL_PURGE, (txn.now, batch))]
                txn.conn.execute(SQL_PURGE_LOCKS, (txn.now, batch))
                trimmed = 0
                if self.clustered:  # the oplog keeps what a peer could still ask for
                    oldest = int((txn.now - TOMBSTONE_SECONDS) * 1000) << 16
                    trimmed = txn.conn.execute(SQL_PURGE_OPLOG, (oldest, batch)).rowcount
                txn.changed.extend(keys)
            removed += len(keys)
            # An unbounded round also takes the whole old oplog: one batch a round would
            # fall behind a store that writes more than a batch between two rounds.
            more_oplog = limit is None and trimmed >= batch
            if (len(keys) < batch and not more_oplog) or (limit is not None and removed >= limit):
                return removed

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        row = self._read_one(f"PRAGMA wal_checkpoint({mode})")
        return int(row[0]), int(row[1]), int(row[2])

    def _collect_amortized(self) -> None:
        try:
            self.purge_expired(limit=GC_BATCH)
            if self.max_bytes is not None:
                self.enforce_max_bytes()
            # SQLite checkpoints by itself (wal_autocheckpoint); a checkpoint here on every
            # round doubled the checkpoint work of a write-heavy process. Step in only when
            # the WAL has grown past what autocheckpoint keeps it to (readers held it back).
            if _file_size(self.path + "-wal") > WAL_CHECKPOINT_BYTES:
                self.checkpoint("PASSIVE")
        except (sqlite3.Error, StorageError) as exc:  # never fail the caller's write
            log.warning("background collection in %s failed: %s", self.directory, exc)

    def used_bytes(self) -> int:
        return int(self._read_one(SQL_PAGES)[0]) * self._page_size

    def enforce_max_bytes(self) -> int:
        """Evict (expired first, then oldest written) until under ``max_bytes``."""
        if self.max_bytes is None or self.used_bytes() <= self.max_bytes:
            return 0
        evicted = self.purge_expired()
        while self.used_bytes() > self.max_bytes * 0.9:
            with self.transaction() as txn:
                count = txn.conn.execute(SQL_COUNT_ALL).fetchone()[0]
                if count == 0:
                    break
                keys = [r[0] for r in txn.conn.execute(
                    SQL_EVICT_OLDEST, (max(1, count // 10),))]
                txn.changed.extend(keys)
            evicted += len(keys)
        return evicted

    def _enforce_max_entries(self, txn: Txn) -> None:
        """Django's culling rule: at ``max_entries`` rows, drop 1/cull_frequency of them
        (expired first, then the oldest written); cull_frequency 0 empties the store."""
        assert self.max_entries is not None
        count = txn.conn.execute(SQL_COUNT_ALL).fetchone()[0]
        if count <= self.max_entries:
            return
        keys = [r[0] for r in txn.conn.execute(SQL_PURGE, (txn.now, count))]
        txn.changed.extend(keys)
        count -= len(keys)
        if count <= self.max_entries:
            return
        # Django culls before it inserts; culling after, the row just written is spared.
        keep = txn.changed[-500:]
        if self.cull_frequency == 0:
            marks = ",".join("?" * len(keep))
            keys = [r[0] for r in txn.conn.execute(SQL_EVICT_ALL_BUT.format(marks=marks), keep)]
        else:
            keys = [r[0] for r in txn.conn.execute(
                SQL_EVICT_OLDEST, ((count - 1) // self.cull_frequency,))]
        txn.changed.extend(keys)

    # ---- introspection ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        entries, value_bytes = self._read_one(SQL_COUNT_LIVE, (self.clock(),))
        locks = self._read_one(SQL_COUNT_LOCKS, (self.clock(),))[0]
        return {
            "path": self.path,
            "node_id": self.node_id,
            "entries": int(entries),
            "locks": int(locks),
            "value_bytes": int(value_bytes),
            "db_bytes": _file_size(self.path),
            "wal_bytes": _file_size(self.path + "-wal"),
            "used_bytes": self.used_bytes(),
        }


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
