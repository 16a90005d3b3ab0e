"""Property tests: the Cache API against a plain-dict model, driven by a fake clock.

Each machine runs with L1 on and off; the two-cache machines write through one Cache object
and read through another on the same directory, which checks L1 coherence.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import FakeClock
from hypercacheio import Cache
from hypercacheio.codec import INT64_MAX, INT64_MIN

KEYS = st.sampled_from(["a", "b", "c", "é€", "k\x01", "😀" * 3, "x" * 1024])
INTS = st.one_of(st.integers(-50, 50), st.sampled_from([INT64_MAX, INT64_MIN, INT64_MAX - 1]))
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=False), st.text(max_size=8),
    st.binary(max_size=8),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=3),
    st.tuples(SCALARS, st.lists(INTS, max_size=2)),
)
TTLS = st.one_of(
    st.none(), st.integers(-2, 20), st.floats(-1, 20, allow_nan=False),
    st.builds(timedelta, seconds=st.integers(-1, 20)),
)
DELTAS = st.one_of(st.integers(-100, 100), st.sampled_from([INT64_MAX, INT64_MIN, 2**63]))
WHO = st.integers(0, 1)

MISSING = object()


def seconds_of(ttl: Any) -> float | None:
    if ttl is None:
        return None
    return ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)


class CacheModel(RuleBasedStateMachine):
    """The model: key -> (value, absolute expiry or None)."""

    l1_items = 10_000
    n_caches = 1

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hypercacheio-model-")
        self.clock = FakeClock()
        self.caches = [Cache(self.dir, l1_max_items=self.l1_items, clock=self.clock)
                       for _ in range(self.n_caches)]
        self.model: dict[str, tuple[Any, float | None]] = {}

    def teardown(self) -> None:
        for c in self.caches:
            c.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers ------------------------------------------------------------------------

    def c(self, who: int) -> Cache:
        return self.caches[who % len(self.caches)]

    def live(self, key: str) -> Any:
        item = self.model.get(key)
        if item is None:
            return MISSING
        value, expire = item  # an expired row stays until something removes it, as in SQLite
        return MISSING if expire is not None and expire <= self.clock.now else value

    def expiry(self, ttl: Any) -> float | None:
        seconds = seconds_of(ttl)
        return None if seconds is None else self.clock.now + seconds

    # ---- rules ------------------------------------------------------------------------

    @rule(who=WHO, key=KEYS, value=VALUES, ttl=TTLS)
    def set(self, who: int, key: str, value: Any, ttl: Any) -> None:
        assert self.c(who).set(key, value, ttl) is True
        seconds = seconds_of(ttl)
        if seconds is not None and seconds <= 0:
            self.model.pop(key, None)
        else:
            self.model[key] = (value, self.expiry(ttl))

    @rule(who=WHO, key=KEYS, value=VALUES, ttl=TTLS)
    def add(self, who: int, key: str, value: Any, ttl: Any) -> None:
        seconds = seconds_of(ttl)
        expected = self.live(key) is MISSING and not (seconds is not None and seconds <= 0)
        assert self.c(who).add(key, value, ttl) is expected
        if expected:
            self.model[key] = (value, self.expiry(ttl))

    @rule(who=WHO, key=KEYS)
    def get(self, who: int, key: str) -> None:
        got = self.c(who).get(key, MISSING)
        assert got == self.live(key)

    @rule(who=WHO, key=KEYS)
    def get_twice_and_mutate(self, who: int, key: str) -> None:
        c = self.c(who)
        first = c.get(key, MISSING)
        if isinstance(first, list):
            first.append("mutated")
        elif isinstance(first, dict):
            first["mutated"] = True
        elif isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], list):
            first[1].append(0)
        assert c.get(key, MISSING) == self.live(key)

    @rule(who=WHO, key=KEYS)
    def has(self, who: int, key: str) -> None:
        assert self.c(who).has(key) is (self.live(key) is not MISSING)
        assert (key in self.c(who)) is (self.live(key) is not MISSING)

    @rule(who=WHO, key=KEYS)
    def delete(self, who: int, key: str) -> None:
        expected = self.live(key) is not MISSING
        assert self.c(who).delete(key) is expected
        self.model.pop(key, None)

    @rule(who=WHO, key=KEYS)
    def pull(self, who: int, key: str) -> None:
        expected = self.live(key)
        assert self.c(who).pull(key, MISSING) == expected
        self.model.pop(key, None)

    @rule(who=WHO, key=KEYS, delta=DELTAS, decr=st.booleans())
    def incr(self, who: int, key: str, delta: int, decr: bool) -> None:
        c = self.c(who)
        current = self.live(key)
        change = -delta if decr else delta
        op = c.decr if decr else c.incr
        if not INT64_MIN <= change <= INT64_MAX:
            with pytest.raises(OverflowError):  # the delta itself is checked first
                op(key, delta)
            return
        if current is MISSING:
            start, expire = 0, None
        elif type(current) is not int or not INT64_MIN <= current <= INT64_MAX:
            with pytest.raises(TypeError):
                op(key, delta)
            return
        else:
            start, expire = current, self.model[key][1]
        new = start + change
        if not INT64_MIN <= new <= INT64_MAX:
            with pytest.raises(OverflowError):
                op(key, delta)
            return
        assert op(key, delta) == new
        self.model[key] = (new, expire)

    @rule(who=WHO, key=KEYS, ttl=TTLS)
    def touch(self, who: int, key: str, ttl: Any) -> None:
        expected = self.live(key) is not MISSING
        assert self.c(who).touch(key, ttl) is expected
        seconds = seconds_of(ttl)
        if seconds is not None and seconds <= 0:
            self.model.pop(key, None)  # ttl <= 0 deletes, an expired row too
        elif expected:
                self.model[key] = (self.model[key][0], self.expiry(ttl))

    @rule(who=WHO, key=KEYS)
    def ttl(self, who: int, key: str) -> None:
        got = self.c(who).ttl(key)
        if self.live(key) is MISSING:
            assert got == 0.0
            return
        expire = self.model[key][1]
        if expire is None:
            assert got is None
        else:
            assert got == pytest.approx(expire - self.clock.now)
            assert got is not None and got > 0

    @rule(who=WHO, keys=st.lists(KEYS, max_size=5))
    def get_many(self, who: int, keys: list[str]) -> None:
        expected = {k: self.live(k) for k in keys}
        assert self.c(who).get_many(keys) == {k: v for k, v in expected.items()
                                                 if v is not MISSING}

    @rule(who=WHO, mapping=st.dictionaries(KEYS, VALUES, max_size=4), ttl=TTLS)
    def set_many(self, who: int, mapping: dict[str, Any], ttl: Any) -> None:
        assert self.c(who).set_many(mapping, ttl) == []
        seconds = seconds_of(ttl)
        for key, value in mapping.items():
            if seconds is not None and seconds <= 0:
                self.model.pop(key, None)
            else:
                self.model[key] = (value, self.expiry(ttl))

    @rule(who=WHO, keys=st.lists(KEYS, max_size=5))
    def delete_many(self, who: int, keys: list[str]) -> None:
        expected = sum(self.live(k) is not MISSING for k in set(keys))
        assert self.c(who).delete_many(keys) == expected
        for key in keys:
            self.model.pop(key, None)

    @precondition(lambda self: len(self.model) > 2)
    @rule(who=WHO)
    def clear(self, who: int) -> None:
        self.c(who).clear()
        self.model.clear()

    @rule(seconds=st.sampled_from([0.5, 1, 3, 10, 25]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(who=WHO)
    def purge_expired(self, who: int) -> None:
        expired = [k for k, (_v, e) in self.model.items() if e is not None and e <= self.clock.now]
        assert self.c(who).purge_expired() == len(expired)
        for key in expired:
            del self.model[key]

    @invariant()
    def entries_match(self) -> None:
        live = [k for k in self.model if self.live(k) is not MISSING]
        assert self.caches[0].stats()["entries"] == len(live)


SETTINGS = settings(max_examples=40, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class OneCacheL1(CacheModel):
    l1_items = 10_000


class OneCacheNoL1(CacheModel):
    l1_items = 0


class TwoCachesL1(CacheModel):
    l1_items = 10_000
    n_caches = 2


class TwoCachesSmallL1(CacheModel):
    l1_items = 2  # constant L1 eviction on top of cross-object invalidation
    n_caches = 2


class TwoCachesMixed(CacheModel):
    """Cache 0 has an L1, cache 1 has none."""

    n_caches = 2

    def __init__(self) -> None:
        super().__init__()
        self.caches[1] = Cache(self.dir, l1_max_items=0, clock=self.clock)


TestOneCacheL1 = OneCacheL1.TestCase
TestOneCacheNoL1 = OneCacheNoL1.TestCase
TestTwoCachesL1 = TwoCachesL1.TestCase
TestTwoCachesSmallL1 = TwoCachesSmallL1.TestCase
TestTwoCachesMixed = TwoCachesMixed.TestCase
for _case in (TestOneCacheL1, TestOneCacheNoL1, TestTwoCachesL1, TestTwoCachesSmallL1,
              TestTwoCachesMixed):
    _case.settings = SETTINGS
del _case
