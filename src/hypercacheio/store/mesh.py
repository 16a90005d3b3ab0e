"""Active-active support of the store: the version vector, clock skew, the base values of
counters in snapshots, and the bucketed digests of anti-entropy
(``hypercacheio.replication.antientropy``).

Version vector (tables ``origins`` and ``origin_pending``): per origin, ``applied_seq`` is
the highest ``n`` such that every write 1..n of that origin has been applied here; writes
received out of order above it are kept in ``origin_pending`` until the gap fills. A record
whose ``origin_seq`` is at or below ``applied_seq``, or pending, is a duplicate: skipped.
This node's own row counts its own writes (``Store.record`` takes the next one).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..codec import TAG_INT
from ..replication.records import ApplyResult, CounterRow, Record, SnapshotRow
from . import counters
from .clock import wall_hlc
from .diagnose import storage_error
from .schema import SQL_OWN_SEQ
from .upkeep import TOMBSTONE_SECONDS

if TYPE_CHECKING:
    from .core import Store

log = logging.getLogger("hypercacheio.replication")

BUCKETS = 256
SKEW_LOG_EVERY = 60.0  # seconds between two warnings about one origin's clock

SQL_VECTOR = "SELECT origin, applied_seq FROM origins ORDER BY origin"
SQL_MARK_GET = "SELECT applied_seq FROM origins WHERE origin = ?"
SQL_MARK_PUT = ("INSERT INTO origins(origin, applied_seq) VALUES (?, ?) ON CONFLICT(origin) "
                "DO UPDATE SET applied_seq = max(applied_seq, excluded.applied_seq)")
SQL_PENDING = "SELECT seq FROM origin_pending WHERE origin = ?"
SQL_PENDING_DROP = "DELETE FROM origin_pending WHERE origin = ?"
SQL_PENDING_ADD = "INSERT OR IGNORE INTO origin_pending(origin, seq) VALUES (?, ?)"
# Anti-entropy sees an expired row as the tombstone it becomes when purged (upkeep: the
# same version, kept for the window from its expiry), so hosts that purge at different
# times agree; tombstones past their window are left out.
_EXPIRED = "(tag != -1 AND expire_at IS NOT NULL AND expire_at <= :now)"
_SEEN = ("expire_at IS NULL OR CASE WHEN tag = -1 THEN expire_at "
         "ELSE expire_at + :window END > :now")
SQL_DIGEST_ROWS = (f"SELECT key, CASE WHEN {_EXPIRED} THEN -1 ELSE tag END, hlc, node "
                   f"FROM entries WHERE {_SEEN}")
# contributions still counted or waiting (an older base than the row's is discarded)
SQL_DIGEST_COUNTERS = (
    "SELECT c.key, c.origin, c.base_hlc, c.base_node, c.total, c.origin_seq FROM counters c "
    "LEFT JOIN entries e ON e.key = c.key "
    "WHERE e.key IS NULL OR (c.base_hlc, c.base_node) >= (e.hlc, e.node)")
SQL_BUCKET_ROWS = (
    f"SELECT key, CASE WHEN {_EXPIRED} THEN -1 ELSE tag END, "
    f"CASE WHEN {_EXPIRED} THEN NULL ELSE value END, "
    f"CASE WHEN {_EXPIRED} THEN expire_at + :window ELSE expire_at END, hlc, node "
    f"FROM entries WHERE ({_SEEN}) AND hcio_bucket(key) IN ({{}})")
# a multi-writer snapshot's rows, with expired rows as the tombstones they become
SQL_SNAPSHOT_ROWS = (
    f"SELECT key, CASE WHEN {_EXPIRED} THEN -1 ELSE tag END, "
    f"CASE WHEN {_EXPIRED} THEN NULL ELSE value END, "
    f"CASE WHEN {_EXPIRED} THEN expire_at + :window ELSE expire_at END, hlc, node "
    f"FROM entries WHERE key > :after AND ({_SEEN}) ORDER BY key LIMIT :limit")
SQL_BUCKET_COUNTERS = ("SELECT key, origin, base_hlc, base_node, total, origin_seq, expire_at "
                       "FROM counters WHERE hcio_bucket(key) IN ({})")


# ---- the version vector -----------------------------------------------------------------

class Vector:
    """The version vector as one write transaction sees it (loaded per origin on use)."""

    __slots__ = ("conn", "own", "marks", "pending", "dirty")

    def __init__(self, conn: sqlite3.Connection, own: str) -> None:
        self.conn = conn
        self.own = own
        self.marks: dict[str, int] = {}
        self.pending: dict[str, set[int]] = {}
        self.dirty: set[str] = set()

    def _load(self, origin: str) -> None:
        if origin not in self.marks:
            sql = SQL_OWN_SEQ if origin == self.own else SQL_MARK_GET
            row = self.conn.execute(sql, (origin,)).fetchone()
            self.marks[origin] = int(row[0]) if row else 0
            self.pending[origin] = {int(s) for (s,) in self.conn.execute(SQL_PENDING, (origin,))}

    def seen(self, origin: str, seq: int) -> bool:
        """Whether the write ``seq`` of ``origin`` was applied here already."""
        self._load(origin)
        return seq <= self.marks[origin] or seq in self.pending[origin]

    def note(self, origin: str, seq: int) -> None:
        self._load(origin)
        self.pending[origin].add(seq)
        self.dirty.add(origin)

    def save(self) -> None:
        for origin in self.dirty:
            mark, pending = self.marks[origin], self.pending[origin]
            had = bool(self.conn.execute(SQL_PENDING + " LIMIT 1", (origin,)).fetchone())
            while mark + 1 in pending:
                mark += 1
                pending.discard(mark)
            pending = {s for s in pending if s > mark}
            self.conn.execute(SQL_MARK_PUT, (origin, mark))
            if had:
                self.conn.execute(SQL_PENDING_DROP, (origin,))
            if pending:
                self.conn.executemany(SQL_PENDING_ADD, [(origin, s) for s in pending])


def read_vector(conn: sqlite3.Connection, own: str) -> tuple[tuple[str, int], ...]:
    """The version vector, this node's own count included."""
    vector = {str(o): int(s) for o, s in conn.execute(SQL_VECTOR)}
    vector[own] = int(conn.execute(SQL_OWN_SEQ, (own,)).fetchone()[0])
    return tuple(sorted(vector.items()))


def merge_vector(conn: sqlite3.Connection, vector: Iterable[tuple[str, int]]) -> None:
    """Everything ``vector`` counts is applied here (a snapshot, an anti-entropy pass): each
    mark rises to it. This node's own count rises too: a store restored from an older copy
    must not hand out sequence numbers its peers have already seen."""
    for origin, seq in vector:
        conn.execute(SQL_MARK_PUT, (origin, seq))
        conn.execute("DELETE FROM origin_pending WHERE origin = ? AND seq <= ?", (origin, seq))


# ---- clock skew -------------------------------------------------------------------------

def check_skew(store: Store, batch: Sequence[Record], top: int) -> None:
    """Count (per origin) the records far ahead of this host's clock; warn once per origin
    a minute. They are applied all the same: every node must pick the same winner."""
    now = store.clock()
    bound = wall_hlc(now + store.max_clock_skew)
    if top <= bound:
        return
    for record in batch:
        if record.hlc > bound:
            origin = record.node
            store.skew_counts[origin] = store.skew_counts.get(origin, 0) + 1
            last = store._skew_logged.get(origin)
            if last is None or time.monotonic() - last >= SKEW_LOG_EVERY:
                store._skew_logged[origin] = time.monotonic()
                log.warning("%s: a replicated version is %.0f s ahead of this host's clock "
                            "(node %s); check the clocks of the hosts (bound %.0f s, logged "
                            "once a minute per node)", store.directory,
                            (record.hlc >> 16) / 1000 - now, _printable(origin),
                            store.max_clock_skew)


def _printable(node: str) -> str:
    return node if node.isprintable() and len(node) <= 64 else repr(node[:64])


# ---- rows that travel -------------------------------------------------------------------

def base_values(rows: list[SnapshotRow], contributions: Sequence[CounterRow]) -> list[SnapshotRow]:
    """The rows with each counter's value less the contributions on its base (which travel
    beside them): a receiver adds the contributions it holds, so none counts twice."""
    if not contributions:
        return rows
    sums: dict[tuple[str, int, str], int] = {}
    for c in contributions:
        slot = (c.key, c.base_hlc, c.base_node)
        sums[slot] = sums.get(slot, 0) + c.total
    out = []
    for row in rows:
        extra = sums.get((row.key, row.hlc, row.node)) if row.tag == TAG_INT else None
        out.append(row if extra is None else row._replace(value=int(row.value or 0) - extra))
    return out


# ---- anti-entropy -----------------------------------------------------------------------

def bucket_of(key: str) -> int:
    """A key's bucket: stable on every host and Python version."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS


def _fold(digests: list[int], bucket: int, data: bytes) -> None:
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    digests[bucket] = (digests[bucket] + h) & 0xFFFF_FFFF_FFFF_FFFF  # order does not matter


class Digest(NamedTuple):
    """A store's state in short: ``BUCKETS`` bucket digests, and the version vector and last
    clear read before them (in the same read), which the digests cover."""

    buckets: list[int]
    vector: tuple[tuple[str, int], ...]
    cleared: tuple[int, str]


def bucket_digests(store: Store, now: float | None = None) -> Digest:
    """``BUCKETS`` digests: each a sum of hashes of its rows' (key, tag, hlc, node) and its
    counters' contributions (origin, base, total, origin_seq); a row expired at ``now``
    counts as the tombstone it becomes, a tombstone past its window not at all."""
    from .replica import cleared

    moment = store.clock() if now is None else now
    digests = [0] * BUCKETS
    conn = store._lease()
    try:
        conn.execute("BEGIN")
        vector = read_vector(conn, store.node_id)
        floor = cleared(conn)
        for key, tag, hlc, node in conn.execute(SQL_DIGEST_ROWS, {
                "now": moment, "window": TOMBSTONE_SECONDS}):
            raw = key.encode("utf-8", "surrogatepass")
            _fold(digests, zlib.crc32(raw) % BUCKETS,
                  b"r%d\0%s\0%d\0%d\0%s" % (len(raw), raw, tag, hlc,
                                           node.encode("utf-8", "surrogatepass")))
        for key, origin, bhlc, bnode, total, seq in conn.execute(SQL_DIGEST_COUNTERS):
            raw = key.encode("utf-8", "surrogatepass")
            _fold(digests, zlib.crc32(raw) % BUCKETS,
                  b"c%d\0%s\0%s\0%d\0%s\0%d\0%d" % (
                      len(raw), raw, origin.encode(), bhlc, bnode.encode(), total, seq))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise storage_error(exc, store.path, "read the digests", store.busy_timeout) from exc
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.busy -= 1
    return Digest(digests, vector, floor)


def _bucket_sql(conn: sqlite3.Connection) -> None:
    conn.create_function("hcio_bucket", 1, bucket_of, deterministic=True)


def bucket_rows(store: Store, buckets: Iterable[int]) -> tuple[list[SnapshotRow], list[CounterRow]]:
    """The rows, tombstones and contributions of ``buckets`` (rows with their counters'
    base values): what the other side applies with ``apply_rows``."""
    wanted = sorted({int(b) for b in buckets})
    if any(not 0 <= b < BUCKETS for b in wanted):
        raise ValueError(f"buckets are 0..{BUCKETS - 1}")
    if not wanted:
        return [], []
    marks = ",".join(f":b{b}" for b in wanted)
    params: dict[str, float] = {f"b{b}": b for b in wanted}
    conn = store._lease()
    try:
        _bucket_sql(conn)
        conn.execute("BEGIN")  # one consistent read of rows and contributions
        try:
            rows = [SnapshotRow._make(r) for r in conn.execute(
                SQL_BUCKET_ROWS.format(marks),
                {**params, "now": store.clock(), "window": TOMBSTONE_SECONDS})]
            found = [CounterRow._make(r) for r in conn.execute(
                SQL_BUCKET_COUNTERS.format(marks), params)]
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise storage_error(exc, store.path, "read buckets", store.busy_timeout) from exc
    finally:
        conn.busy -= 1
    return base_values(rows, found), found


def apply_rows(store: Store, rows: Iterable[SnapshotRow], found: Iterable[CounterRow],
               source: Digest | None = None) -> ApplyResult:
    """Apply another store's rows (last writer wins) and contributions, in one transaction.
    ``source``, the other store's digest, taken before the rows were read, when they are
    every row of every bucket in which the two differed: its clear applies here, and its
    version vector merges into this one (everything it counts is here now)."""
    from .replica import SQL_APPLY_CLEAR, _observe, cleared, set_cleared
    from .snapshot import put_row

    applied = skipped = 0
    with store.transaction() as txn:
        if source is not None and set_cleared(txn, *source.cleared):
            txn.conn.execute(SQL_APPLY_CLEAR, source.cleared)
            txn.conn.execute(counters.SQL_CLEAR_OLDER, source.cleared)
            counters.after_clear(txn, source.cleared)
            txn.everything = True
        floor = cleared(txn.conn)
        top = 0
        for row in rows:
            top = max(top, row.hlc)
            if (row.hlc, row.node) > floor and put_row(txn, row):
                applied += 1
            else:
                skipped += 1
        for c in found:
            done = counters.apply_contribution(txn, c, floor)
            applied += done
            skipped += not done
        if source is not None:
            merge_vector(txn.conn, source.vector)
        if top:
            _observe(store, txn.conn, top)
    return ApplyResult(applied, skipped)
