"""kill -9 of a process mid-stream: the database opens and every acknowledged write is there."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import pytest

import mp_helpers as mp
from conftest import FakeClock
from hypercacheio import Cache

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")


def _kill_after(kind: str, directory: str, acks_before_kill: int) -> int:
    """Start an acking writer, SIGKILL it after some acks; return the last acknowledged seq."""
    ours, theirs = FORK.Pipe()
    proc = mp.start(FORK, mp.acking_writer, directory, theirs, kind)
    theirs.close()
    last = 0
    while last < acks_before_kill:
        last = ours.recv()
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the writer is inside its next write
    proc.join(mp.JOIN_TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL
    while ours.poll():  # acks sent before the kill landed
        try:
            last = ours.recv()
        except EOFError:
            break
    return last


def _integrity(cache: Cache) -> None:
    conn = cache.store.conn()
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("acks", [1, 150, 600])
def test_kill_during_sets(cache_dir: str, acks: int) -> None:
    Cache(cache_dir).set("before", "kept")
    last = _kill_after("set", cache_dir, acks)
    cache = Cache(cache_dir)  # opens after the crash
    _integrity(cache)
    got = cache.get_many([f"k{i}" for i in range(1, last + 1)])
    missing = [i for i in range(1, last + 1) if got.get(f"k{i}", {}).get("seq") != i]
    assert not missing, f"acknowledged writes lost: {missing[:10]}"
    assert cache.get("before") == "kept"
    assert cache.get(f"k{last + 2}") is None  # nothing beyond the one write in flight
    cache.set("after", 1)  # and it is writable
    assert Cache(cache_dir).get("after") == 1


def test_kill_during_incr(cache_dir: str) -> None:
    last = _kill_after("incr", cache_dir, 300)
    cache = Cache(cache_dir)
    _integrity(cache)
    assert cache.get("counter") in (last, last + 1)  # the write in flight may have landed
    assert cache.incr("counter") in (last + 1, last + 2)


def test_kill_during_set_many_is_all_or_nothing(cache_dir: str) -> None:
    last = _kill_after("set_many", cache_dir, 200)
    cache = Cache(cache_dir)
    _integrity(cache)
    for i in range(1, last + 2):
        pair = (cache.get(f"m{i}a"), cache.get(f"m{i}b"))
        if i <= last:
            assert pair == (i, [i])
        else:  # the transaction in flight: both or neither
            assert pair in ((i, [i]), (None, None))


def test_repeated_crashes_then_concurrent_use(cache_dir: str) -> None:
    total = 0
    for round_ in range(3):
        last = _kill_after("incr", cache_dir, 50 * (round_ + 1))
        total = Cache(cache_dir).get("counter")
        assert total >= last
    lasts = mp.run_all(FORK, mp.incr_many, [(cache_dir, "counter", 100, 10_000)] * 2)
    assert Cache(cache_dir).get("counter") == total + 200
    assert max(lasts) == total + 200


def test_lock_of_a_killed_holder_expires(cache_dir: str, clock: FakeClock) -> None:
    ours, theirs = FORK.Pipe()
    proc = mp.start(FORK, mp.hold_lock_forever, cache_dir, theirs)
    fence = ours.recv()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(mp.JOIN_TIMEOUT)
    # The holder used the real clock: move the fake one to just before its expiry, then past.
    info = Cache(cache_dir).store.lock_info("crashy")
    assert info is not None and info[0] != "" and info[2] == fence
    holder_expiry: Any = info[1]
    clock.now = holder_expiry - 1
    cache = Cache(cache_dir, clock=clock)
    lock = cache.lock("crashy", ttl=10)
    assert lock.acquire(blocking=False) is False
    clock.advance(1)
    assert lock.acquire(blocking=False) is True
    assert lock.fence is not None and lock.fence > fence
