"""Replication between stores: records, snapshots and positions (``records``), their wire
encoding (``frames``, needs msgpack: import it explicitly). The store side is
``hypercacheio.store.replica`` (``Store.oplog_since``, ``Store.apply``, ...)."""

from __future__ import annotations

from .records import (
    OPS,
    ApplyResult,
    OplogBounds,
    PeerPosition,
    Record,
    SnapshotChunk,
    SnapshotRow,
    SnapshotStart,
)

__all__ = [
    "OPS", "ApplyResult", "OplogBounds", "PeerPosition", "Record", "SnapshotChunk",
    "SnapshotRow", "SnapshotStart",
]
