"""Upkeep of a store: expiry, tombstone and oplog trimming, max_bytes and max_entries, WAL
checkpoints. Run in small amortized rounds by the writes themselves (``Store._finish``) and
by the node's collector."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..codec import INT64_MAX
from ..errors import StorageError
from .clock import wall_hlc
from .fs import file_size
from .schema import (
    OPLOG_FLOOR,
    SQL_COUNT_ALL,
    SQL_EVICT_ALL_BUT,
    SQL_EVICT_OLDEST,
    SQL_EXPIRED_TO_TOMBSTONE,
    SQL_FLOOR_OPLOG,
    SQL_KEEP_OWN_SEQ,
    SQL_OPLOG_WINDOW_BOUND,
    SQL_PEERS_MIN_ACKED,
    SQL_PURGE,
    SQL_PURGE_CLUSTERED,
    SQL_PURGE_COUNTERS,
    SQL_PURGE_LOCKS,
    SQL_PURGE_OPLOG,
)

if TYPE_CHECKING:
    from .core import Store, Txn

log = logging.getLogger("hypercacheio.store")

SQL_OLDEST_UNACKED = (f"SELECT hlc FROM oplog WHERE seq > ? AND op != '{OPLOG_FLOOR}' "
                      "ORDER BY seq LIMIT 1")

GC_EVERY = 512  # writes of one process between two amortized collections
GC_BATCH = 256  # rows removed by one amortized collection
SIZE_CHECK_EVERY = 64  # writes between two checks of max_bytes
WAL_CHECKPOINT_BYTES = 16 << 20  # a larger -wal file gets a checkpoint from the collection
TOMBSTONE_SECONDS = 7 * 24 * 3600.0


def purge_expired(store: Store, limit: int | None = None) -> int:
    """Remove expired entries, tombstones past their window, expired locks, and the oplog
    rows no peer needs (``oplog_trim_bound``)."""
    removed = 0
    batch = GC_BATCH if limit is None else min(limit, GC_BATCH)
    while True:
        with store.transaction() as txn:
            conn = txn.conn
            if txn.clustered:
                keys = []
                if store.multi_writer:  # first: the DELETE below would take them
                    keys = [r[0] for r in conn.execute(SQL_EXPIRED_TO_TOMBSTONE, (
                        TOMBSTONE_SECONDS, txn.now, batch))]
                keys += [r[0] for r in conn.execute(SQL_PURGE_CLUSTERED, (
                    txn.now, tombstone_bound(store, txn), batch))]
                conn.execute(SQL_PURGE_COUNTERS, (batch,))
                conn.execute(SQL_KEEP_OWN_SEQ, (store.node_id,))  # before its rows go
            else:
                keys = [r[0] for r in conn.execute(SQL_PURGE, (txn.now, batch))]
            conn.execute(SQL_PURGE_LOCKS, (txn.now, batch))
            bound = oplog_trim_bound(store, txn)
            trimmed = conn.execute(SQL_PURGE_OPLOG, (bound, batch)).rowcount
            conn.execute(SQL_FLOOR_OPLOG, (bound,))  # the newest row stays, as a floor
            txn.changed.extend(keys)
        removed += len(keys)
        # An unbounded round also takes the whole old oplog: one batch a round would
        # fall behind a store that writes more than a batch between two rounds.
        more_oplog = limit is None and trimmed >= batch
        if (len(keys) < batch and not more_oplog) or (limit is not None and removed >= limit):
            return removed


def tombstone_bound(store: Store, txn: Txn) -> int:
    """Tombstones at or above this version stay, even past their window: some peer
    registered for this database has not acknowledged the oplog up to them (the version of
    the oldest row a peer still waits for). Without peers, or all caught up: no bound."""
    acked, peers = txn.conn.execute(SQL_PEERS_MIN_ACKED, (store.node_id,)).fetchone()
    if not peers:
        return INT64_MAX
    row = txn.conn.execute(SQL_OLDEST_UNACKED, (int(acked),)).fetchone()
    return INT64_MAX if row is None else int(row[0])


def oplog_trim_bound(store: Store, txn: Txn) -> int:
    """The last oplog seq that may go: every row older than the tombstone window, and
    every row that each peer registered for this database has acknowledged (with no peer
    registered, the window alone: a secondary may come back). A peer behind the bound
    needs a snapshot (``Store.can_resume``)."""
    bound = int(txn.conn.execute(SQL_OPLOG_WINDOW_BOUND,
                                 (wall_hlc(txn.now - TOMBSTONE_SECONDS),)).fetchone()[0])
    acked, peers = txn.conn.execute(SQL_PEERS_MIN_ACKED, (store.node_id,)).fetchone()
    if peers:
        bound = max(bound, int(acked))
    return bound


def collect_amortized(store: Store) -> None:
    """One small collection round after a write; a failure is logged, never raised."""
    try:
        purge_expired(store, limit=GC_BATCH)
        if store.max_bytes is not None:
            enforce_max_bytes(store)
        # SQLite checkpoints by itself (wal_autocheckpoint); step in only when the WAL has
        # grown past what that keeps it to (long readers held it back).
        if file_size(store.path + "-wal") > WAL_CHECKPOINT_BYTES:
            store.checkpoint("PASSIVE")
    except StorageError as exc:  # never fail the caller's committed write
        log.warning("background collection in %s failed: %s", store.directory, exc)


def enforce_max_bytes(store: Store) -> int:
    """Evict (expired first, then oldest written) until under ``max_bytes``."""
    if store.max_bytes is None or store.used_bytes() <= store.max_bytes:
        return 0
    evicted = purge_expired(store)
    while store.used_bytes() > store.max_bytes * 0.9:
        with store.transaction() as txn:
            count = txn.conn.execute(SQL_COUNT_ALL).fetchone()[0]
            if count == 0:
                break
            keys = [r[0] for r in txn.conn.execute(SQL_EVICT_OLDEST, (max(1, count // 10),))]
            txn.changed.extend(keys)
        evicted += len(keys)
    return evicted


def enforce_max_entries(store: Store, txn: Txn) -> None:
    """Django's culling rule: at ``max_entries`` rows, drop 1/cull_frequency of them
    (expired first, then the oldest written); cull_frequency 0 empties the store."""
    assert store.max_entries is not None
    count = txn.conn.execute(SQL_COUNT_ALL).fetchone()[0]
    if count <= store.max_entries:
        return
    keys = [r[0] for r in txn.conn.execute(SQL_PURGE, (txn.now, count))]
    txn.changed.extend(keys)
    count -= len(keys)
    if count <= store.max_entries:
        return
    # Django culls before it inserts; culling after, the row just written is spared.
    keep = txn.changed[-500:]
    if store.cull_frequency == 0:
        marks = ",".join("?" * len(keep))
        keys = [r[0] for r in txn.conn.execute(SQL_EVICT_ALL_BUT.format(marks=marks), keep)]
    else:
        keys = [r[0] for r in txn.conn.execute(
            SQL_EVICT_OLDEST, ((count - 1) // store.cull_frequency,))]
    txn.changed.extend(keys)
