"""The clustered one-statement ``set`` (the view ``logged_put`` and its trigger) and the
version-3 oplog (no AUTOINCREMENT: its numbering never goes back), on real files and
processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

import mp_helpers as mp
import store_mp_helpers as smp
from conftest import FakeClock
from hypercacheio.codec import TAG_BYTES, TAG_INT, TAG_STR
from hypercacheio.errors import StorageError
from hypercacheio.store import DB_NAME, SCHEMA_VERSION, TOMBSTONE_SECONDS, Store, upkeep

pytestmark = pytest.mark.timeout(120)

NOW = 1_800_000_000.0
OPLOG_ROW = ("SELECT seq, op, key, tag, value, expire_at, hlc, node, delta, origin_seq, "
             "base_hlc, base_node, total FROM oplog ORDER BY seq")


def _raw(store: Store, sql: str, *args: object) -> list[tuple[Any, ...]]:
    return store.conn().execute(sql, args).fetchall()


def _statements(store: Store) -> list[str]:
    """Every statement this thread's connection of ``store`` runs from now on."""
    seen: list[str] = []
    store.conn().set_trace_callback(seen.append)
    return seen


# ---- the one statement ---------------------------------------------------------------------


@pytest.mark.parametrize("multi_writer", [False, True], ids=["primary", "active-active"])
def test_a_clustered_set_is_one_statement_logging_what_record_logs(
        tmp_path: Path, clock: FakeClock, multi_writer: bool) -> None:
    s = Store(str(tmp_path / "a"), clock=clock)
    s.mark_clustered(True, multi_writer=multi_writer)
    seen = _statements(s)
    s.set("k", TAG_STR, "one", NOW + 60)
    assert not any(sql.startswith("BEGIN") for sql in seen)  # no transaction of its own
    assert any(sql.startswith("INSERT INTO logged_put") for sql in seen)
    assert s.last_version() == _raw(s, "SELECT hlc FROM entries WHERE key = 'k'")[0][0]
    seen.clear()
    s.set_many([("k", TAG_STR, "one", NOW + 60)])  # the same write through Store.record
    assert "BEGIN IMMEDIATE" in seen
    s.set("b", TAG_BYTES, b"\x00\xff", None)
    fast, slow, blob = _raw(s, OPLOG_ROW)
    assert fast[1:6] == slow[1:6] == ("set", "k", TAG_STR, "one", NOW + 60)
    assert fast[7:] == (s.node_id, None, 1, None, None, None)
    assert slow[7:] == (s.node_id, None, 2, None, None, None)
    assert blob[1:6] == ("set", "b", TAG_BYTES, b"\x00\xff", None) and blob[9] == 3
    assert fast[6] < slow[6] < blob[6]
    # ... and a replica takes both alike
    other = Store(str(tmp_path / "b"), clock=clock)
    other.mark_clustered(True, multi_writer=multi_writer)
    other.apply(s.oplog_since(0))
    assert other.get("k") == (TAG_STR, "one", NOW + 60)
    assert other.get("b") == (TAG_BYTES, b"\x00\xff", None)
    assert other.checksum() == s.checksum()


def test_a_plain_set_stays_the_plain_statement(cache_dir: str) -> None:
    s = Store(cache_dir)
    seen = _statements(s)
    s.set("k", TAG_INT, 1, None)
    assert [sql.split("(")[0] for sql in seen] == ["INSERT OR REPLACE INTO entries"]
    assert _raw(s, "SELECT COUNT(*) FROM oplog") == [(0,)]


def test_the_own_sequence_goes_on_from_the_version_vector(cache_dir: str,
                                                          clock: FakeClock) -> None:
    # Once the trims took this node's rows, its next number comes from ``origins`` (as
    # ``record``'s does): the trigger computes the same.
    s = Store(cache_dir, clustered=True, clock=clock)
    for i in range(3):
        s.set(f"k{i}", TAG_INT, i, None)
    clock.advance(TOMBSTONE_SECONDS + 1)
    s.purge_expired()  # every own row goes (the newest stays as a floor row, no node's)
    assert _raw(s, "SELECT seq, op, node, origin_seq FROM oplog") == [(3, "floor", "", None)]
    s.set("k", TAG_INT, 9, None)
    assert [r[9] for r in _raw(s, OPLOG_ROW)] == [None, 4]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_process_that_missed_the_mark_or_the_unmark_writes_right(cache_dir: str,
                                                                   method: str) -> None:
    ctx = multiprocessing.get_context(method)
    s = Store(cache_dir)
    s.set("a", TAG_INT, 1, None)  # this instance reads "plain"
    assert mp.run_all(ctx, smp.mark_clustered, [(cache_dir, True)]) == [True]
    s.set("b", TAG_INT, 2, None)  # nothing written by the plain statement: the other path
    assert s.clustered is True
    seen = _statements(s)
    s.set("c", TAG_INT, 3, None)  # and from now on, the logged statement
    assert any(sql.startswith("INSERT INTO logged_put") for sql in seen)
    assert [r[2] for r in _raw(s, OPLOG_ROW)] == ["b", "c"]
    assert mp.run_all(ctx, smp.mark_clustered, [(cache_dir, False)]) == [False]
    s.set("d", TAG_INT, 4, None)  # thinks clustered: nothing written, then the plain write
    assert s.clustered is False
    s.set("e", TAG_INT, 5, None)
    assert [r[2] for r in _raw(s, OPLOG_ROW)] == ["b", "c"]  # no row once unmarked
    assert [s.get(k) for k in "abcde"] == [(TAG_INT, i, None) for i in range(1, 6)]


def test_the_version_is_taken_under_the_write_lock(cache_dir: str) -> None:
    # A set that cannot get the write lock fails before it stamps: the clock does not move
    # (it would, were hcio_hlc evaluated before SQLite took the lock).
    s = Store(cache_dir, clustered=True, busy_timeout=0.2)
    s.set("k", TAG_STR, "v", None)
    last, mine = s.last_hlc(), s.last_version()
    holder = sqlite3.connect(s.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageError, match="busy_timeout=0.2 s"):
            s.set("k", TAG_STR, "w", None)
        assert (s.last_hlc(), s.last_version()) == (last, mine)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    s.set("k", TAG_STR, "w", None)
    assert s.last_hlc() > last and s.get("k") == (TAG_STR, "w", None)
    assert [r[2:5] for r in _raw(s, OPLOG_ROW)] == [("k", TAG_STR, "v"), ("k", TAG_STR, "w")]


def hammer(directory: str, barrier: Any, me: int, rounds: int,
           inherited: Store | None) -> list[str]:
    """Clustered writes of this writer's keys, all in one frozen millisecond: mostly the
    one-statement set, with increments (the transaction path) in between."""
    store = inherited or Store(directory, clock=smp.FrozenClock(NOW))
    keys: list[str] = []
    barrier.wait()
    for i in range(rounds):
        if i % 5 == 4:
            store.incr(f"n{me}", 1, None)
        else:
            key = f"w{me}:{i}"
            store.set(key, TAG_INT, i, None)
            keys.append(key)
    return keys


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_writers_hammering_one_clustered_store(cache_dir: str, method: str) -> None:
    parent = Store(cache_dir, clustered=True, clock=smp.FrozenClock(NOW))
    parent.set("warm", TAG_INT, 0, None)  # a connection and a flag inherited by fork
    ctx = multiprocessing.get_context(method)
    writers, rounds = 4, 150
    barrier = ctx.Barrier(writers)
    inherited = parent if method == "fork" else None
    results = mp.run_all(ctx, hammer, [(cache_dir, barrier, me, rounds, inherited)
                                       for me in range(writers)])
    rows = _raw(parent, "SELECT seq, op, key, hlc, node, origin_seq FROM oplog ORDER BY seq")
    total = 1 + writers * rounds
    assert [r[0] for r in rows] == list(range(1, total + 1))  # no row lost, none reused
    hlcs = [r[3] for r in rows]
    assert hlcs == sorted(set(hlcs)), "oplog order is not version order"
    assert [r[5] for r in rows] == list(range(1, total + 1))  # own sequence: contiguous
    assert {r[4] for r in rows} == {parent.node_id}
    logged = {r[2]: r[3] for r in rows if r[1] == "set"}
    for keys in results:
        for key in keys:  # every set's row is there, with the version its oplog row holds
            assert _raw(parent, "SELECT hlc FROM entries WHERE key = ?", key) == [(logged[key],)]
    assert len(logged) == 1 + writers * rounds * 4 // 5
    for me in range(writers):
        assert parent.get(f"n{me}") == (TAG_INT, rounds // 5, None)


def test_threads_of_one_process_share_the_path(cache_dir: str) -> None:
    s = Store(cache_dir, clustered=True, clock=smp.FrozenClock(NOW))
    errors: list[BaseException] = []

    def write(me: int) -> None:
        try:
            for i in range(100):
                s.set(f"t{me}:{i}", TAG_INT, i, None)
                assert s.last_version() == _raw(s, "SELECT hlc FROM entries WHERE key = ?",
                                                f"t{me}:{i}")[0][0]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(me,)) for me in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = _raw(s, "SELECT hlc, origin_seq FROM oplog ORDER BY seq")
    assert [r[1] for r in rows] == list(range(1, 401))
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})


# ---- the numbering never goes back -----------------------------------------------------------


def test_the_trims_keep_the_newest_row(cache_dir: str, clock: FakeClock) -> None:
    s = Store(cache_dir, clustered=True, clock=clock)
    for i in range(5):
        s.set(f"k{i}", TAG_INT, i, None)
    clock.advance(TOMBSTONE_SECONDS + 1)
    s.purge_expired()  # every row is past the window, and no peer waits for any
    assert _raw(s, "SELECT seq, op, hlc FROM oplog") == [(5, "floor", 0)]  # no write now
    assert s.oplog_since(0) == [] and s.oplog_bounds() == (6, 5)  # read as emptied
    assert s.oplog_position() == 5 and s.can_resume(5) and not s.can_resume(4)
    s.set("k", TAG_INT, 1, None)
    assert [r.seq for r in s.oplog_since(0)] == [6]  # not 1: a peer at 5 would skip it
    s.purge_expired()  # the window keeps the new row; the floor below it goes
    assert _raw(s, "SELECT seq, op FROM oplog") == [(6, "set")]


V2_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE entries (key TEXT PRIMARY KEY, tag INTEGER NOT NULL, value, expire_at REAL,
    size INTEGER NOT NULL, hlc INTEGER NOT NULL, node TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX entries_expire ON entries(expire_at) WHERE expire_at IS NOT NULL;
CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expire_at REAL,
    fence INTEGER NOT NULL, acquired_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE oplog (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, key TEXT,
    tag INTEGER, value, expire_at REAL, hlc INTEGER NOT NULL, node TEXT NOT NULL,
    delta INTEGER, origin_seq INTEGER, base_hlc INTEGER, base_node TEXT, total INTEGER);
CREATE TABLE origins (origin TEXT PRIMARY KEY, applied_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE origin_pending (origin TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (origin, seq)) WITHOUT ROWID;
CREATE TABLE counters (key TEXT NOT NULL, origin TEXT NOT NULL, base_hlc INTEGER NOT NULL,
    base_node TEXT NOT NULL, total INTEGER NOT NULL, origin_seq INTEGER NOT NULL,
    expire_at REAL, PRIMARY KEY (key, origin)) WITHOUT ROWID;
CREATE TABLE peers (peer TEXT PRIMARY KEY, acked INTEGER NOT NULL, source TEXT NOT NULL,
    updated_at REAL NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', 2), ('node_id', 'v2node'), ('fence', 0),
    ('hlc', 0), ('clustered', 1), ('multi_writer', 0), ('cleared_hlc', 0),
    ('cleared_node', '');
INSERT INTO origins VALUES ('v2node', 0);
INSERT INTO entries VALUES ('old', 2, 'kept', NULL, 7, 123 << 16, 'v2node');
"""


def _v2_database(directory: Path, rows: int, kept: int) -> None:
    """A version-2 database whose oplog numbered ``rows`` writes and keeps the last
    ``kept`` (the others trimmed: AUTOINCREMENT remembers the last seq regardless)."""
    directory.mkdir()
    conn = sqlite3.connect(directory / DB_NAME)
    conn.executescript(V2_SCHEMA)
    for i in range(1, rows + 1):
        conn.execute("INSERT INTO oplog(op, key, tag, value, expire_at, hlc, node, origin_seq) "
                     "VALUES ('set', 'old', 2, 'kept', NULL, ?, 'v2node', ?)", ((100 + i) << 16, i))
    conn.execute("DELETE FROM oplog WHERE seq <= ?", (rows - kept,))
    conn.execute("UPDATE origins SET applied_seq = ?", (rows,))  # upkeep raises it on trims
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("rows", "kept"), [(0, 0), (6, 6), (6, 2), (41, 0)],
                         ids=["never-written", "rows", "trimmed", "emptied"])
def test_a_version_2_database_opens_as_version_3(tmp_path: Path, rows: int, kept: int) -> None:
    directory = tmp_path / "v2"
    _v2_database(directory, rows, kept)
    s = Store(str(directory), clock=FakeClock())
    assert s.node_meta("schema_version") == SCHEMA_VERSION == 3
    assert s.node_id == "v2node" and s.clustered and s.get("old") == (TAG_STR, "kept", None)
    assert _raw(s, "SELECT name FROM sqlite_master WHERE sql LIKE '%AUTOINCREMENT%'") == []
    assert s.oplog_position() == rows
    assert [r.seq for r in s.oplog_since(0)] == list(range(rows - kept + 1, rows + 1))
    assert s.oplog_bounds().oldest == rows - kept + 1
    assert s.can_resume(rows) and (kept == rows or not s.can_resume(rows - kept - 1))
    s.set("new", TAG_INT, 1, None)  # the one statement
    s.incr("n", 1, None)  # the transaction path
    fresh = s.oplog_since(rows)
    assert [(r.seq, r.key, r.origin_seq) for r in fresh] == [
        (rows + 1, "new", rows + 1), (rows + 2, "n", rows + 2)]
    assert [r.seq for r in s.oplog_since(0)] == list(range(rows - kept + 1, rows + 3))
    # the trims go on keeping the numbering (a floor row, if any, goes with them)
    clock = FakeClock(NOW + TOMBSTONE_SECONDS * 3)
    s.clock = clock
    s.purge_expired()
    assert _raw(s, "SELECT seq, op FROM oplog") == [(rows + 2, "floor")]
    s.set("later", TAG_INT, 2, None)
    assert [r.seq for r in s.oplog_since(rows + 2)] == [rows + 3]


def test_an_emptied_version_2_oplog_skips_its_floor_everywhere(tmp_path: Path) -> None:
    directory = tmp_path / "v2"
    _v2_database(directory, 41, 0)
    clock = FakeClock()
    s = Store(str(directory), clock=clock)
    assert _raw(s, "SELECT seq, op FROM oplog") == [(41, "floor")]  # the numbering's floor
    assert s.oplog_since(0) == [] and s.oplog_bounds() == (42, 41)
    s.peer_ack("behind", 30)  # a peer that needs a snapshot: the floor is no write of ours
    assert not s.can_resume(30) and s.can_resume(41)
    assert s.snapshot_begin().position == 41
    s.set("k", TAG_STR, "v", None)
    assert [(r.seq, r.op) for r in s.oplog_since(0)] == [(42, "set")]
    # tombstones wait for the oldest write the peer lacks, not for the floor's version 0
    with s.transaction() as txn:
        assert upkeep.tombstone_bound(s, txn) == s.oplog_since(0)[0].hlc


def test_a_new_database_has_the_view_and_no_autoincrement(cache_dir: str) -> None:
    s = Store(cache_dir, clustered=True)
    s.set("k", TAG_INT, 1, None)
    tables = {r[0] for r in _raw(s, "SELECT name FROM sqlite_master")}
    assert {"logged_put", "logged_put_write", "oplog"} <= tables
    assert "sqlite_sequence" not in tables  # no AUTOINCREMENT table left
