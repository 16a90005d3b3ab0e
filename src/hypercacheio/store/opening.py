"""Opening a database: directory lock, WAL mode, schema, migrations, the ``meta`` rows."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import uuid
from typing import TYPE_CHECKING

from ..errors import StorageError
from .diagnose import BUSY, classify, storage_error
from .schema import (
    INIT_LOCK_NAME,
    LOGGED_PUT,
    META_DEFAULTS,
    MIGRATIONS,
    PRAGMAS_DATABASE,
    SCHEMA,
    SCHEMA_VERSION,
    SQL_ENSURE_ORIGIN,
    SQL_META_GET,
    SQL_META_INIT,
    SQL_META_SET,
)
from .writes import _rollback

if TYPE_CHECKING:
    from .core import Store


def initialize(store: Store, clustered: bool) -> None:
    """Create or upgrade the database, safely when many processes open it at once."""
    lock_path = os.path.join(store.directory, INIT_LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(exc, lock_path, "open the start-up lock file",
                            store.busy_timeout) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        conn = store._connect(keep_busy=True)  # busy: a fork now waits for it
        try:
            create_or_upgrade(store, conn, clustered)
        except sqlite3.Error as exc:
            error = storage_error(exc, store.path, "open the database", store.busy_timeout)
            if type(error) is StorageError and classify(exc, store.path) != BUSY:
                error = StorageError(
                    f"{store.path} cannot be used as a hypercacheio database ({exc}); "
                    "if it is corrupt or not a database, move it away and start again")
            raise error from exc
        finally:
            _rollback(conn)
            conn.busy -= 1
            conn.close()
    finally:
        os.close(fd)


def create_or_upgrade(store: Store, conn: sqlite3.Connection, clustered: bool) -> None:
    """Schema, migrations and meta rows, in one transaction; the store learns its id and flag."""
    for pragma in PRAGMAS_DATABASE:
        mode = conn.execute(pragma).fetchone()
        if mode and str(mode[0]).lower() != "wal":
            raise StorageError(f"{store.path}: cannot switch to WAL mode ({mode[0]})")
    conn.executescript(SCHEMA)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(SQL_META_INIT, ("schema_version", SCHEMA_VERSION))
    version = int(conn.execute(SQL_META_GET, ("schema_version",)).fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"{store.path} has schema version {version}, newer than this "
            f"hypercacheio understands ({SCHEMA_VERSION}); upgrade hypercacheio")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for sql in MIGRATIONS.get(step, ()):
            conn.execute(sql)
    if version < SCHEMA_VERSION:
        conn.execute(SQL_META_SET, (SCHEMA_VERSION, "schema_version"))
    for sql in LOGGED_PUT:  # after the migrations: it names the oplog's newer columns
        conn.execute(sql)
    conn.execute(SQL_META_INIT, ("node_id", uuid.uuid4().hex[:16]))
    conn.execute(SQL_META_INIT, ("created_at", store.clock()))
    for name, value in META_DEFAULTS:
        conn.execute(SQL_META_INIT, (name, value))
    if clustered:
        conn.execute(SQL_META_SET, (1, "clustered"))
        store._clock.bump_generation()
    if store._clock.needs_seed():
        store._clock.seed(conn)
    store.node_id = str(conn.execute(SQL_META_GET, ("node_id",)).fetchone()[0])
    store.clustered = bool(conn.execute(SQL_META_GET, ("clustered",)).fetchone()[0])
    store.multi_writer = bool(conn.execute(SQL_META_GET, ("multi_writer",)).fetchone()[0])
    conn.execute(SQL_ENSURE_ORIGIN, (store.node_id,))  # this node's own sequence (records)
    store._flag_generation = store._clock.generation
    conn.execute("COMMIT")
    store._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
