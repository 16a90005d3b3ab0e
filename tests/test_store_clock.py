"""The hybrid logical clock of a database, and the clustered flag: properties of the store,
shared by every process and thread that opens it."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

import mp_helpers as mp
import store_mp_helpers as smp
from conftest import FakeClock
from hypercacheio.codec import TAG_INT, TAG_STR, TAG_TOMBSTONE
from hypercacheio.store import Store

pytestmark = pytest.mark.timeout(120)

NOW = 1_800_000_000.0


def _raw(store: Store, sql: str, *args: object) -> list[tuple[object, ...]]:
    return store.conn().execute(sql, args).fetchall()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_versions_unique_across_processes_in_one_millisecond(cache_dir: str,
                                                             method: str) -> None:
    # Every writer's wall clock shows the same millisecond: only a clock kept by the
    # database gives them distinct versions (per-process clocks stamp the same values).
    Store(cache_dir).close()
    ctx = multiprocessing.get_context(method)
    writers, rounds = 4, 120
    barrier = ctx.Barrier(writers)
    results = mp.run_all(ctx, smp.stamp_writer,
                         [(cache_dir, barrier, me, rounds, NOW) for me in range(writers)])
    every = [stamp for stamps in results for stamp in stamps]
    assert len(every) == writers * rounds
    assert len(set(every)) == len(every), "two writes of the database share a version"
    for stamps in results:
        assert stamps == sorted(stamps), "a writer saw its versions go back"
    assert min(every) >= int(NOW * 1000) << 16  # from the frozen wall clock on, never below


def test_versions_unique_across_threads(cache_dir: str) -> None:
    clock = smp.FrozenClock(NOW)
    stores = [Store(cache_dir, clock=clock) for _ in range(2)]  # two clocks' worth of state
    stamps: list[list[int]] = [[], [], [], []]

    def write(me: int) -> None:
        store = stores[me % 2]
        for i in range(100):
            store.set(f"t{me}", TAG_INT, i, None)
            stamps[me].append(int(_raw(store, "SELECT hlc FROM entries WHERE key = ?",
                                       f"t{me}")[0][0]))

    threads = [threading.Thread(target=write, args=(me,)) for me in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [s for per in stamps for s in per]
    assert len(set(every)) == len(every) == 400
    assert all(per == sorted(per) for per in stamps)


def test_clustered_oplog_versions_grow_with_commit_order(cache_dir: str) -> None:
    clock = smp.FrozenClock(NOW)
    a = Store(cache_dir, clustered=True, clock=clock)
    b = Store(cache_dir, clock=clock)  # another instance: once its own clock state
    for i in range(20):
        (a if i % 2 else b).set("k", TAG_INT, i, None)
        (b if i % 2 else a).incr("n", 1, None)
    hlcs = [r[0] for r in _raw(a, "SELECT hlc FROM oplog ORDER BY seq")]
    assert len(hlcs) == 40
    assert hlcs == sorted(set(hlcs))  # strictly increasing in commit order


def test_the_clock_follows_the_wall_clock_and_never_goes_back(cache_dir: str,
                                                              clock: FakeClock) -> None:
    s = Store(cache_dir, clock=clock)
    s.set("k", TAG_INT, 1, None)
    first = s.last_hlc()
    assert first >> 16 == int(clock.now * 1000)
    clock.advance(-60)  # the wall clock steps back
    s.set("k", TAG_INT, 2, None)
    assert s.last_hlc() == first + 1
    clock.advance(120)
    s.incr("k", 1, None)
    assert s.last_hlc() >> 16 == int(clock.now * 1000)


def test_observe_moves_the_database_clock_forward(cache_dir: str, clock: FakeClock) -> None:
    s = Store(cache_dir, clock=clock)
    other = Store(cache_dir, clock=clock)
    s.set("k", TAG_INT, 1, None)
    remote = (int((clock.now + 3600) * 1000) << 16) + 7  # a peer an hour ahead
    s.observe(remote)
    assert s.last_hlc() == remote
    other.set("k", TAG_INT, 2, None)  # another instance (or process) stamps beyond it
    assert _raw(s, "SELECT hlc FROM entries WHERE key='k'") == [(remote + 1,)]
    s.observe(remote - 1000)  # an older version does not move it back
    assert s.last_hlc() == remote + 1
    with s.transaction() as txn:
        assert txn.hlc == remote + 2


def test_observe_in_another_process(cache_dir: str, clock: FakeClock) -> None:
    s = Store(cache_dir, clock=clock)
    s.set("k", TAG_INT, 1, None)
    remote = (int((NOW + 7200) * 1000) << 16)
    s.observe(remote)
    ctx = multiprocessing.get_context("spawn")
    [stamps] = mp.run_all(ctx, smp.stamp_writer, [(cache_dir, ctx.Barrier(1), 9, 4, NOW)])
    assert stamps == [remote + 1, remote + 2, remote + 3, remote + 4]


# ---- clustered: a property of the store ------------------------------------------------------


def test_clustered_is_recorded_in_the_database(cache_dir: str) -> None:
    assert Store(cache_dir).clustered is False
    Store(cache_dir, clustered=True).close()  # the argument marks the store
    plain = Store(cache_dir)
    assert plain.clustered is True
    plain.set("k", TAG_STR, "v", None)
    assert plain.delete("k") is True
    assert _raw(plain, "SELECT tag FROM entries WHERE key='k'") == [(TAG_TOMBSTONE,)]
    assert [r[0] for r in _raw(plain, "SELECT op FROM oplog ORDER BY seq")] == ["set", "delete"]
    Store(cache_dir, clustered=False).close()  # False (the default) does not unmark it
    assert Store(cache_dir).clustered is True
    plain.mark_clustered(False)
    assert Store(cache_dir).clustered is False


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_plain_process_writes_tombstones_and_oplog_in_a_clustered_store(
        cache_dir: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    early = Store(cache_dir)  # opened and used before the store was marked clustered
    early.set("e", TAG_INT, 1, None)
    early.delete("e")
    assert _raw(early, "SELECT COUNT(*) FROM oplog") == [(0,)]
    assert mp.run_all(ctx, smp.mark_clustered, [(cache_dir, True)]) == [True]
    assert mp.run_all(ctx, smp.plain_writes, [(cache_dir,)]) == [(True, True)]
    # the instance opened before the mark follows it too, on its very next write
    early.set("e", TAG_INT, 2, None)
    assert early.delete("e") is True
    ops = _raw(early, "SELECT op, key FROM oplog ORDER BY seq")
    assert ops == [("set", "p"), ("delete", "p"), ("incr", "n"), ("set", "e"), ("delete", "e")]
    assert _raw(early, "SELECT key FROM entries WHERE tag = ? ORDER BY key",
                TAG_TOMBSTONE) == [("e",), ("p",)]


def test_a_lost_or_stale_clock_file_is_seeded_from_the_rows(cache_dir: str) -> None:
    # After a reboot (or if the file went), the clock starts from the highest version the
    # database holds: a wall clock that stepped back meanwhile hands out no lower version.
    import os

    from hypercacheio.store.clock import CLOCK_NAME

    ahead = Store(cache_dir, clock=smp.FrozenClock(NOW + 3600))
    ahead.set("k", TAG_INT, 1, None)
    stored = ahead.last_hlc()
    ahead.close()
    with open(os.path.join(cache_dir, CLOCK_NAME), "r+b") as fh:
        fh.write(b"\0" * 8 * 5)  # as a file from another boot (or a new one) would read
    behind = Store(cache_dir, clock=smp.FrozenClock(NOW))
    assert behind.last_hlc() == stored
    behind.set("j", TAG_INT, 1, None)
    assert _raw(behind, "SELECT hlc FROM entries WHERE key='j'") == [(stored + 1,)]
