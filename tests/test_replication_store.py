"""Replication at the store: complete oplog records, apply by last writer wins, snapshots,
persisted peer positions and the oplog trim rule (two real SQLite stores, no HTTP)."""

from __future__ import annotations

import os
import pickle
import sqlite3
from pathlib import Path

import pytest

from conftest import FakeClock
from hypercacheio import Cache
from hypercacheio.codec import TAG_BYTES, TAG_INT, TAG_PICKLE, TAG_STR, TAG_TOMBSTONE
from hypercacheio.errors import HypercacheioError, ReplicationError
from hypercacheio.l1 import slot_of
from hypercacheio.replication import ApplyResult, Record
from hypercacheio.store import SCHEMA_VERSION, TOMBSTONE_SECONDS, Store


def _raw(store: Store, sql: str, *args: object) -> list[tuple[object, ...]]:
    return store.conn().execute(sql, args).fetchall()


@pytest.fixture
def primary(tmp_path: Path, clock: FakeClock) -> Store:
    return Store(str(tmp_path / "primary"), clustered=True, clock=clock)


@pytest.fixture
def secondary(tmp_path: Path, clock: FakeClock) -> Store:
    return Store(str(tmp_path / "secondary"), clock=clock)


def ship(primary: Store, secondary: Store, since: int = 0) -> int:
    """Every oplog record after ``since`` applied to the secondary; the new position."""
    while True:
        batch = primary.oplog_since(since, 500)
        if not batch:
            return since
        secondary.apply(batch)
        since = batch[-1].seq


# ---- what the oplog records --------------------------------------------------------------


def test_every_write_verb_records_what_a_replica_needs(primary: Store, clock: FakeClock) -> None:
    p = primary
    p.set("s", TAG_STR, "v", clock.now + 50)
    p.set_many([("m1", TAG_BYTES, b"\x00\xff", None), ("m2", TAG_INT, 7, None)])
    assert p.add("a", TAG_STR, "first", None) is True
    assert p.add("a", TAG_STR, "second", None) is False  # no row for a refused add
    p.set("n", TAG_INT, 10, clock.now + 99)
    assert p.incr("n", 5, None) == 15
    assert p.incr("n", -20, None) == -5
    assert p.incr("fresh", 3, clock.now + 7) == 3
    assert p.touch("s", clock.now + 500) is True
    assert p.touch("missing", clock.now + 500) is False
    assert p.delete("m1") is True
    assert p.delete_many(["m2", "missing"]) == 1
    assert p.pull("a") == (TAG_STR, "first", None)
    p.clear()
    got = [(r.op, r.key, r.tag, r.value, r.expire_at, r.delta) for r in p.oplog_since(0, 100)]
    tomb = clock.now + TOMBSTONE_SECONDS
    assert got == [
        ("set", "s", TAG_STR, "v", clock.now + 50, None),
        ("set", "m1", TAG_BYTES, b"\x00\xff", None, None),
        ("set", "m2", TAG_INT, 7, None, None),
        ("set", "a", TAG_STR, "first", None, None),
        ("set", "n", TAG_INT, 10, clock.now + 99, None),
        ("incr", "n", TAG_INT, 15, clock.now + 99, 5),  # the result, the row's expiry, delta
        ("incr", "n", TAG_INT, -5, clock.now + 99, -20),
        ("incr", "fresh", TAG_INT, 3, clock.now + 7, 3),
        ("touch", "s", None, None, clock.now + 500, None),
        ("delete", "m1", None, None, tomb, None),  # the tombstone's end
        ("delete", "m2", None, None, tomb, None),
        ("delete", "a", None, None, tomb, None),
        ("clear", None, None, None, None, None),
    ]
    records = p.oplog_since(0, 100)
    assert [r.seq for r in records] == list(range(1, 14))
    assert all(r.node == p.node_id for r in records)
    assert [r.hlc for r in records] == sorted(r.hlc for r in records)
    assert p.oplog_position() == 13
    assert p.oplog_since(11, 1) == [records[11]]


def test_set_many_logs_one_row_per_key_the_last(primary: Store, secondary: Store) -> None:
    # The rows of one transaction share its version: two of one key could not be ordered.
    primary.set_many([("k", TAG_INT, 1, None), ("j", TAG_INT, 0, None), ("k", TAG_INT, 2, None)])
    assert [(r.key, r.value) for r in primary.oplog_since(0, 10)] == [("k", 2), ("j", 0)]
    ship(primary, secondary)
    assert secondary.get("k") == (TAG_INT, 2, None)


def test_evictions_and_expiry_purges_are_local(tmp_path: Path, clock: FakeClock) -> None:
    s = Store(str(tmp_path / "p"), clustered=True, clock=clock, max_entries=4,
              cull_frequency=2)
    for i in range(6):
        s.set(f"k{i}", TAG_INT, i, clock.now + 10 if i == 0 else None)
    clock.advance(11)
    s.purge_expired()
    assert {r.op for r in s.oplog_since(0, 100)} == {"set"}  # no row for culls, purges
    assert len(s.oplog_since(0, 100)) == 6


# ---- apply: last writer wins -------------------------------------------------------------


def test_apply_converges_and_is_idempotent(primary: Store, secondary: Store,
                                           clock: FakeClock) -> None:
    primary.set("a", TAG_STR, "x", clock.now + 30)
    primary.incr("n", 4, None)
    primary.set("p", TAG_PICKLE, pickle.dumps({"deep": [1, 2]}), None)
    batch = primary.oplog_since(0, 100)
    assert secondary.apply(batch) == ApplyResult(3, 0)
    assert secondary.apply(batch) == ApplyResult(0, 3)  # a replay changes nothing
    assert secondary.checksum(versions=True) == primary.checksum(versions=True)
    assert secondary.get("n") == (TAG_INT, 4, None)
    # the primary's versions, not new local ones
    assert _raw(secondary, "SELECT key, hlc, node FROM entries ORDER BY key") == \
        _raw(primary, "SELECT key, hlc, node FROM entries ORDER BY key")


def test_an_older_version_never_overwrites_a_newer(primary: Store, secondary: Store) -> None:
    primary.set("k", TAG_STR, "old", None)
    primary.set("k", TAG_STR, "new", None)
    old, new = primary.oplog_since(0, 10)
    assert secondary.apply([new]) == ApplyResult(1, 0)
    assert secondary.apply([old]) == ApplyResult(0, 1)
    assert secondary.get("k") == (TAG_STR, "new", None)


def test_same_hlc_is_ordered_by_node_id(secondary: Store) -> None:
    a = Record(1, "set", "k", TAG_STR, "from-a", None, 1 << 40, "aaaa")
    b = Record(1, "set", "k", TAG_STR, "from-b", None, 1 << 40, "bbbb")
    secondary.apply([b])
    secondary.apply([a])
    assert secondary.get("k") == (TAG_STR, "from-b", None)
    secondary.apply([a._replace(key="j")])  # either order: every node picks the same winner
    secondary.apply([b._replace(key="j")])
    assert secondary.get("j") == (TAG_STR, "from-b", None)


def test_a_delete_is_never_undone_by_a_late_set(primary: Store, secondary: Store,
                                                clock: FakeClock) -> None:
    primary.set("k", TAG_STR, "v", None)
    primary.delete("k")
    put, delete = primary.oplog_since(0, 10)
    # the delete arrives first, for a key the secondary never saw: it still leaves a tombstone
    assert secondary.apply([delete]) == ApplyResult(1, 0)
    assert _raw(secondary, "SELECT tag, expire_at FROM entries WHERE key = 'k'") == [
        (TAG_TOMBSTONE, clock.now + TOMBSTONE_SECONDS)]
    assert secondary.apply([put]) == ApplyResult(0, 1)  # the late set
    assert secondary.get("k") is None
    assert secondary.apply([delete, put]) == ApplyResult(0, 2)  # a replay, reordered
    assert secondary.get("k") is None


def test_touch_changes_the_expiry_only_if_newer(primary: Store, secondary: Store,
                                                clock: FakeClock) -> None:
    primary.set("k", TAG_STR, "v", clock.now + 10)
    primary.touch("k", clock.now + 100)
    primary.set("k", TAG_STR, "w", clock.now + 20)
    put1, touch, put2 = primary.oplog_since(0, 10)
    secondary.apply([put1, put2])
    assert secondary.apply([touch]) == ApplyResult(0, 1)
    assert secondary.get("k") == (TAG_STR, "w", clock.now + 20)
    assert secondary.apply([Record(9, "touch", "gone", None, None, 5.0, 1 << 60, "x")]) == \
        ApplyResult(0, 1)  # nothing to touch
    assert secondary.get("gone") is None


def test_reordering_within_a_batch_is_harmless(primary: Store, secondary: Store,
                                               clock: FakeClock) -> None:
    primary.set("k", TAG_STR, "v", clock.now + 10)
    primary.touch("k", clock.now + 100)
    primary.incr("n", 1, None)
    primary.incr("n", 1, None)
    batch = primary.oplog_since(0, 10)
    secondary.apply(list(reversed(batch)))
    assert secondary.checksum(versions=True) == primary.checksum(versions=True)
    assert secondary.get("k") == (TAG_STR, "v", clock.now + 100)
    assert secondary.get("n") == (TAG_INT, 2, None)


def test_clear_removes_only_older_entries(primary: Store, secondary: Store) -> None:
    primary.set("before", TAG_INT, 1, None)
    primary.clear()
    primary.set("after", TAG_INT, 2, None)
    before, clear, after = primary.oplog_since(0, 10)
    secondary.apply([after])  # newer than the clear: stays
    secondary.apply([clear])
    assert secondary.get("after") == (TAG_INT, 2, None)
    assert secondary.apply([before]) == ApplyResult(0, 1)  # older than the clear: never back
    assert secondary.get("before") is None
    assert secondary.checksum() == primary.checksum()


def test_apply_moves_the_clock_and_publishes_l1_tokens(
        primary: Store, secondary: Store, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    future = (int((clock.now + 3600) * 1000) << 16) + 5  # a peer an hour ahead
    token = secondary.tokens.tokens[slot_of("k")]
    secondary.apply([Record(1, "set", "k", TAG_STR, "v", None, future, "peer")])
    assert "3600 s ahead of this host's clock (node peer)" in caplog.text
    assert secondary.tokens.tokens[slot_of("k")] != token
    assert secondary.last_hlc() >= future
    secondary.set("local", TAG_INT, 1, None)  # a later local write stamps beyond it
    assert int(_raw(secondary, "SELECT hlc FROM entries WHERE key = 'local'")[0][0]) > future  # type: ignore[call-overload]
    reopened = Store(secondary.directory, clock=clock)  # persisted in meta, too
    assert int(reopened.node_meta("hlc")) >= future


def test_a_coherent_l1_sees_applied_writes(tmp_path: Path, primary: Store,
                                           clock: FakeClock) -> None:
    # An app process on the secondary host has the key in its L1 when the primary's write
    # arrives: its next get is the new value (and after a replicated clear, a miss).
    cache = Cache(str(tmp_path / "secondary"), clock=clock, l1_max_items=100)
    primary.set("k", TAG_STR, "one", None)
    cache.store.apply(primary.oplog_since(0, 10))  # another Store instance of the same file
    assert cache.get("k") == "one" and cache.get("k") == "one"  # now in L1
    reader = Store(str(tmp_path / "secondary"), clock=clock)
    primary.set("k", TAG_STR, "two", None)
    reader.apply(primary.oplog_since(1, 10))
    assert cache.get("k") == "two"
    primary.clear()
    reader.apply(primary.oplog_since(2, 10))
    assert cache.get("k") is None


def test_applied_records_are_not_logged_again_unless_relayed(tmp_path: Path,
                                                             primary: Store,
                                                             clock: FakeClock) -> None:
    other = Store(str(tmp_path / "other"), clustered=True, clock=clock)
    primary.set("k", TAG_STR, "v", None)
    primary.delete("k")
    primary.set("j", TAG_STR, "w", None)
    batch = primary.oplog_since(0, 10)
    other.apply(batch[:1])
    assert other.oplog_position() == 0  # no echo
    other.apply(batch[1:], relay=True)
    relayed = other.oplog_since(0, 10)
    assert [(r.op, r.key, r.hlc, r.node) for r in relayed] == [
        (r.op, r.key, r.hlc, r.node) for r in batch[1:]]  # the origin's versions


def test_an_unknown_op_applies_nothing(primary: Store, secondary: Store) -> None:
    primary.set("k", TAG_STR, "v", None)
    good = primary.oplog_since(0, 10)[0]
    with pytest.raises(ReplicationError, match="unknown replication op 'merge'") as info:
        secondary.apply([good, good._replace(seq=2, op="merge")])
    assert isinstance(info.value, HypercacheioError) and isinstance(info.value, ValueError)
    for bad in (good._replace(key=None), good._replace(op="delete", key=""),
                good._replace(value=None), good._replace(tag=-1), good._replace(hlc=0),
                good._replace(node="")):
        with pytest.raises(ReplicationError):
            secondary.apply([good, bad])
    assert secondary.get("k") is None
    assert secondary.live_digest() == (0, Store(secondary.directory + "-empty").checksum())


def test_a_pickle_is_moved_never_loaded(primary: Store, secondary: Store) -> None:
    # A pickle whose class does not exist anywhere: the secondary stores the bytes as they are.
    raw = b"\x80\x04\x95\x14\x00\x00\x00\x00\x00\x00\x00\x8c\x06nowhere\x94\x8c\x03Cls\x94\x93\x94."
    primary.set("p", TAG_PICKLE, raw, None)
    ship(primary, secondary)
    assert secondary.get("p") == (TAG_PICKLE, raw, None)


def test_a_secondary_with_max_entries_culls_locally(tmp_path: Path, primary: Store,
                                                    clock: FakeClock) -> None:
    small = Store(str(tmp_path / "small"), clock=clock, max_entries=10, cull_frequency=2)
    for i in range(30):
        primary.set(f"k{i:02}", TAG_INT, i, None)
    ship(primary, small)  # one transaction of 30 rows: one cull, of (30 - 1) // 2
    assert small.live_digest()[0] == 30 - 29 // 2


# ---- positions, bounds and trimming -------------------------------------------------------


def test_peer_positions_persist_across_reopen(primary: Store, clock: FakeClock) -> None:
    assert primary.peer_positions() == []
    primary.peer_ack("http://s1", 5)
    primary.peer_ack("http://s1", 3)  # a late, older ack does not move it back
    primary.peer_ack("http://s2", 9, "other-db")
    directory = primary.directory
    primary.close()
    reopened = Store(directory, clock=clock)
    got = {(p.peer, p.acked, p.source, p.updated_at) for p in reopened.peer_positions()}
    assert got == {("http://s1", 5, reopened.node_id, clock.now),
                   ("http://s2", 9, "other-db", clock.now)}
    # a position in another database's oplog (a recreated primary) starts a new count
    assert reopened.peer_ack("http://s2", 2, "new-db").acked == 2
    assert reopened.peer_forget("http://s2") is True
    assert reopened.peer_position("http://s2") is None
    with pytest.raises(ValueError):
        reopened.peer_ack("http://s1", -1)


def test_apply_records_its_position_in_the_same_transaction(primary: Store, secondary: Store,
                                                            clock: FakeClock) -> None:
    for i in range(5):
        primary.set(f"k{i}", TAG_INT, i, None)
    batch = primary.oplog_since(0, 3)
    secondary.apply(batch, ack=("primary", primary.node_id))
    position = secondary.peer_position("primary")
    assert position is not None and (position.acked, position.source) == (3, primary.node_id)
    secondary.apply(batch[:1], ack=("primary", primary.node_id))  # a replay
    assert secondary.peer_position("primary").acked == 3  # type: ignore[union-attr]


def test_a_failed_apply_records_no_position(primary: Store, secondary: Store) -> None:
    primary.set("k", TAG_INT, 1, None)
    batch = primary.oplog_since(0, 3)
    secondary.conn().execute("CREATE TRIGGER boom BEFORE INSERT ON entries "
                             "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(HypercacheioError):
        secondary.apply(batch, ack=("primary", primary.node_id))
    assert secondary.peer_position("primary") is None


def test_the_oplog_keeps_what_a_peer_has_not_acknowledged(primary: Store,
                                                          clock: FakeClock) -> None:
    for i in range(10):
        primary.set(f"k{i}", TAG_INT, i, None)
    primary.purge_expired()
    assert primary.oplog_bounds() == (1, 10)  # no peer known: the window keeps all
    primary.peer_ack("s1", 4)
    primary.peer_ack("s2", 7)
    primary.peer_ack("elsewhere", 9, "another-db")  # a position in another oplog: ignored
    primary.purge_expired()
    assert primary.oplog_bounds() == (5, 10)  # what s1 has not acknowledged stays
    assert primary.can_resume(4) and primary.can_resume(10)
    assert not primary.can_resume(3)  # its rows are gone: a snapshot
    assert not primary.can_resume(11)  # a position this oplog never had: a snapshot
    primary.peer_ack("s1", 10)
    primary.purge_expired()
    assert primary.oplog_bounds() == (8, 10)
    clock.advance(TOMBSTONE_SECONDS + 1)  # past the window even s2's rows go
    primary.set("late", TAG_INT, 0, None)
    primary.purge_expired()
    assert primary.oplog_bounds() == (11, 11)
    assert not primary.can_resume(7)
    primary.peer_forget("s2")
    primary.peer_ack("s1", 11)
    primary.purge_expired()
    assert primary.oplog_bounds() == (12, 11)  # empty, the position stays
    assert primary.oplog_position() == 11 and primary.can_resume(11)


# ---- snapshots ----------------------------------------------------------------------------


def test_snapshot_holds_live_rows_and_tombstones_in_key_order(primary: Store,
                                                              clock: FakeClock) -> None:
    for key in ["c", "a", "e", "b", "d"]:
        primary.set(key, TAG_STR, key * 2, None)
    primary.set("x", TAG_STR, "soon", clock.now + 1)
    primary.delete("b")
    clock.advance(2)  # x expires: not in the snapshot
    start = primary.snapshot_begin()
    assert start.position == primary.oplog_position() and start.source == primary.node_id
    chunks = list(primary.snapshot_chunks(start, limit=2))
    assert [c.done for c in chunks] == [False, False, True]
    rows = [row for c in chunks for row in c.rows]
    assert [(r.key, r.tag, r.value) for r in rows] == [
        ("a", TAG_STR, "aa"), ("b", TAG_TOMBSTONE, None), ("c", TAG_STR, "cc"),
        ("d", TAG_STR, "dd"), ("e", TAG_STR, "ee")]
    assert [c.after for c in chunks] == [None, "b", "d"]
    assert all(r.hlc <= start.hlc for r in rows)
    primary.set("z", TAG_STR, "later", None)
    assert primary.oplog_since(start.position, 10)[0].key == "z"


def test_snapshot_replaces_the_ranges_it_covers(tmp_path: Path, primary: Store,
                                                clock: FakeClock) -> None:
    old_clock = FakeClock(clock.now - 3600)
    stale = Store(str(tmp_path / "stale"), clock=old_clock)  # a secondary away for long
    stale.set_many([("a", TAG_STR, "old", None), ("gone", TAG_STR, "deleted there", None),
                    ("zz", TAG_STR, "never there", None), ("c", TAG_STR, "old", None)])
    for key in ["a", "b", "c", "d"]:
        primary.set(key, TAG_STR, "new", None)
    start = primary.snapshot_begin()
    primary.set("c", TAG_STR, "newest", None)  # between start and chunks
    ahead = primary.oplog_since(start.position, 10)
    stale.apply(ahead)  # a newer row the secondary already holds survives the snapshot
    for chunk in primary.snapshot_chunks(start, limit=2):
        stale.apply_snapshot(chunk, ack="primary")
    assert stale.checksum(versions=True) == primary.checksum(versions=True)
    assert stale.get("gone") is None and stale.get("zz") is None
    position = stale.peer_position("primary")
    assert position is not None
    assert (position.acked, position.source) == (start.position, primary.node_id)
    assert stale.last_hlc() >= start.hlc


def test_snapshot_carries_the_last_clear(primary: Store, secondary: Store) -> None:
    primary.set("a", TAG_INT, 1, None)
    early = primary.oplog_since(0, 1)
    primary.clear()
    primary.set("b", TAG_INT, 2, None)
    start = primary.snapshot_begin()
    assert (start.cleared_hlc, start.cleared_node) == (
        primary.oplog_since(1, 1)[0].hlc, primary.node_id)
    for chunk in primary.snapshot_chunks(start):
        secondary.apply_snapshot(chunk)
    assert secondary.apply(early) == ApplyResult(0, 1)  # a write from before the clear
    assert secondary.checksum() == primary.checksum()


# ---- the schema ---------------------------------------------------------------------------


# a version-1 database of node 'v1node' (its rows: each test adds its own)
V1_TABLES = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE entries (key TEXT PRIMARY KEY, tag INTEGER NOT NULL, value, expire_at REAL,
    size INTEGER NOT NULL, hlc INTEGER NOT NULL, node TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expire_at REAL,
    fence INTEGER NOT NULL, acquired_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE oplog (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, key TEXT,
    tag INTEGER, value, expire_at REAL, hlc INTEGER NOT NULL, node TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', 1), ('node_id', 'v1node'), ('fence', 3);
"""
V1_SCHEMA = V1_TABLES + """
INSERT INTO entries VALUES ('old', 2, 'kept', NULL, 7, 123 << 16, 'v1node');
INSERT INTO oplog(op, key, tag, value, expire_at, hlc, node)
    VALUES ('set', 'old', 2, 'kept', NULL, 123 << 16, 'v1node');
"""


def test_a_version_1_database_is_upgraded(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "v1"
    os.makedirs(directory)
    conn = sqlite3.connect(directory / "hypercacheio.sqlite")
    conn.executescript(V1_SCHEMA)
    conn.close()
    s = Store(str(directory), clustered=True, clock=clock)
    assert s.node_meta("schema_version") == SCHEMA_VERSION == 3
    assert s.node_id == "v1node" and s.get("old") == (TAG_STR, "kept", None)
    assert s.oplog_since(0, 5)[0].delta is None  # the old row, a new column
    s.incr("n", 2, None)
    assert s.oplog_since(1, 5)[0][1:4] == ("incr", "n", TAG_INT)
    assert s.oplog_since(1, 5)[0].delta == 2
    s.peer_ack("peer", 2)
    assert s.peer_position("peer") is not None
    assert s.last_hlc() > 123 << 16
