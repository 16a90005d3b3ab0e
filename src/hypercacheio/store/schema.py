"""The database's layout as data: file names, pragmas, tables, migrations and statements."""

from __future__ import annotations

DB_NAME = "hypercacheio.sqlite"
TOKENS_NAME = "hypercacheio.l1"
INIT_LOCK_NAME = "hypercacheio.init.lock"

# Version 2: versions come from the database's clock (``clock.py``), not each process's;
# ``meta`` holds the clustered flag, the last version observed from a peer and the version of
# the last clear; oplog rows carry an increment's delta; ``peers`` holds replication
# positions. An older hypercacheio would stamp versions of its own: it refuses a version-2
# database.
# Version 3: the oplog's seq is a plain INTEGER PRIMARY KEY (no AUTOINCREMENT, whose
# ``sqlite_sequence`` row was a third page dirtied by every clustered write), and a
# clustered ``set`` is one statement into the view ``logged_put`` (its trigger writes the
# row and its oplog row: ``LOGGED_PUT``). An older hypercacheio would keep reading the
# oplog's last position from ``sqlite_sequence``: it refuses a version-3 database.
SCHEMA_VERSION = 3

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

OPLOG_COLUMNS = """
    seq       INTEGER PRIMARY KEY, -- never reused: see OPLOG_FLOOR
    op        TEXT NOT NULL,      -- set, delete, incr, touch, clear
    key       TEXT,               -- NULL for clear
    tag       INTEGER,            -- set, incr: codec tag of value
    value,                        -- set: the value; incr: the resulting value
    expire_at REAL,               -- set, incr, touch: the row's; delete: the tombstone's
    hlc       INTEGER NOT NULL,   -- version of the write
    node      TEXT NOT NULL,      -- node it was first written on (its origin)
    delta     INTEGER,            -- incr: the increment
    origin_seq INTEGER,           -- the origin's own sequence number of the write
    base_hlc  INTEGER,            -- active-active incr: the version of the counter's base
    base_node TEXT,               -- ... and its node
    total     INTEGER             -- ... the origin's whole contribution on that base
"""

SCHEMA = f"""
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
CREATE TABLE IF NOT EXISTS oplog ({OPLOG_COLUMNS});
-- The version vector: per origin, every write up to applied_seq is applied here (this
-- node's own row counts its own writes: the next one gets applied_seq + 1).
CREATE TABLE IF NOT EXISTS origins (
    origin      TEXT PRIMARY KEY,
    applied_seq INTEGER NOT NULL
) WITHOUT ROWID;
-- Writes of an origin applied above its applied_seq (received out of order).
CREATE TABLE IF NOT EXISTS origin_pending (
    origin TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (origin, seq)
) WITHOUT ROWID;
-- Active-active counters: each origin's whole contribution to a counter since its base
-- (the version of the set, delete or touch it counts from); see store/counters.py.
CREATE TABLE IF NOT EXISTS counters (
    key        TEXT NOT NULL,
    origin     TEXT NOT NULL,
    base_hlc   INTEGER NOT NULL,
    base_node  TEXT NOT NULL,
    total      INTEGER NOT NULL,
    origin_seq INTEGER NOT NULL,
    expire_at  REAL,               -- the expiry the origin gave the counter
    PRIMARY KEY (key, origin)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    peer       TEXT PRIMARY KEY,  -- a peer's id or URL
    acked      INTEGER NOT NULL,  -- last oplog seq acknowledged (by it, or from it)
    source     TEXT NOT NULL,     -- node id of the database whose oplog ``acked`` counts in
    updated_at REAL NOT NULL
) WITHOUT ROWID;
"""

# The oplog's numbering never goes back: peers hold positions in it (``peers``; push.py,
# mesh.py). Without AUTOINCREMENT SQLite numbers a row max(seq) + 1, so the newest row is
# never deleted (SQL_PURGE_OPLOG keeps it; nothing else deletes oplog rows): once the
# trims may take it, it becomes a floor row instead (SQL_FLOOR_OPLOG), and a version-2
# oplog emptied by its trims gets one at its last seq (migration 3). A floor row (op
# OPLOG_FLOOR, hlc 0, node '': no node's id, so no node's own sequence, SQL_OWN_SEQ) says
# "every seq up to here was written and trimmed": the readers skip it
# (``replica.SQL_OPLOG_SINCE``, ``SQL_OPLOG_BOUNDS``, ``upkeep.SQL_OLDEST_UNACKED``), so the
# bounds read as for an emptied oplog, and the trims take it once a newer row exists.
OPLOG_FLOOR = "floor"

# Run in order, inside the opening transaction, on a database of an older version.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # new ``meta`` rows (META_DEFAULTS), the oplog's delta; ``peers`` comes from SCHEMA; the
    # clock file is seeded from the rows
    2: ("ALTER TABLE oplog ADD COLUMN delta INTEGER",
        "ALTER TABLE oplog ADD COLUMN origin_seq INTEGER",
        "ALTER TABLE oplog ADD COLUMN base_hlc INTEGER",
        "ALTER TABLE oplog ADD COLUMN base_node TEXT",
        "ALTER TABLE oplog ADD COLUMN total INTEGER"),
    # the oplog rebuilt without AUTOINCREMENT, its rows kept; the numbering goes on above
    # the last seq ever written (``sqlite_sequence``) through a floor row if the rows are
    # gone (OPLOG_FLOOR). The view and trigger of ``LOGGED_PUT`` are made afterwards.
    3: (f"CREATE TABLE oplog_v3 ({OPLOG_COLUMNS})",
        "INSERT INTO oplog_v3(seq, op, key, tag, value, expire_at, hlc, node, delta, "
        "origin_seq, base_hlc, base_node, total) SELECT seq, op, key, tag, value, expire_at, "
        "hlc, node, delta, origin_seq, base_hlc, base_node, total FROM oplog",
        f"INSERT INTO oplog_v3(seq, op, hlc, node) SELECT seq, '{OPLOG_FLOOR}', 0, '' "
        "FROM sqlite_sequence WHERE name = 'oplog' "
        "AND seq > COALESCE((SELECT max(seq) FROM oplog), 0)",
        "DROP TABLE oplog",
        "ALTER TABLE oplog_v3 RENAME TO oplog"),
}

# Rows every database has (INSERT OR IGNORE: the first process to open it decides).
META_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("fence", 0), ("hlc", 0), ("clustered", 0),
    # active-active (several writers): increments replicate as contributions (counters.py)
    ("multi_writer", 0),
    # the version of the last clear (local or applied): no older write is applied after it
    ("cleared_hlc", 0), ("cleared_node", ""),
)

SQL_META_INIT = "INSERT OR IGNORE INTO meta(name, value) VALUES (?, ?)"
SQL_META_GET = "SELECT value FROM meta WHERE name = ?"
SQL_META_SET = "UPDATE meta SET value = ? WHERE name = ?"
# lock grant in one statement: the next fence, only if the lock is free, expired or the owner's
SQL_FENCE_IF_FREE = (
    "UPDATE meta SET value = value + 1 WHERE name = 'fence' AND NOT EXISTS ("
    "SELECT 1 FROM locks WHERE name = ? AND owner != ? AND (expire_at IS NULL OR expire_at > ?)"
    ") RETURNING value"
)

SQL_GET = "SELECT tag, value, expire_at FROM entries WHERE key = ?"
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
SQL_TOMBSTONE = (
    "UPDATE entries SET tag = -1, value = NULL, expire_at = ?, size = 0, hlc = ?, node = ? "
    "WHERE key = ? AND tag != -1 RETURNING (expire_at)"
)
# active-active: a delete of a key absent here still leaves a (newer) tombstone
SQL_TOMBSTONE_PUT = (
    "INSERT OR REPLACE INTO entries(key, tag, value, expire_at, size, hlc, node) "
    "VALUES (?, -1, NULL, ?, 0, ?, ?)"
)
# incr: one statement; refuses (changes nothing) on a missing, expired, non-int or overflow
SQL_INCR = (
    "UPDATE entries SET value = value + :delta, hlc = :hlc, node = :node "
    "WHERE key = :key AND tag = 0 AND (expire_at IS NULL OR expire_at > :now) "
    "AND CASE WHEN :delta >= 0 THEN value <= :max - :delta ELSE value >= :min - :delta END "
    "RETURNING value, expire_at"
)
SQL_TOUCH = ("UPDATE entries SET expire_at = ?, hlc = ?, node = ? "
             "WHERE key = ? AND tag != -1 AND (expire_at IS NULL OR expire_at > ?)")
SQL_TOUCH_ROW = SQL_TOUCH + " RETURNING tag, value, expire_at"
SQL_CLEAR = "DELETE FROM entries"
SQL_COUNT_ALL = "SELECT COUNT(*) FROM entries"
SQL_COUNT_LIVE = ("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries "
                  "WHERE tag != -1 AND (expire_at IS NULL OR expire_at > ?)")
SQL_PURGE = ("DELETE FROM entries WHERE key IN (SELECT key FROM entries "
             "WHERE expire_at IS NOT NULL AND expire_at <= ? LIMIT ?) RETURNING key")
# clustered: a tombstone also waits until every peer acknowledged the writes up to it
SQL_PURGE_CLUSTERED = ("DELETE FROM entries WHERE key IN (SELECT key FROM entries "
                       "WHERE expire_at IS NOT NULL AND expire_at <= ? "
                       "AND (tag != -1 OR hlc < ?) LIMIT ?) RETURNING key")
# active-active: an expired row becomes a tombstone of its version, kept for the window
# from its expiry (the base of value 0 that a counter then counts from, and the same row in
# the anti-entropy digest, on every node, whenever each purges it: mesh.py)
SQL_EXPIRED_TO_TOMBSTONE = (
    "UPDATE entries SET tag = -1, value = NULL, size = 0, expire_at = expire_at + ? "
    "WHERE key IN ("
    "SELECT key FROM entries WHERE expire_at IS NOT NULL AND expire_at <= ? AND tag != -1 "
    "LIMIT ?) RETURNING key")
# contributions no longer counted: their base is older than the row's version (or gone)
SQL_PURGE_COUNTERS = (
    "DELETE FROM counters WHERE (key, origin) IN (SELECT c.key, c.origin FROM counters c "
    "JOIN entries e ON e.key = c.key WHERE (c.base_hlc, c.base_node) < (e.hlc, e.node) "
    "LIMIT ?)")
# The oplog is trimmed from its oldest row up to a bound (upkeep.oplog_trim_bound), never
# its newest row: the next seq is max(seq) + 1 (OPLOG_FLOOR).
SQL_PURGE_OPLOG = ("DELETE FROM oplog WHERE seq IN (SELECT seq FROM oplog "
                   "WHERE seq <= ? AND seq < (SELECT max(seq) FROM oplog) ORDER BY seq LIMIT ?)")
# ... which, once the bound reaches it, becomes a floor row
SQL_FLOOR_OPLOG = (
    f"UPDATE oplog SET op = '{OPLOG_FLOOR}', key = NULL, tag = NULL, value = NULL, "
    "expire_at = NULL, hlc = 0, node = '', delta = NULL, origin_seq = NULL, base_hlc = NULL, "
    "base_node = NULL, total = NULL WHERE seq = (SELECT max(seq) FROM oplog) AND seq <= ? "
    f"AND op != '{OPLOG_FLOOR}'")
# the last row older than the tombstone window (oplog hlc grows with seq for local writes)
SQL_OPLOG_WINDOW_BOUND = ("SELECT COALESCE((SELECT seq FROM oplog WHERE hlc >= ? ORDER BY seq "
                          "LIMIT 1) - 1, (SELECT max(seq) FROM oplog), 0)")
SQL_PEERS_MIN_ACKED = "SELECT min(acked), count(*) FROM peers WHERE source = ?"
SQL_COUNT_LOCKS = "SELECT COUNT(*) FROM locks WHERE expire_at IS NULL OR expire_at > ?"
SQL_PURGE_LOCKS = ("DELETE FROM locks WHERE name IN (SELECT name FROM locks "
                   "WHERE expire_at IS NOT NULL AND expire_at <= ? LIMIT ?)")
SQL_EVICT_OLDEST = ("DELETE FROM entries WHERE key IN (SELECT key FROM entries "
                    "ORDER BY hlc LIMIT ?) RETURNING key")
SQL_EVICT_ALL_BUT = "DELETE FROM entries WHERE key NOT IN ({marks}) RETURNING key"
SQL_PAGES = "SELECT (SELECT page_count FROM pragma_page_count) - " \
            "(SELECT freelist_count FROM pragma_freelist_count)"
SQL_OPLOG = ("INSERT INTO oplog(op, key, tag, value, expire_at, hlc, node, delta, origin_seq, "
             "base_hlc, base_node, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# This node's last own sequence number: its last oplog row's (the oplog's last page is
# written anyway: no other page dirtied), or, once the oplog no longer holds one, the count
# kept in ``origins`` (upkeep raises it before trimming; a merged vector may raise it too).
_OWN_SEQ_OF = ("max(COALESCE((SELECT origin_seq FROM oplog WHERE node = {node} "
               "ORDER BY seq DESC LIMIT 1), 0), "
               "COALESCE((SELECT applied_seq FROM origins WHERE origin = {node}), 0))")
SQL_OWN_SEQ = "SELECT " + _OWN_SEQ_OF.format(node="?1")
SQL_KEEP_OWN_SEQ = f"UPDATE origins SET applied_seq = ({SQL_OWN_SEQ}) WHERE origin = ?1"

# The clustered one-statement ``set`` (``clock.SQL_PUT_LOGGED``): an insert into the view
# ``logged_put`` whose trigger writes the row and its oplog row, the very row
# ``Store.record`` writes for op 'set' (this node's next own sequence number; no delta, no
# base, no total), in the statement's own autocommit transaction: one commit, two pages
# (the row's and the oplog's last). The trigger runs only while the store is clustered; it
# then writes nothing, and ``Store.set`` takes the transaction path. A changed trigger
# needs a new schema version whose migration drops this one (IF NOT EXISTS keeps it).
# Made after the migrations, in the opening transaction: it names the oplog's version-2
# columns.
LOGGED_PUT = (
    "CREATE VIEW IF NOT EXISTS logged_put(key, tag, value, expire_at, size, hlc, node) AS "
    "SELECT key, tag, value, expire_at, size, hlc, node FROM entries WHERE 0",
    "CREATE TRIGGER IF NOT EXISTS logged_put_write INSTEAD OF INSERT ON logged_put "
    "WHEN EXISTS (SELECT 1 FROM meta WHERE name = 'clustered' AND value) BEGIN "
    "INSERT OR REPLACE INTO entries(key, tag, value, expire_at, size, hlc, node) "
    "VALUES (NEW.key, NEW.tag, NEW.value, NEW.expire_at, NEW.size, NEW.hlc, NEW.node); "
    "INSERT INTO oplog(op, key, tag, value, expire_at, hlc, node, origin_seq) "
    "VALUES ('set', NEW.key, NEW.tag, NEW.value, NEW.expire_at, NEW.hlc, NEW.node, "
    + _OWN_SEQ_OF.format(node="NEW.node") + " + 1); END",
)
SQL_ENSURE_ORIGIN = "INSERT OR IGNORE INTO origins(origin, applied_seq) VALUES (?, 0)"


SQL_LOCK_GET = "SELECT owner, expire_at, fence FROM locks WHERE name = ?"
SQL_LOCK_PUT = ("INSERT OR REPLACE INTO locks(name, owner, expire_at, fence, acquired_at) "
                "VALUES (?, ?, ?, ?, ?)")
SQL_LOCK_RELEASE = "DELETE FROM locks WHERE name = ? AND owner = ?"
SQL_LOCK_FORCE = "DELETE FROM locks WHERE name = ?"
SQL_LOCK_EXTEND = ("UPDATE locks SET expire_at = ? WHERE name = ? AND owner = ? "
                   "AND (expire_at IS NULL OR expire_at > ?)")
