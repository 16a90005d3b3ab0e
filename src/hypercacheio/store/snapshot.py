"""Snapshots of a store: where one starts, its chunks in key order, and applying another
store's chunks (rows by last writer wins, the key range a chunk covers replaced).

A snapshot is what a peer takes when it is too far behind to catch up from the oplog
(``replica.py``): its chunks and then the oplog from the snapshot's start position converge.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..codec import TAG_INT, TAG_TOMBSTONE, payload_size
from ..replication.records import ApplyResult, SnapshotChunk, SnapshotRow, SnapshotStart
from . import counters, mesh
from .diagnose import storage_error
from .replica import (
    _NO_KEY,
    SQL_APPLY_CLEAR,
    SQL_APPLY_PUT,
    SQL_OPLOG_LAST,
    SQL_PEER_SET,
    _observe,
    cleared,
    set_cleared,
)
from .upkeep import TOMBSTONE_SECONDS

if TYPE_CHECKING:
    from .core import Store, Txn

SQL_SNAPSHOT = ("SELECT key, tag, value, expire_at, hlc, node FROM entries "
                "WHERE key > ? AND (expire_at IS NULL OR expire_at > ?) ORDER BY key LIMIT ?")
SQL_RANGE_OLD = "SELECT key FROM entries WHERE key > ? AND hlc <= ?"
SQL_RANGE_OLD_UPTO = "SELECT key FROM entries WHERE key > ? AND key <= ? AND hlc <= ?"
SQL_DELETE_KEY = "DELETE FROM entries WHERE key = ?"


def snapshot_begin(store: Store) -> SnapshotStart:
    """Where a snapshot starts: a version taken under the write lock, so every write
    committed so far is at or below ``position`` and ``hlc``, and every later one above
    both."""
    with store.transaction() as txn:
        position = int(txn.conn.execute(SQL_OPLOG_LAST).fetchone()[0])
        hlc, node = cleared(txn.conn)
        return SnapshotStart(position, txn.hlc, store.node_id, hlc, node,
                             mesh.read_vector(txn.conn, store.node_id))


def snapshot_chunk(store: Store, start: SnapshotStart, after: str | None,
                   limit: int) -> SnapshotChunk:
    """Up to ``limit`` rows and tombstones after the key ``after``, in key order (one short
    read: writes go on between chunks)."""
    if limit < 1:
        raise ValueError(f"snapshot chunk limit must be at least 1, got {limit}")
    conn = store._lease()
    try:
        if store.multi_writer:
            found = conn.execute(mesh.SQL_SNAPSHOT_ROWS, {
                "after": after or _NO_KEY, "now": store.clock(), "limit": limit,
                "window": TOMBSTONE_SECONDS})
        else:
            found = conn.execute(SQL_SNAPSHOT, (after or _NO_KEY, store.clock(), limit))
        rows = [SnapshotRow._make(row) for row in found]
        done = len(rows) < limit
        contributions = counters.contributions(conn, after or _NO_KEY,
                                               None if done else rows[-1].key)
    except sqlite3.Error as exc:
        raise storage_error(exc, store.path, "read a snapshot", store.busy_timeout) from exc
    finally:
        conn.busy -= 1
    return SnapshotChunk(start, after, mesh.base_values(rows, contributions), done,
                         tuple(contributions))


def snapshot_chunks(store: Store, start: SnapshotStart, limit: int = 1000,
                    after: str | None = None) -> Iterator[SnapshotChunk]:
    """Every chunk from ``after`` on, the last one ``done``."""
    while True:
        chunk = snapshot_chunk(store, start, after, limit)
        yield chunk
        if chunk.done:
            return
        after = chunk.rows[-1].key


def apply_snapshot(store: Store, chunk: SnapshotChunk, *, ack: str | None = None) -> ApplyResult:
    """Apply a snapshot chunk: its rows by last writer wins, and the key range it covers
    replaced, so a row here that the source did not hold at the snapshot's start (deleted
    there long ago, or never written) goes. Rows newer than the start stay: they came from
    the source's oplog since.

    ``ack=peer``: the last chunk records ``start.position`` as the position applied from
    ``peer`` (replacing any position from it, in any source's oplog).
    """
    start = chunk.start
    applied = skipped = 0
    with store.transaction() as txn:
        conn = txn.conn
        if set_cleared(txn, start.cleared_hlc, start.cleared_node):  # the source's clear
            conn.execute(SQL_APPLY_CLEAR, (start.cleared_hlc, start.cleared_node))
            conn.execute(counters.SQL_CLEAR_OLDER, (start.cleared_hlc, start.cleared_node))
            counters.after_clear(txn, (start.cleared_hlc, start.cleared_node))
            txn.everything = True
        floor = cleared(conn)
        keys = set()
        top = start.hlc
        for row in chunk.rows:
            keys.add(row.key)
            top = max(top, row.hlc)
            if (row.hlc, row.node) <= floor:
                skipped += 1
                continue
            if put_row(txn, row):
                applied += 1
            else:
                skipped += 1
        after = chunk.after or _NO_KEY
        if chunk.done:
            old = conn.execute(SQL_RANGE_OLD, (after, start.hlc))
        else:
            old = conn.execute(SQL_RANGE_OLD_UPTO, (after, chunk.rows[-1].key, start.hlc))
        stale = [key for (key,) in old if key not in keys]
        conn.executemany(SQL_DELETE_KEY, [(key,) for key in stale])
        txn.changed.extend(stale)
        for contribution in chunk.counters:
            applied += counters.apply_contribution(txn, contribution, floor)
        if chunk.done and txn.clustered and store.multi_writer:
            mesh.merge_vector(conn, start.vector)
        _observe(store, conn, top)
        if ack is not None and chunk.done:
            conn.execute(SQL_PEER_SET, (ack, start.position, start.source, txn.now))
    return ApplyResult(applied, skipped)


def put_row(txn: Txn, row: SnapshotRow) -> bool:
    """A row (or tombstone) of another store by last writer wins; an int row carries its
    base's value (``mesh.base_values``), to which the contributions here are added."""
    value = row.value
    size = 0 if value is None else len(row.key) + payload_size(value)
    if txn.conn.execute(SQL_APPLY_PUT, (row.key, row.tag, value, row.expire_at, size,
                                        row.hlc, row.node)).rowcount <= 0:
        return False
    txn.changed.append(row.key)
    txn.inserted += row.tag != TAG_TOMBSTONE
    if row.tag in (TAG_INT, TAG_TOMBSTONE):
        counters.after_write(txn, row.key, row.tag, value, row.expire_at,
                             (row.hlc, row.node))
    return True
