"""The replication methods of ``Store``: a base class of it whose methods are one-line calls
into ``replica.py`` (oplog, records, positions, digest), ``snapshot.py`` and, for
active-active, ``mesh.py`` and ``counters.py``. Their docstrings are the API the
replication code calls.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, cast

from ..replication.records import (
    ApplyResult,
    CounterRow,
    OplogBounds,
    PeerPosition,
    Record,
    SnapshotChunk,
    SnapshotRow,
    SnapshotStart,
)
from . import counters, mesh
from .diagnose import storage_error
from .replica import (
    _NO_KEY,
    apply,
    can_resume,
    live_digest,
    oplog_bounds,
    oplog_since,
    peer_ack,
    peer_forget,
    peer_position,
    peer_positions,
)
from .snapshot import apply_snapshot, snapshot_begin, snapshot_chunk, snapshot_chunks

if TYPE_CHECKING:
    from .core import Store


def _store(methods: Replication) -> Store:
    return cast("Store", methods)  # Replication is only ever a base of Store


class Replication:
    """The replication methods of ``Store`` (a base class of it; the work is above)."""

    def oplog_since(self, seq: int, limit: int = 500) -> list[Record]:
        """The oplog rows after position ``seq``, oldest first, at most ``limit``."""
        return oplog_since(_store(self), seq, limit)

    def oplog_position(self) -> int:
        """The seq of the last oplog row written (0 if none ever was)."""
        return oplog_bounds(_store(self)).last

    def oplog_bounds(self) -> OplogBounds:
        """(oldest seq still kept, last seq written)."""
        return oplog_bounds(_store(self))

    def can_resume(self, acked: int) -> bool:
        """Whether a peer that acknowledged ``acked`` of this oplog can catch up from it
        (else it needs a snapshot)."""
        return can_resume(_store(self), acked)

    def apply(self, records: Iterable[Record], *, relay: bool = False,
              ack: tuple[str, str] | None = None) -> ApplyResult:
        """Apply another store's records: one transaction, last writer wins on (hlc, node),
        tombstones for deletes, the clock moved past every version seen. Applied records
        are not logged here again unless ``relay``; ``ack=(peer, source database id)``
        records the batch's last seq as the position applied from that peer."""
        return apply(_store(self), records, relay=relay, ack=ack)

    def snapshot_begin(self) -> SnapshotStart:
        """Take the oplog position (and version) a snapshot starts at: before its first
        chunk, so that its chunks then the oplog from ``position`` converge."""
        return snapshot_begin(_store(self))

    def snapshot_chunk(self, start: SnapshotStart, after: str | None,
                       limit: int = 1000) -> SnapshotChunk:
        """Up to ``limit`` live rows and tombstones after key ``after``, in key order."""
        return snapshot_chunk(_store(self), start, after, limit)

    def snapshot_chunks(self, start: SnapshotStart, limit: int = 1000,
                        after: str | None = None) -> Iterator[SnapshotChunk]:
        """Every chunk after key ``after``; the last one is ``done``."""
        return snapshot_chunks(_store(self), start, limit, after)

    def apply_snapshot(self, chunk: SnapshotChunk, *, ack: str | None = None) -> ApplyResult:
        """Apply a snapshot chunk (rows by last writer wins; the key range it covers
        replaced); with ``ack=peer`` the last chunk records the snapshot's position."""
        return apply_snapshot(_store(self), chunk, ack=ack)

    def peer_ack(self, peer: str, seq: int, source: str | None = None) -> PeerPosition:
        """Persist that ``peer`` acknowledged ``seq`` of ``source``'s oplog (default: this
        database's, whose unacknowledged rows it then keeps, up to the tombstone window)."""
        return peer_ack(_store(self), peer, seq, source)

    def peer_positions(self) -> list[PeerPosition]:
        """Every persisted replication position, by peer."""
        return peer_positions(_store(self))

    def peer_position(self, peer: str) -> PeerPosition | None:
        return peer_position(_store(self), peer)

    def peer_forget(self, peer: str) -> bool:
        """Drop a peer's position (its unacknowledged oplog rows are no longer kept)."""
        return peer_forget(_store(self), peer)

    def live_digest(self, now: float | None = None, *,
                    versions: bool = False) -> tuple[int, str]:
        """(count, digest) of the live rows at ``now``: equal on two stores that hold the
        same live keys, values and expiries (and versions, with ``versions``)."""
        return live_digest(_store(self), now, versions)

    def checksum(self, now: float | None = None, *, versions: bool = False) -> str:
        """The digest of ``live_digest`` alone."""
        return live_digest(_store(self), now, versions)[1]

    # ---- active-active (store/mesh.py, store/counters.py) ----

    def version_vector(self) -> dict[str, int]:
        """Per origin, the highest sequence number up to which every write is applied here
        (this node's own entry counts its own writes)."""
        store = _store(self)
        conn = store._lease()
        try:
            return dict(mesh.read_vector(conn, store.node_id))
        except sqlite3.Error as exc:
            raise storage_error(exc, store.path, "read the version vector",
                                store.busy_timeout) from exc
        finally:
            conn.busy -= 1

    def contributions(self, key: str | None = None) -> list[CounterRow]:
        """The active-active counter contributions held (of one key, or every one)."""
        store = _store(self)
        conn = store._lease()
        try:
            return [c for c in counters.contributions(conn, _NO_KEY, None)
                    if key is None or c.key == key]
        finally:
            conn.busy -= 1

    def bucket_digests(self, now: float | None = None) -> mesh.Digest:
        """The anti-entropy digest: ``mesh.BUCKETS`` bucket hashes of rows and contributions,
        with the version vector and last clear they cover."""
        return mesh.bucket_digests(_store(self), now)

    def bucket_rows(self, buckets: Iterable[int]) -> tuple[list[SnapshotRow], list[CounterRow]]:
        """Every row, tombstone and contribution of the given buckets."""
        return mesh.bucket_rows(_store(self), buckets)

    def apply_rows(self, rows: Iterable[SnapshotRow], found: Iterable[CounterRow],
                   source: mesh.Digest | None = None) -> ApplyResult:
        """Apply another store's bucket rows (see ``mesh.apply_rows``)."""
        return mesh.apply_rows(_store(self), rows, found, source)
