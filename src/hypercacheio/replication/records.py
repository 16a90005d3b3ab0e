"""What replication moves between stores: oplog records, snapshot rows, positions.

Pure data (no msgpack: ``frames.py`` encodes these). A ``Record`` is one row of a store's
oplog (``Store.oplog_since``); ``Store.apply`` takes them from another store. A
``SnapshotChunk`` is a key range of a store's rows and tombstones (``Store.snapshot_chunk``);
``Store.apply_snapshot`` takes it.

What each op means for a replica (last writer wins on the version ``(hlc, node)``):

- ``set`` (``set``, ``set_many``, ``add``): the row ``key, tag, value, expire_at``.
- ``incr`` (``incr``/``decr``): ``value`` is the resulting value (tag int) with the row's
  ``expire_at``, ``delta`` the increment. Primary/secondary applies it as a ``set`` of the
  resulting value. Active-active (a store marked ``multi_writer``) also fills ``base_hlc``,
  ``base_node`` and ``total``: the origin's whole contribution to the counter since its
  base (``hypercacheio.store.counters`` states the rule), applied as a contribution, not a
  set; ``expire_at`` is then the expiry the origin gave the counter.
- ``delete`` (``delete``, ``delete_many``, ``pull``): a tombstone until ``expire_at`` (the end
  of the tombstone window), also where the key is unknown, so a late ``set`` cannot
  resurrect it.
- ``touch``: a new ``expire_at`` for a live row, if the touch is newer than the row.
  (Active-active logs a touch as a ``set`` of the touched row: it starts a new counter base.)

Every record also carries ``origin_seq``: the origin's own sequence number of the write
(``node`` is the origin), dense per origin, kept when a catch-up source relays it. A store
keeps per origin what it has applied (its version vector, ``Store.version_vector``), so a
duplicate or a replay is a no-op wherever it comes from; 0 means "no origin sequence"
(records built by hand, e.g. a forwarded write's answer).
- ``clear``: every row older than the clear goes; no older write is applied after it.

Not replicated, by design: evictions (``max_entries``, ``max_bytes``: what a cache keeps is a
local decision of each host) and the removal of expired rows (expiry is absolute: every host
sees the same row expire at the same time, no message needed). Locks never replicate (the
primary is their single authority).
"""

from __future__ import annotations

from typing import NamedTuple

from ..codec import Payload

SET, DELETE, INCR, TOUCH, CLEAR = "set", "delete", "incr", "touch", "clear"
OPS = frozenset((SET, DELETE, INCR, TOUCH, CLEAR))


class Record(NamedTuple):
    """One oplog row: a write as a replica needs it (see the module's notes per op)."""

    seq: int  # position in the oplog of the store it was read from
    op: str
    key: str | None  # None for clear
    tag: int | None  # codec tag of value (set, incr)
    value: Payload | None
    expire_at: float | None
    hlc: int  # version of the write ...
    node: str  # ... and the node it was first written on
    delta: int | None = None  # incr: the increment
    origin_seq: int = 0  # the origin's own sequence number (0: none)
    base_hlc: int | None = None  # active-active incr: the version of the counter's base ...
    base_node: str | None = None
    total: int | None = None  # ... and the origin's whole contribution on it


class CounterRow(NamedTuple):
    """An origin's contribution to an active-active counter (``counters`` table)."""

    key: str
    origin: str
    base_hlc: int
    base_node: str
    total: int
    origin_seq: int
    expire_at: float | None


class SnapshotRow(NamedTuple):
    """A row of a snapshot: a live row, or a tombstone (tag -1, value None)."""

    key: str
    tag: int
    value: Payload | None
    expire_at: float | None
    hlc: int
    node: str


class SnapshotStart(NamedTuple):
    """Taken before the first chunk: the oplog position to catch up from afterwards, the
    version every row already committed is at or below, the source database's id, and the
    version of its last clear."""

    position: int
    hlc: int
    source: str
    cleared_hlc: int
    cleared_node: str
    # the source's version vector at the start: (origin, applied_seq) pairs
    vector: tuple[tuple[str, int], ...] = ()


class SnapshotChunk(NamedTuple):
    """The rows (and tombstones) of the key range (after, rows[-1].key], or (after, end)
    when ``done``, in key order."""

    start: SnapshotStart
    after: str | None
    rows: list[SnapshotRow]
    done: bool
    counters: tuple[CounterRow, ...] = ()  # contributions to the counters of the range


class ApplyResult(NamedTuple):
    """What ``Store.apply`` did with a batch: records applied, records skipped because the
    replica already held the same or a newer version."""

    applied: int
    skipped_older: int


class OplogBounds(NamedTuple):
    """The oldest oplog seq still kept (``last + 1`` when the oplog is empty) and the last
    seq written: a peer that acknowledged ``acked`` can resume from the oplog if
    ``oldest - 1 <= acked <= last`` (``Store.can_resume``), else it needs a snapshot."""

    oldest: int
    last: int


class PeerPosition(NamedTuple):
    """A replication position kept in the store: on a primary, what a secondary
    acknowledged; on a secondary, what it applied from its primary. ``source`` is the node
    id of the database whose oplog the position counts in: a recreated primary has a new
    one, and a position in another source's oplog means a full resync."""

    peer: str
    acked: int
    source: str
    updated_at: float


__all__ = [
    "CLEAR", "DELETE", "INCR", "OPS", "SET", "TOUCH", "ApplyResult", "CounterRow", "OplogBounds",
    "PeerPosition", "Record", "SnapshotChunk", "SnapshotRow", "SnapshotStart",
]
