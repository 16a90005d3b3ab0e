"""The store (L2): one SQLite file in WAL mode per storage directory.

Where things are: ``schema`` (files, pragmas, tables, statements, schema version),
``connections`` (per-thread connections and the fork handshake), ``core`` (``Store``: opening,
reads and the one write path), ``clock`` (the database's hybrid logical clock), ``upkeep``
(expiry, size limits, oplog trimming, checkpoints), ``fs`` (file-system checks),
``diagnose`` (SQLite and OS failures into ``hypercacheio.errors``), ``replica`` (the store's
side of replication: oplog reads, applying records, peer positions, digests), ``snapshot``
(taking and applying snapshots) and ``replica_methods`` (those as methods of ``Store``).
"""

from __future__ import annotations

from .clock import CLOCK_NAME, wall_hlc
from .connections import (
    FORK_WAIT,
    _after_fork_in_child,
    _after_fork_in_parent,
    _before_fork,
    _Connection,
)
from .core import Row, Store, Txn
from .diagnose import storage_error
from .fs import NETWORK_FILESYSTEMS, filesystem_type
from .schema import DB_NAME, INIT_LOCK_NAME, SCHEMA_VERSION, TOKENS_NAME
from .upkeep import (
    GC_BATCH,
    GC_EVERY,
    SIZE_CHECK_EVERY,
    TOMBSTONE_SECONDS,
    WAL_CHECKPOINT_BYTES,
)

__all__ = [
    "CLOCK_NAME", "DB_NAME", "FORK_WAIT", "GC_BATCH", "GC_EVERY", "INIT_LOCK_NAME",
    "NETWORK_FILESYSTEMS",
    "SCHEMA_VERSION", "SIZE_CHECK_EVERY", "TOKENS_NAME", "TOMBSTONE_SECONDS",
    "WAL_CHECKPOINT_BYTES", "Row", "Store", "Txn", "_Connection", "_after_fork_in_child",
    "_after_fork_in_parent", "_before_fork", "filesystem_type", "storage_error", "wall_hlc",
]
