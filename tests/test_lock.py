"""Lock: owner tokens, fencing numbers, expiry, waits and the context manager."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conftest import FakeClock
from hypercacheio import Cache, Lock, LockError, LockTimeout


class FakeMonotonic:
    """A monotonic clock whose sleep only moves it (waits cost no real time)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def mono() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
def lcache(cache_dir: str, clock: FakeClock, mono: FakeMonotonic) -> Cache:
    return Cache(cache_dir, clock=clock, monotonic=mono, sleep=mono.sleep)


def test_acquire_release(lcache: Cache) -> None:
    a = lcache.lock("job", ttl=10)
    b = lcache.lock("job", ttl=10)
    assert isinstance(a, Lock) and a.owner != b.owner
    assert not a.locked() and not a.owned()
    assert a.acquire(blocking=False) is True
    assert a.locked() and a.owned()
    assert b.locked() and not b.owned()
    assert b.acquire(blocking=False) is False
    assert b.get() is False
    assert b.release() is False  # not the owner
    assert a.owned()
    assert a.release() is True
    assert a.release() is False
    assert not a.locked()
    assert b.get() is True


def test_same_owner_reacquires(lcache: Cache) -> None:
    a = lcache.lock("job", owner="me")
    assert a.acquire(blocking=False)
    first = a.fence
    again = lcache.lock("job", owner="me")
    assert again.acquire(blocking=False)
    assert again.fence is not None and first is not None and again.fence > first


def test_fences_strictly_grow(lcache: Cache) -> None:
    fences = []
    for name in ["a", "b", "a", "c", "a"]:
        lock = lcache.lock(name)
        assert lock.acquire(blocking=False)
        fences.append(lock.fence)
        lock.release()
        assert lock.fence is None
    assert fences == sorted(set(fences))


def test_fences_survive_reopen(cache_dir: str) -> None:
    c = Cache(cache_dir)
    lock = c.lock("x")
    lock.acquire()
    first = lock.fence
    lock.release()
    c.close()
    lock2 = Cache(cache_dir).lock("x")
    lock2.acquire()
    assert lock2.fence is not None and first is not None and lock2.fence > first


def test_ttl_expiry(lcache: Cache, clock: FakeClock) -> None:
    a = lcache.lock("job", ttl=5)
    b = lcache.lock("job", ttl=timedelta(seconds=5))
    assert a.acquire(blocking=False)
    clock.advance(4.9)
    assert b.acquire(blocking=False) is False
    clock.advance(0.1)
    assert not a.locked() and not a.owned()
    assert b.acquire(blocking=False) is True
    assert a.release() is False  # expired, and taken by b since
    assert a.extend() is False
    assert b.owned()


def test_extend(lcache: Cache, clock: FakeClock) -> None:
    a = lcache.lock("job", ttl=5)
    assert a.acquire(blocking=False)
    clock.advance(4)
    assert a.extend(10) is True
    clock.advance(9)
    assert a.owned()
    assert a.extend() is True  # the new ttl is kept
    clock.advance(9.9)
    assert a.owned()
    with pytest.raises(ValueError, match="ttl"):
        a.extend(0)
    other = lcache.lock("job", ttl=5)
    assert other.extend() is False


def test_no_ttl_lock(lcache: Cache, clock: FakeClock) -> None:
    a = lcache.lock("job", ttl=None)
    assert a.acquire(blocking=False)
    clock.advance(10**9)
    assert a.owned()


def test_force_release(lcache: Cache) -> None:
    a = lcache.lock("job")
    b = lcache.lock("job")
    assert a.acquire(blocking=False)
    assert b.force_release() is True
    assert not a.locked()
    assert b.force_release() is False
    assert b.acquire(blocking=False)
    assert a.release() is False


def test_restore_lock(lcache: Cache, clock: FakeClock) -> None:
    a = lcache.lock("job", ttl=30, owner="worker-1")
    assert a.acquire(blocking=False)
    clock.advance(10)
    restored = lcache.restore_lock("job", "worker-1")
    assert restored.owner == "worker-1"
    assert restored.fence == a.fence
    assert restored.ttl == pytest.approx(20)
    assert restored.owned()
    stranger = lcache.restore_lock("job", "worker-2")
    assert stranger.fence is None
    assert stranger.release() is False
    assert a.locked()
    assert restored.release() is True
    assert not a.locked()


def test_blocking_wait_times_out(lcache: Cache, mono: FakeMonotonic) -> None:
    a = lcache.lock("job")
    b = lcache.lock("job")
    assert a.acquire()
    start = mono.now
    assert b.acquire(blocking=True, timeout=2.0) is False
    assert mono.now - start == pytest.approx(2.0)
    assert len(mono.slept) > 3 and max(mono.slept) <= 0.05  # backs off, but not far
    with pytest.raises(LockTimeout, match="'job' not acquired within 1"):
        b.block(1)


def test_blocking_wait_succeeds_when_released(lcache: Cache, mono: FakeMonotonic) -> None:
    a = lcache.lock("job")
    b = lcache.lock("job")
    assert a.acquire()
    real_sleep = mono.sleep

    def sleep_then_release(seconds: float) -> None:
        real_sleep(seconds)
        if len(mono.slept) == 3:
            a.release()

    b._sleep = sleep_then_release
    assert b.acquire(blocking=True, timeout=10) is True
    assert len(mono.slept) == 3
    assert b.block(1) is True


def test_context_manager(lcache: Cache) -> None:
    with lcache.lock("job", ttl=10) as held:
        assert held.owned()
        other = lcache.lock("job", blocking_timeout=0.5)
        with pytest.raises(LockTimeout, match="not acquired within 0.5") as info, other:
            pass  # pragma: no cover - never entered
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, LockError)
    assert not held.locked()


def test_context_manager_real_clock(cache_dir: str) -> None:
    # The one test that waits for real (at most 0.2 s): time.monotonic and time.sleep.
    c = Cache(cache_dir)
    with c.lock("job"), pytest.raises(LockTimeout), c.lock("job", blocking_timeout=0.2):
        pass  # pragma: no cover


def test_context_manager_lost_lock(lcache: Cache, clock: FakeClock) -> None:
    with pytest.raises(LockError, match="expired or was taken"), lcache.lock("job", ttl=1):
        clock.advance(2)
        assert lcache.lock("job").acquire(blocking=False)
    # an exception inside the block is not replaced by the release error
    with pytest.raises(KeyError), lcache.lock("job2", ttl=1):
        clock.advance(2)
        raise KeyError("inner")


def test_invalid_lock_arguments(lcache: Cache) -> None:
    for ttl in (0, -1, timedelta(0)):
        with pytest.raises(ValueError, match="ttl"):
            lcache.lock("job", ttl=ttl)
    with pytest.raises(TypeError, match="owner"):
        lcache.lock("job", owner=5)  # type: ignore[arg-type]
    lock = lcache.lock("job")
    with pytest.raises(ValueError, match="ttl"):
        lock.extend(-1)
    assert not lock.locked()


def test_locks_and_entries_are_separate(lcache: Cache) -> None:
    lcache.set("job", "value")
    with lcache.lock("job"):
        assert lcache.get("job") == "value"
    lcache.clear()
    assert lcache.stats()["locks"] == 0


def test_stats_counts_locks(lcache: Cache, clock: FakeClock) -> None:
    lcache.lock("a", ttl=5).acquire()
    lcache.lock("b", ttl=None).acquire()
    assert lcache.stats()["locks"] == 2
    clock.advance(5)
    assert lcache.stats()["locks"] == 1


def test_repr(lcache: Cache) -> None:
    lock = lcache.lock("job", owner="me")
    assert "job" in repr(lock) and "me" in repr(lock)
