"""The store's side of replication: reading its oplog, applying another store's records,
replication positions, and a digest of the live rows. Snapshots are in ``snapshot.py``; the
methods ``Store`` offers for all of it are in ``replica_methods.py``.

Everything that changes rows runs in ``Store.transaction`` (the one write path: BEGIN
IMMEDIATE, COMMIT, new L1 tokens for the changed keys). What each op means is in
``hypercacheio.replication.records``.

Ordering: last writer wins on the version ``(hlc, node)``, compared as a pair in SQL
(``(entries.hlc, entries.node) < (?, ?)``). A record at or below a row's version, or at or
below the store's last clear (``meta`` ``cleared_hlc``/``cleared_node``), is skipped, so a
batch applied twice, replayed later, or reordered changes nothing more.

Active-active (a store marked ``multi_writer``): records also carry their origin's own
sequence number; a record already counted in the store's version vector is skipped (see
``mesh.py``), and increments carry counter contributions (``counters.py``).

Trimming (``upkeep.purge_expired``): an oplog row goes once it is older than the tombstone
window, or once every peer registered in ``peers`` for this database has acknowledged it.
In a clustered store a tombstone past its window also stays until every registered peer
has acknowledged the oplog up to its version (``upkeep.tombstone_bound``).
A peer that has not acknowledged a row keeps it for at most the window; after that its
position is older than the oldest row kept and it needs a snapshot (``Store.can_resume``).
Tombstones live for the window (their ``expire_at``), the longest a peer can be away and
still catch up from the oplog; a peer away longer takes a snapshot, which replaces each key
range it covers (``apply_snapshot``, in ``snapshot.py``), so no tombstone is needed to forget
a deleted key.
A node should register each configured peer (``peer_ack(peer, 0)``) before it first
connects, so that the oplog waits for it.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..codec import TAG_INT, TAG_TOMBSTONE, TAGS, payload_size
from ..errors import ReplicationError
from ..replication.records import (
    CLEAR,
    DELETE,
    INCR,
    SET,
    TOUCH,
    ApplyResult,
    CounterRow,
    OplogBounds,
    PeerPosition,
    Record,
)
from . import counters, mesh
from .clock import SQL_OBSERVE
from .diagnose import storage_error
from .schema import OPLOG_FLOOR, SQL_META_GET, SQL_META_SET, SQL_OPLOG
from .upkeep import TOMBSTONE_SECONDS

if TYPE_CHECKING:
    from .core import Store, Txn

# (a floor row is no write: schema.OPLOG_FLOOR)
SQL_OPLOG_SINCE = ("SELECT seq, op, key, tag, value, expire_at, hlc, node, delta, "
                   "COALESCE(origin_seq, 0), base_hlc, base_node, total FROM oplog "
                   f"WHERE seq > ? AND op != '{OPLOG_FLOOR}' ORDER BY seq LIMIT ?")
# the last seq ever written: the trims keep the newest row (schema.OPLOG_FLOOR)
_LAST = "COALESCE((SELECT max(seq) FROM oplog), 0)"
SQL_OPLOG_LAST = f"SELECT {_LAST}"
SQL_OPLOG_BOUNDS = (f"SELECT (SELECT seq FROM oplog WHERE op != '{OPLOG_FLOOR}' ORDER BY seq "
                    f"LIMIT 1), {_LAST}")
# A row from another store, if newer than the one here (a tombstone: tag -1, value NULL).
SQL_APPLY_PUT = (
    "INSERT INTO entries(key, tag, value, expire_at, size, hlc, node) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET tag = excluded.tag, value = excluded.value, "
    "expire_at = excluded.expire_at, size = excluded.size, hlc = excluded.hlc, "
    "node = excluded.node WHERE (entries.hlc, entries.node) < (excluded.hlc, excluded.node)"
)
SQL_APPLY_TOUCH = ("UPDATE entries SET expire_at = ?, hlc = ?, node = ? "
                   "WHERE key = ? AND tag != -1 AND (hlc, node) < (?, ?)")
SQL_APPLY_CLEAR = "DELETE FROM entries WHERE (hlc, node) < (?, ?)"
SQL_LIVE = ("SELECT key, tag, value, expire_at, hlc, node FROM entries "
            "WHERE tag != -1 AND (expire_at IS NULL OR expire_at > ?) ORDER BY key")
# an acknowledgement moves a position forward only (acks may arrive out of order), unless
# it counts in another database's oplog (the source was recreated: a new count)
SQL_PEER_ACK = (
    "INSERT INTO peers(peer, acked, source, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(peer) DO UPDATE SET acked = CASE WHEN peers.source = excluded.source "
    "THEN max(peers.acked, excluded.acked) ELSE excluded.acked END, "
    "source = excluded.source, updated_at = excluded.updated_at"
)
SQL_PEER_SET = "INSERT OR REPLACE INTO peers(peer, acked, source, updated_at) VALUES (?, ?, ?, ?)"
SQL_PEERS = "SELECT peer, acked, source, updated_at FROM peers ORDER BY peer"
SQL_PEER_GET = "SELECT peer, acked, source, updated_at FROM peers WHERE peer = ?"
SQL_PEER_FORGET = "DELETE FROM peers WHERE peer = ?"

_NO_KEY = ""  # below every key (keys are non-empty)
SKEW_WARNING_SECONDS = 60.0  # a version this far ahead of the wall clock is logged

log = logging.getLogger("hypercacheio.replication")


# ---- the version of the last clear ----------------------------------------------------------

def cleared(conn: sqlite3.Connection) -> tuple[int, str]:
    """The version of the store's last clear ((0, "") if never)."""
    hlc = conn.execute(SQL_META_GET, ("cleared_hlc",)).fetchone()
    node = conn.execute(SQL_META_GET, ("cleared_node",)).fetchone()
    return (int(hlc[0]) if hlc else 0), (str(node[0]) if node else "")


def set_cleared(txn: Txn, hlc: int, node: str) -> bool:
    """Record a clear's version if newer than the last one; True if it was."""
    if (hlc, node) <= cleared(txn.conn):
        return False
    txn.conn.execute(SQL_META_SET, (hlc, "cleared_hlc"))
    txn.conn.execute(SQL_META_SET, (node, "cleared_node"))
    return True


# ---- reading the oplog -----------------------------------------------------------------------

def oplog_since(store: Store, seq: int, limit: int) -> list[Record]:
    """The oplog rows after ``seq``, oldest first, at most ``limit``."""
    conn = store._lease()
    try:
        return [Record._make(row) for row in conn.execute(SQL_OPLOG_SINCE, (seq, limit))]
    except sqlite3.Error as exc:
        raise storage_error(exc, store.path, "read the oplog", store.busy_timeout) from exc
    finally:
        conn.busy -= 1


def oplog_bounds(store: Store) -> OplogBounds:
    oldest, last = store._read_one(SQL_OPLOG_BOUNDS, (), "read the oplog")
    last = int(last)
    return OplogBounds(last + 1 if oldest is None else int(oldest), last)


def can_resume(store: Store, acked: int) -> bool:
    """Whether a peer at ``acked`` (in this database's oplog) can catch up from the oplog."""
    bounds = oplog_bounds(store)
    return bounds.oldest - 1 <= acked <= bounds.last


# ---- applying records ----------------------------------------------------------------------

def _version(record: Record) -> tuple[int, str]:
    return record.hlc, record.node


def apply(store: Store, records: Iterable[Record], *, relay: bool = False,
          ack: tuple[str, str] | None = None) -> ApplyResult:
    """Apply another store's records in one transaction (see the module's notes).

    ``relay`` also writes each applied record to this store's oplog (with its origin's
    version), for a node that passes records on; by default applied records are not
    logged again (no echo). ``ack=(peer, source)`` records the highest ``seq`` of the batch
    as the position applied from ``peer`` (database id ``source``) in the same transaction.
    An unknown op raises ``ReplicationError`` and applies nothing.
    """
    batch = sorted(records, key=_version)  # a touch comes after the write it follows
    for record in batch:
        _check(record)
    if not batch:
        return ApplyResult(0, 0)
    top = max(record.hlc for record in batch)
    mesh.check_skew(store, batch, top)
    applied = skipped = 0
    with store.transaction() as txn:
        conn = txn.conn
        floor = cleared(conn)
        changed = txn.changed
        # active-active only: a primary/secondary stream is ordered by its own positions
        vector = mesh.Vector(conn, store.node_id) if txn.clustered and store.multi_writer \
            else None
        for record in batch:
            op, key, hlc, node = record.op, record.key, record.hlc, record.node
            if record.origin_seq and vector is not None:
                if vector.seen(node, record.origin_seq):
                    skipped += 1  # a duplicate or a replay: applied here already
                    continue
                vector.note(node, record.origin_seq)
            if (hlc, node) <= floor:
                skipped += 1
                continue
            if op == INCR and record.total is not None:  # active-active: a contribution
                assert key is not None and record.base_hlc is not None  # _check
                counted = counters.apply_contribution(txn, CounterRow(
                    key, node, record.base_hlc, record.base_node or "", record.total,
                    record.origin_seq, record.expire_at), floor)
                if counted and relay:
                    _relay(conn, record)
                applied += counted
                skipped += not counted
                continue
            if op in (SET, INCR):
                # incr: primary/secondary ships the resulting value (a set with its version)
                value = record.value
                assert key is not None and record.tag is not None and value is not None  # _check
                done = conn.execute(SQL_APPLY_PUT, (
                    key, record.tag, value, record.expire_at,
                    len(key) + payload_size(value), hlc, node)).rowcount
                txn.inserted += done
                if done > 0 and record.tag == TAG_INT:
                    counters.after_write(txn, key, TAG_INT, value, record.expire_at,
                                         (hlc, node))
            elif op == DELETE:
                until = record.expire_at
                if until is None:
                    until = txn.now + TOMBSTONE_SECONDS
                done = conn.execute(SQL_APPLY_PUT, (
                    key, TAG_TOMBSTONE, None, until, 0, hlc, node)).rowcount
                if done > 0:
                    assert key is not None  # _check
                    counters.after_write(txn, key, TAG_TOMBSTONE, None, until, (hlc, node))
            elif op == TOUCH:
                done = conn.execute(SQL_APPLY_TOUCH, (
                    record.expire_at, hlc, node, key, hlc, node)).rowcount
            else:  # CLEAR
                conn.execute(SQL_APPLY_CLEAR, (hlc, node))
                conn.execute(counters.SQL_CLEAR_OLDER, (hlc, node))
                if set_cleared(txn, hlc, node):
                    counters.after_clear(txn, (hlc, node))
                floor = (hlc, node)
                txn.everything = True
                done = 1
            if done > 0:
                applied += 1
                if key is not None:
                    changed.append(key)
                if relay:
                    _relay(conn, record)
            else:
                skipped += 1
        if vector is not None:
            vector.save()
        _observe(store, conn, top)
        if ack is not None:
            conn.execute(SQL_PEER_ACK, (ack[0], max(r.seq for r in batch), ack[1], txn.now))
    return ApplyResult(applied, skipped)


def _relay(conn: sqlite3.Connection, r: Record) -> None:
    """Log an applied record again, with its origin's identity (a catch-up source)."""
    conn.execute(SQL_OPLOG, (r.op, r.key, r.tag, r.value, r.expire_at, r.hlc, r.node, r.delta,
                             r.origin_seq or None, r.base_hlc, r.base_node, r.total))


def _check(record: Record) -> None:
    """The shape ``apply`` relies on (frames validate fully; this guards direct callers)."""
    op = record.op
    if type(record.hlc) is not int or record.hlc <= 0 or not record.node:
        raise ReplicationError(f"a record needs a version and a node (seq {record.seq})")
    if op == CLEAR:
        return
    if op not in (SET, INCR, DELETE, TOUCH):
        raise ReplicationError(f"unknown replication op {op!r} (seq {record.seq})")
    if type(record.key) is not str or not record.key:
        raise ReplicationError(f"a {op} record needs a key (seq {record.seq})")
    if op in (SET, INCR) and (record.tag not in TAGS or record.value is None):
        raise ReplicationError(f"a {op} record needs a tag and a value (seq {record.seq})")
    if record.total is not None and (op != INCR or type(record.base_hlc) is not int
                                     or record.origin_seq < 1):
        raise ReplicationError(f"a counter contribution needs an incr, a base and an origin "
                               f"sequence (seq {record.seq})")


def _printable(node: str) -> str:
    return node if node.isprintable() and len(node) <= 64 else repr(node[:64])


def _observe(store: Store, conn: sqlite3.Connection, remote: int) -> None:
    """Inside a write transaction: later local versions stamp beyond ``remote``."""
    store._clock.observe(remote)
    conn.execute(SQL_OBSERVE, (remote, remote))  # survives a reboot


# ---- replication positions -----------------------------------------------------------------

def peer_ack(store: Store, peer: str, seq: int, source: str | None = None) -> PeerPosition:
    """Record that ``peer`` acknowledged ``seq`` (of ``source``'s oplog, by default this
    database's); positions only move forward, except into another source's oplog."""
    if not peer:
        raise ValueError("peer must be a non-empty id or URL")
    if seq < 0:
        raise ValueError(f"an acknowledged position cannot be negative, got {seq}")
    with store.transaction() as txn:
        txn.conn.execute(SQL_PEER_ACK, (peer, seq, source or store.node_id, txn.now))
        row = txn.conn.execute(SQL_PEER_GET, (peer,)).fetchone()
    return PeerPosition._make(row)


def peer_positions(store: Store) -> list[PeerPosition]:
    conn = store._lease()
    try:
        return [PeerPosition._make(row) for row in conn.execute(SQL_PEERS)]
    except sqlite3.Error as exc:
        raise storage_error(exc, store.path, "read the peer positions",
                            store.busy_timeout) from exc
    finally:
        conn.busy -= 1


def peer_position(store: Store, peer: str) -> PeerPosition | None:
    row = store._read_one(SQL_PEER_GET, (peer,), "read a peer position")
    return None if row is None else PeerPosition._make(row)


def peer_forget(store: Store, peer: str) -> bool:
    """Drop a peer's position (it no longer holds the oplog back); True if it had one."""
    with store.transaction() as txn:
        return bool(txn.conn.execute(SQL_PEER_FORGET, (peer,)).rowcount > 0)


# ---- the digest of the live rows -----------------------------------------------------------

_HEAD = struct.Struct("<IbI")


def _payload_bytes(value: Any) -> bytes:
    if isinstance(value, int):
        return b"i%d" % value
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    return b"b" + bytes(value)


def live_digest(store: Store, now: float | None = None,
                versions: bool = False) -> tuple[int, str]:
    """(count, hex digest) of the live rows at ``now`` (default: the store's clock): key,
    tag, value and expiry, and with ``versions`` each row's (hlc, node). Two stores with
    the same digest hold the same live rows."""
    moment = store.clock() if now is None else now
    digest = hashlib.blake2b(digest_size=20)
    count = 0
    conn = store._lease()
    try:
        for key, tag, value, expire_at, hlc, node in conn.execute(SQL_LIVE, (moment,)):
            raw_key = key.encode("utf-8", "surrogatepass")
            raw_value = _payload_bytes(value)
            digest.update(_HEAD.pack(len(raw_key), tag, len(raw_value)))
            digest.update(raw_key)
            digest.update(raw_value)
            digest.update(b"N" if expire_at is None else struct.pack("<d", expire_at))
            if versions:
                digest.update(b"%d/%s;" % (hlc, node.encode()))
            count += 1
    except sqlite3.Error as exc:
        raise storage_error(exc, store.path, "read the live rows", store.busy_timeout) from exc
    finally:
        conn.busy -= 1
    return count, digest.hexdigest()
