"""store: the SQLite file, its pragmas, the one write path, collection, limits, bad paths."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest

from conftest import FakeClock
from hypercacheio import Cache, StorageError
from hypercacheio.codec import TAG_INT, TAG_STR, TAG_TOMBSTONE
from hypercacheio.store import (
    DB_NAME,
    GC_BATCH,
    SCHEMA_VERSION,
    SIZE_CHECK_EVERY,
    TOMBSTONE_SECONDS,
    Store,
    filesystem_type,
)


def _raw(store: Store, sql: str, *args: object) -> list[tuple[object, ...]]:
    return store.conn().execute(sql, args).fetchall()


def test_pragmas_and_schema(cache_dir: str) -> None:
    s = Store(cache_dir)
    conn = s.conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] > 0
    assert s.node_meta("schema_version") == SCHEMA_VERSION
    tables = {r[0] for r in _raw(s, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "entries", "locks", "oplog"} <= tables
    assert not conn.in_transaction  # reads leave no transaction open
    s.close()


def test_node_id_persists(cache_dir: str) -> None:
    a = Store(cache_dir)
    b = Store(cache_dir)
    assert a.node_id == b.node_id and len(a.node_id) == 16
    assert Store(cache_dir + "-other").node_id != a.node_id


def test_reopen_keeps_data(cache_dir: str) -> None:
    s = Store(cache_dir)
    s.set("k", TAG_STR, "v", None)
    s.close()
    assert Store(cache_dir).get("k") == (TAG_STR, "v", None)


def test_close_then_use_reopens(cache_dir: str) -> None:
    s = Store(cache_dir)
    s.set("k", TAG_INT, 1, None)
    s.close()
    s.close()  # twice is fine
    assert s.get("k") == (TAG_INT, 1, None)


def test_newer_schema_refused(cache_dir: str) -> None:
    s = Store(cache_dir)
    s.conn().execute("UPDATE meta SET value = ? WHERE name = 'schema_version'",
                     (SCHEMA_VERSION + 1,))
    s.close()
    with pytest.raises(StorageError, match="upgrade hypercacheio"):
        Store(cache_dir)


def test_hlc_strictly_grows(clock: FakeClock, cache_dir: str) -> None:
    s = Store(cache_dir, clock=clock)
    stamps = []
    for i in range(5):
        s.set("k", TAG_INT, i, None)
        stamps.append(_raw(s, "SELECT hlc FROM entries WHERE key='k'")[0][0])
    clock.advance(-10)  # the wall clock steps back: versions must not
    s.set("k", TAG_INT, 9, None)
    stamps.append(_raw(s, "SELECT hlc FROM entries WHERE key='k'")[0][0])
    assert stamps == sorted(set(stamps))


def test_failed_write_rolls_back(cache_dir: str) -> None:
    s = Store(cache_dir)
    s.set("k", TAG_INT, 1, None)
    with pytest.raises(RuntimeError), s.transaction() as txn:
        s._put(txn, "k", TAG_INT, 2, None)
        s._put(txn, "other", TAG_INT, 3, None)
        raise RuntimeError("boom")
    assert s.get("k") == (TAG_INT, 1, None)
    assert s.get("other") is None
    assert not s.conn().in_transaction


def test_writes_publish_tokens(cache_dir: str) -> None:
    from hypercacheio.l1 import slot_of

    s = Store(cache_dir)
    before = s.tokens.tokens[slot_of("k")]
    s.set("k", TAG_INT, 1, None)
    after = s.tokens.tokens[slot_of("k")]
    assert after != before
    s.delete("k")
    assert s.tokens.tokens[slot_of("k")] != after


# ---- clustered: tombstones and oplog -------------------------------------------------------


def test_clustered_keeps_tombstones_and_oplog(cache_dir: str, clock: FakeClock) -> None:
    s = Store(cache_dir, clustered=True, clock=clock)
    s.set("k", TAG_STR, "v", None)
    assert s.delete("k") is True
    assert s.get("k") is None
    assert s.delete("k") is False
    row = _raw(s, "SELECT tag, expire_at FROM entries WHERE key='k'")
    assert row == [(TAG_TOMBSTONE, clock.now + TOMBSTONE_SECONDS)]
    assert s.add("k", TAG_STR, "again", None) is True  # a tombstone does not block add
    assert s.get("k") == (TAG_STR, "again", None)
    s.delete("k")
    assert s.incr("k", 2, None) == 2  # nor incr
    s.set("p", TAG_STR, "x", None)
    assert s.pull("p") == (TAG_STR, "x", None)
    ops = [r[0] for r in _raw(s, "SELECT op FROM oplog ORDER BY seq")]
    assert ops == ["set", "delete", "set", "delete", "incr", "set", "delete"]
    assert s.stats()["entries"] == 1
    clock.advance(TOMBSTONE_SECONDS + 1)
    s.set("recent", TAG_STR, "x", None)
    assert s.purge_expired() == 1  # the tombstone of "p" goes after its window
    assert _raw(s, "SELECT key FROM entries") == [("k",), ("recent",)]
    # ... and so do the oplog rows older than the window; the recent one stays
    assert _raw(s, "SELECT op, key FROM oplog") == [("set", "recent")]


def test_standalone_writes_no_oplog(cache_dir: str) -> None:
    s = Store(cache_dir)
    s.set("k", TAG_STR, "v", None)
    s.delete("k")
    assert _raw(s, "SELECT COUNT(*) FROM oplog") == [(0,)]
    assert _raw(s, "SELECT COUNT(*) FROM entries") == [(0,)]


# ---- expiry and limits --------------------------------------------------------------------


def test_purge_expired(cache_dir: str, clock: FakeClock) -> None:
    c = Cache(cache_dir, clock=clock)
    for i in range(600):  # more than one purge batch
        c.set(f"t{i}", i, ttl=10)
    c.set("forever", 1)
    c.set("later", 1, ttl=100)
    lock = c.lock("l", ttl=5)
    assert lock.acquire(blocking=False)
    assert c.purge_expired() == 0
    assert c.stats()["entries"] == 602
    clock.advance(10)
    assert c.purge_expired() == 600
    assert _raw(c.store, "SELECT key FROM entries ORDER BY key") == [("forever",), ("later",)]
    assert _raw(c.store, "SELECT COUNT(*) FROM locks") == [(0,)]  # expired locks go too
    assert c.get("later") == 1


@pytest.mark.parametrize(("cull_frequency", "left"), [(3, 29), (0, 19), (2, 19)])
def test_max_entries_cull(cache_dir: str, cull_frequency: int, left: int) -> None:
    # Django's cull test: MAX_ENTRIES 30, 49 sets leave 29 (19 with CULL_FREQUENCY 0).
    # cull_frequency 2: sets 31 and 46 each leave 15 + the new row; 49 sets leave 19.
    c = Cache(cache_dir, max_entries=30, cull_frequency=cull_frequency)
    sizes = []
    for i in range(1, 50):
        c.set(f"k{i}", i)
        sizes.append(c.stats()["entries"])
        assert c.get(f"k{i}") == i  # the row just written always survives
    assert max(sizes) <= 30
    assert c.stats()["entries"] == left
    assert c.get("k49") == 49


def test_max_entries_culls_expired_first(cache_dir: str, clock: FakeClock) -> None:
    c = Cache(cache_dir, max_entries=10, clock=clock, l1_max_items=0)
    for i in range(5):
        c.set(f"old{i}", i)  # the oldest rows, but never expiring
    for i in range(5):
        c.set(f"tmp{i}", i, ttl=1)
    clock.advance(2)
    c.set("new", 1)
    assert {r[0] for r in _raw(c.store, "SELECT key FROM entries")} == {
        "old0", "old1", "old2", "old3", "old4", "new"}


def test_max_bytes_evicts_expired_first_then_oldest(cache_dir: str, clock: FakeClock) -> None:
    limit = 512 * 1024
    c = Cache(cache_dir, max_bytes=limit, clock=clock, l1_max_items=0)
    big = b"x" * 16_000
    for i in range(10):
        c.set(f"old{i}", big)
    for i in range(10):
        c.set(f"tmp{i}", big, ttl=5)
    for i in range(5):
        c.set(f"new{i}", big)
    assert c.store.enforce_max_bytes() == 0  # under the limit: nothing goes
    clock.advance(10)
    for i in range(5, 15):
        c.set(f"new{i}", big)
    assert c.store.used_bytes() > limit
    evicted = c.store.enforce_max_bytes()
    keys = {r[0] for r in _raw(c.store, "SELECT key FROM entries")}
    assert evicted >= 10
    assert not any(k.startswith("tmp") for k in keys)  # the expired went
    assert {f"old{i}" for i in range(10)} <= keys  # and that was enough: no live row lost
    assert c.store.used_bytes() <= limit
    # Now only live rows are left: the oldest go first.
    for i in range(15, 40):
        c.set(f"new{i}", big)
    c.store.enforce_max_bytes()
    keys = {r[0] for r in _raw(c.store, "SELECT key FROM entries")}
    assert c.store.used_bytes() <= limit
    assert "new39" in keys and "old0" not in keys
    ages = sorted(int(k[3:]) for k in keys if k.startswith("new"))
    assert ages == list(range(ages[0], 40))  # a contiguous newest run survives


def test_max_bytes_enforced_by_writes_alone(cache_dir: str) -> None:
    limit = 256 * 1024
    c = Cache(cache_dir, max_bytes=limit, l1_max_items=0)
    for i in range(400):
        c.set(f"k{i}", os.urandom(4000))
    assert c.store.used_bytes() <= limit + 64 * 4096 * 2  # checked every 64 writes
    assert c.get("k399") is not None
    assert c.get("k0") is None


def test_checkpoint(cache_dir: str) -> None:
    s = Store(cache_dir)
    for i in range(50):
        s.set(f"k{i}", TAG_INT, i, None)
    busy, _log, _done = s.checkpoint("TRUNCATE")
    assert busy == 0
    assert os.path.getsize(s.path + "-wal") == 0
    with pytest.raises(ValueError):
        s.checkpoint("EVERYTHING; DROP TABLE entries")


def test_stats_fields(cache_dir: str, clock: FakeClock) -> None:
    s = Store(cache_dir, clock=clock)
    s.set("a", TAG_STR, "xyz", None)
    s.set("b", TAG_STR, "x", clock.now + 1)
    st = s.stats()
    assert st["entries"] == 2
    assert st["value_bytes"] == (1 + 3) + (1 + 1)
    assert st["db_bytes"] > 0 and st["wal_bytes"] > 0 and st["used_bytes"] > 0
    assert st["path"] == os.path.join(s.directory, DB_NAME)
    clock.advance(1)
    assert s.stats()["entries"] == 1


# ---- bad storage paths -----------------------------------------------------------------------


def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(StorageError, match="cannot create the storage directory") as info:
        Cache(str(blocker / "cache"))
    assert isinstance(info.value, OSError)
    assert blocker.read_text() == "keep me"


def test_path_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(StorageError, match="not a directory"):
        Store(str(blocker))
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses directory permissions")
def test_unwritable_directory(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    c = Cache(str(d))
    c.set("k", "v")
    c.close()
    os.chmod(d, 0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            Cache(str(d))
    finally:
        os.chmod(d, 0o700)
    assert Cache(str(d)).get("k") == "v"


def _fake_mountinfo(tmp_path: Path, mount: str, fstype: str) -> str:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"40 22 0:50 / {mount} rw,relatime shared:2 - {fstype} server:/export rw,vers=4.2\n"
    )
    return str(info)


def test_filesystem_type(tmp_path: Path) -> None:
    info = _fake_mountinfo(tmp_path, str(tmp_path / "mnt"), "nfs4")
    assert filesystem_type(str(tmp_path / "mnt" / "x"), info) == "nfs4"
    assert filesystem_type(str(tmp_path / "mnt"), info) == "nfs4"
    assert filesystem_type(str(tmp_path / "mntx"), info) == "ext4"
    assert filesystem_type("/", str(tmp_path / "missing")) is None


@pytest.mark.parametrize("fstype", ["nfs4", "cifs", "fuse.sshfs"])
def test_network_filesystem_refused(tmp_path: Path, fstype: str) -> None:
    d = tmp_path / "cache"
    Store(str(d)).set("k", TAG_STR, "before", None)
    info = _fake_mountinfo(tmp_path, str(tmp_path), fstype)
    with pytest.raises(StorageError, match=f"on a {fstype} file system.*local disk"):
        Store(str(d), mountinfo=info)
    assert Store(str(d)).get("k") == (TAG_STR, "before", None)
    allowed = Store(str(d), mountinfo=info, allow_network_fs=True)
    assert allowed.get("k") == (TAG_STR, "before", None)


def test_corrupt_database(cache_dir: str) -> None:
    os.makedirs(cache_dir)
    path = os.path.join(cache_dir, DB_NAME)
    garbage = b"this is not an SQLite database, it is garbage " * 100
    with open(path, "wb") as fh:
        fh.write(garbage)
    with pytest.raises(StorageError, match="not a database") as info:
        Cache(cache_dir)
    assert str(path) in str(info.value)
    with open(path, "rb") as fh:
        assert fh.read() == garbage  # left exactly as it was


def test_corrupt_database_after_use(cache_dir: str) -> None:
    c = Cache(cache_dir)
    c.set("k", "v")
    c.store.checkpoint("TRUNCATE")
    c.close()
    path = os.path.join(cache_dir, DB_NAME)
    with open(path, "r+b") as fh:
        fh.write(b"\x00" * 100)  # destroy the header
    snapshot = Path(path).read_bytes()
    with pytest.raises(StorageError):
        Cache(cache_dir)
    assert Path(path).read_bytes() == snapshot


def test_not_sqlite_but_valid_db_of_someone_else(cache_dir: str) -> None:
    os.makedirs(cache_dir)
    path = os.path.join(cache_dir, DB_NAME)
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE entries (x)")
    other.commit()
    other.close()
    with pytest.raises(StorageError):
        Cache(cache_dir)


def test_wal_stays_bounded_under_steady_writes(tmp_path: Path) -> None:
    # 12 MiB written in 4 KiB values while another connection keeps reading: the short
    # read transactions let SQLite's checkpoints recycle the -wal file, so it stays near
    # the autocheckpoint size (1,000 pages) instead of growing with what was written.
    s = Store(str(tmp_path / "s"))
    reader = Store(str(tmp_path / "s"))
    blob = os.urandom(4096)
    largest = 0
    for i in range(3000):
        s.set(f"k{i % 500}", 1, blob, None)
        if i % 10 == 0:
            assert reader.get(f"k{i % 500}") is not None
            largest = max(largest, os.path.getsize(s.path + "-wal"))
    assert largest < 8 * 1024 * 1024, largest


def test_collection_trims_every_oplog_row_past_the_window(cache_dir: str,
                                                          clock: FakeClock) -> None:
    # More old oplog rows than one batch (and few expired entries): an unbounded collection
    # takes them all, or a store written faster than one batch per round grows its oplog.
    s = Store(cache_dir, clustered=True, clock=clock)
    s.set_many([(f"k{i}", TAG_INT, i, None) for i in range(2 * GC_BATCH + 10)])
    clock.advance(TOMBSTONE_SECONDS + 1)
    s.set("recent", TAG_STR, "x", None)
    assert s.purge_expired() == 0
    assert _raw(s, "SELECT op, key FROM oplog") == [("set", "recent")]


def test_a_size_check_meeting_a_held_lock_does_not_fail_the_committed_write(
        cache_dir: str) -> None:
    # The node's event-loop connection waits for no lock and runs a write that failed
    # "locked" again on a thread: a write that raises must not have committed, so the
    # max_bytes check after the COMMIT must not fail it (the incr was applied twice).
    s = Store(cache_dir, max_bytes=1, busy_timeout=0.0)
    holder = sqlite3.connect(s.path, isolation_level=None, check_same_thread=False)
    publish = s.tokens.publish
    published: list[object] = []

    def publish_then_lock(keys: Iterable[str]) -> None:
        publish(keys)
        published.append(keys)
        if len(published) == 2:  # the publish after the COMMIT: another process writes
            holder.execute("BEGIN IMMEDIATE")

    s.tokens.publish = publish_then_lock  # type: ignore[method-assign]
    s._writes = SIZE_CHECK_EVERY - 1  # this write ends with the size check
    try:
        assert s.incr("n", 1, None) == 1
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
    assert s.get("n") == (TAG_INT, 1, None)


def test_a_read_that_cannot_reconnect_leaves_no_connection_busy(
        cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(cache_dir)
    old = s.conn()
    old.dead = True  # as _before_fork marks the connection it is about to close

    def refuse() -> None:
        raise StorageError("cannot open")

    monkeypatch.setattr(s, "_connect", refuse)
    with pytest.raises(StorageError):
        s.get("k")
    assert old.busy == 0  # a fork() would otherwise wait for it, then leave it open


def test_a_transaction_that_fails_to_start_gives_its_connection_back(cache_dir: str) -> None:
    # Whatever fails between BEGIN and the start of the work (here the clock) leaves no
    # transaction open and the connection not busy (every later fork() would wait for it).
    broken = [False]

    def clock() -> float:
        if broken[0]:
            raise RuntimeError("clock failed")
        return 1_800_000_000.0

    s = Store(cache_dir, clock=clock)
    broken[0] = True
    with pytest.raises(RuntimeError):
        s.delete("k")
    broken[0] = False
    conn = s.conn()
    assert conn.busy == 0 and not conn.in_transaction
    assert s.delete("k") is False


def test_thread_busy_timeout_survives_a_reopened_connection(cache_dir: str) -> None:
    # The node's event loop must never wait for another process's lock, even after its
    # connection was replaced (a fork closes every connection; the thread reopens).
    s = Store(cache_dir)
    s.set_thread_busy_timeout(0)
    assert s.conn().execute("PRAGMA busy_timeout").fetchone()[0] == 0
    from hypercacheio.store import _after_fork_in_parent, _before_fork  # what fork() runs

    _before_fork()
    _after_fork_in_parent()
    assert s.conn().execute("PRAGMA busy_timeout").fetchone()[0] == 0
    other = Store(cache_dir)  # other threads and stores keep the configured wait
    assert other.conn().execute("PRAGMA busy_timeout").fetchone()[0] == 60_000
