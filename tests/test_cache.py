"""Cache: the API's semantics and every bad input (clear error, store unchanged)."""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import types
from datetime import timedelta
from typing import Any

import pytest

from conftest import FakeClock
from hypercacheio import Cache, HypercacheioError, InvalidKeyError, InvalidValueError
from hypercacheio.codec import INT64_MAX, INT64_MIN, TAG_PICKLE


def _snapshot(c: Cache) -> list[tuple[Any, ...]]:
    """Every row of the store, for 'nothing changed' assertions."""
    return c.store.conn().execute(
        "SELECT key, tag, value, expire_at FROM entries ORDER BY key").fetchall()


# ---- semantics ---------------------------------------------------------------------------


def test_set_get_delete(cache: Cache) -> None:
    assert cache.get("k") is None
    assert cache.get("k", 7) == 7
    assert cache.set("k", "v") is True
    assert cache.get("k") == "v"
    assert "k" in cache and cache.has("k")
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert "k" not in cache


def test_none_is_a_value(cache: Cache) -> None:
    cache.set("n", None)
    assert cache.get("n", "dflt") is None
    assert cache.get("n", "dflt") is None  # also from L1
    assert cache.has("n")
    assert cache.get_many(["n", "missing"]) == {"n": None}
    assert cache.pull("n", "dflt") is None
    assert cache.get("n", "dflt") == "dflt"


@pytest.mark.parametrize("value", [0, -1, INT64_MAX, INT64_MIN, 2**64, 1.5, True, False, b"b",
                                   "s", "", b"", [1, {"a": (2,)}], {1, 2}, frozenset({3}),
                                   ("t", 1), "\ud800 lone"])
def test_types_round_trip(cache: Cache, value: Any) -> None:
    cache.set("k", value)
    for _ in range(2):
        got = cache.get("k")
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("ttl", [0, -1, -0.5, timedelta(0), timedelta(seconds=-3)])
def test_ttl_not_positive_removes(cache: Cache, ttl: Any) -> None:
    cache.set("k", 1)
    assert cache.get("k") == 1
    assert cache.set("k", 2, ttl=ttl) is True
    assert cache.get("k") is None
    assert cache.add("k", 3, ttl=ttl) is False
    assert cache.get("k") is None
    cache.set_many({"a": 1, "b": 2})
    cache.set_many({"a": 5, "b": 6}, ttl=ttl)
    assert cache.get_many(["a", "b"]) == {}


@pytest.mark.parametrize("ttl", [10, 10.0, timedelta(seconds=10)])
def test_ttl_expires(cache: Cache, clock: FakeClock, ttl: Any) -> None:
    cache.set("k", "v", ttl=ttl)
    assert cache.ttl("k") == pytest.approx(10.0)
    assert cache.get("k") == "v"
    clock.advance(9.5)
    assert cache.get("k") == "v"
    assert cache.ttl("k") == pytest.approx(0.5)
    clock.advance(0.5)
    assert cache.get("k") is None
    assert cache.ttl("k") == 0.0
    assert not cache.has("k")
    assert cache.delete("k") is False  # expired counts as absent


def test_ttl_none_never_expires(cache: Cache, clock: FakeClock) -> None:
    cache.set("k", 1, ttl=None)
    assert cache.ttl("k") is None
    clock.advance(10**9)
    assert cache.get("k") == 1
    assert cache.ttl("missing") == 0.0


def test_default_ttl(cache_dir: str, clock: FakeClock) -> None:
    c = Cache(cache_dir, default_ttl=timedelta(seconds=5), clock=clock)
    c.set("k", 1)
    c.forever("f", 1)
    c.incr("n")
    assert c.ttl("k") == pytest.approx(5.0)
    assert c.ttl("n") == pytest.approx(5.0)
    assert c.ttl("f") is None
    clock.advance(5)
    assert c.get_many(["k", "n", "f"]) == {"f": 1}


def test_add(cache: Cache, clock: FakeClock) -> None:
    assert cache.add("k", 1, ttl=5) is True
    assert cache.add("k", 2) is False
    assert cache.get("k") == 1
    clock.advance(5)
    assert cache.add("k", 3) is True  # an expired key counts as missing
    assert cache.get("k") == 3
    cache.set("n", None)
    assert cache.add("n", 1) is False  # None is a value


def test_incr_decr(cache: Cache, clock: FakeClock) -> None:
    assert cache.incr("c") == 1
    assert cache.incr("c", 10) == 11
    assert cache.decr("c") == 10
    assert cache.decr("c", 15) == -5
    assert cache.get("c") == -5
    assert cache.decr("d") == -1
    cache.set("t", 5, ttl=1)
    assert cache.incr("t") == 6
    assert cache.ttl("t") == pytest.approx(1.0)  # incr keeps the expiry
    clock.advance(1)
    assert cache.incr("t") == 1  # expired: starts from 0, no expiry
    assert cache.ttl("t") is None


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**200])
def test_incr_on_int_beyond_64_bits_is_overflow(cache: Cache, value: Any) -> None:
    cache.set("k", value)  # stored pickled: beyond SQLite's integers
    with pytest.raises(OverflowError, match="64-bit"):
        cache.incr("k")
    assert cache.get("k") == value


@pytest.mark.parametrize("value", ["1", b"1", 1.0, None, [1], True])
def test_incr_non_integer(cache: Cache, value: Any) -> None:
    cache.set("k", value)
    with pytest.raises(TypeError, match="not an integer"):
        cache.incr("k")
    with pytest.raises(TypeError):
        cache.decr("k")
    assert cache.get("k") == value


@pytest.mark.parametrize(("start", "delta"), [(INT64_MAX, 1), (INT64_MIN, -1), (0, INT64_MAX + 1),
                                              (2, INT64_MAX), (-5, INT64_MIN)])
def test_incr_overflow(cache: Cache, start: int, delta: int) -> None:
    cache.set("k", start)
    with pytest.raises(OverflowError):
        cache.incr("k", delta)
    assert cache.get("k") == start


def test_incr_to_the_edges(cache: Cache) -> None:
    cache.set("k", INT64_MAX - 1)
    assert cache.incr("k") == INT64_MAX
    cache.set("k", INT64_MIN + 1)
    assert cache.decr("k") == INT64_MIN
    with pytest.raises(OverflowError):
        cache.decr("k", -(INT64_MIN))  # delta 2**63 is itself out of range
    assert cache.get("k") == INT64_MIN


@pytest.mark.parametrize("delta", [1.0, "1", None, True])
def test_incr_bad_delta(cache: Cache, delta: Any) -> None:
    cache.set("k", 1)
    with pytest.raises(TypeError, match="delta"):
        cache.incr("k", delta)
    with pytest.raises(TypeError, match="delta"):
        cache.decr("k", delta)
    assert cache.get("k") == 1


def test_touch(cache: Cache, clock: FakeClock) -> None:
    assert cache.touch("missing", 10) is False
    cache.set("k", 1, ttl=2)
    assert cache.touch("k", 10) is True
    clock.advance(5)
    assert cache.get("k") == 1
    assert cache.touch("k", None) is True
    assert cache.ttl("k") is None
    assert cache.touch("k", 0) is True
    assert cache.get("k") is None
    cache.set("e", 1, ttl=1)
    clock.advance(1)
    assert cache.touch("e", 100) is False  # expired stays expired
    assert cache.get("e") is None


def test_pull(cache: Cache, clock: FakeClock) -> None:
    cache.set("k", [1])
    assert cache.pull("k") == [1]
    assert cache.pull("k", "dflt") == "dflt"
    assert cache.get("k") is None
    cache.set("e", 1, ttl=1)
    clock.advance(1)
    assert cache.pull("e", "dflt") == "dflt"


def test_many(cache: Cache, clock: FakeClock) -> None:
    assert cache.set_many({"a": 1, "b": [2], "c": None}, ttl=10) == []
    assert cache.get_many(iter(["a", "b", "c", "d", "a"])) == {"a": 1, "b": [2], "c": None}
    assert cache.get_many([]) == {}
    assert cache.delete_many(["a", "d", "a"]) == 1
    assert cache.get_many(["a", "b"]) == {"b": [2]}
    clock.advance(10)
    assert cache.get_many(["b", "c"]) == {}
    assert cache.delete_many(["b", "c"]) == 0
    cache.set_many({f"k{i}": i for i in range(1200)})  # past SQLite's variable limit
    assert len(cache.get_many([f"k{i}" for i in range(1200)])) == 1200
    assert cache.delete_many(f"k{i}" for i in range(1200)) == 1200


def test_clear(cache: Cache) -> None:
    cache.set_many({"a": 1, "b": 2})
    cache.get("a")
    lock = cache.lock("l")
    assert lock.acquire(blocking=False)
    cache.clear()
    assert cache.get_many(["a", "b"]) == {}
    assert cache.stats()["entries"] == 0
    assert lock.locked()  # locks stay


def test_prefix_isolates(cache_dir: str) -> None:
    a = Cache(cache_dir, prefix="a:")
    b = Cache(cache_dir, prefix="b:")
    a.set("k", 1)
    b.set("k", 2)
    assert (a.get("k"), b.get("k")) == (1, 2)
    a.delete("k")
    assert (a.get("k"), b.get("k")) == (None, 2)


def test_key_limits(cache: Cache) -> None:
    for key in ("a" * 1024, "é" * 512, "😀" * 256, "k\x01ctl", "k with spaces\n"):
        cache.set(key, key)
        assert cache.get(key) == key
        assert cache.incr(key[:-1] + "#") == 1


def test_remember(cache: Cache, clock: FakeClock) -> None:
    calls: list[int] = []

    def compute() -> list[int]:
        calls.append(1)
        return [len(calls)]

    assert cache.remember("r", 10, compute) == [1]
    assert cache.remember("r", 10, compute) == [1]
    assert len(calls) == 1
    clock.advance(10)
    assert cache.remember("r", 10, compute) == [2]
    assert cache.remember("n", None, lambda: None) is None
    assert cache.remember("n", None, compute) is None  # a stored None is remembered
    assert len(calls) == 2
    assert cache.remember("é" * 512, 10, lambda: "long") == "long"  # long key, long lock name
    assert not cache.store.conn().execute("SELECT COUNT(*) FROM locks").fetchone()[0]


def test_remember_error_stores_nothing(cache: Cache) -> None:
    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        cache.remember("r", 10, fail)
    assert not cache.has("r")
    assert cache.remember("r", 10, lambda: 3) == 3  # the lock was released


def test_undecodable_pickle_is_a_miss(cache: Cache, caplog: pytest.LogCaptureFixture) -> None:
    cache.store.set("raw", TAG_PICKLE, b"\x80\x05not a pickle", None)
    with caplog.at_level(logging.WARNING):
        assert cache.get("raw", "dflt") == "dflt"
        assert cache.get_many(["raw"]) == {}
        assert cache.pull("raw", "dflt") == "dflt"
    assert "cannot be decoded" in caplog.text


def test_class_removed_after_caching(cache: Cache) -> None:
    module = types.ModuleType("hypercacheio_vanishing")
    exec("class Thing:\n    def __init__(self):\n        self.items = [1]\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        cache.set("thing", module.Thing())
        assert cache.get("thing").items == [1]  # fills L1 (kept encoded: it is mutable)
        cache.set("ok", [1])
    finally:
        del sys.modules[module.__name__]
    assert cache.get("thing", "dflt") == "dflt"
    assert cache.get_many(["thing", "ok"]) == {"ok": [1]}
    assert cache.has("thing") is False


def test_stats(cache: Cache) -> None:
    cache.set("a", "xyz")
    cache.get("a")
    cache.get("a")
    cache.get("missing")
    st = cache.stats()
    for field in ("hits", "misses", "l1_hits", "l1_items", "entries", "db_bytes", "wal_bytes",
                  "value_bytes", "locks", "path"):
        assert field in st
    assert (st["hits"], st["misses"], st["entries"]) == (2, 1, 1)
    if cache.settings.l1_max_items:
        assert st["l1_hits"] == 1 and st["l1_items"] == 2
    else:
        assert st["l1_hits"] == 0 and st["l1_items"] == 0
    assert st["db_bytes"] > 0 and st["wal_bytes"] > 0


def test_threads_share_a_cache(cache: Cache) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(100):
                cache.incr("n")
                cache.get("n")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.get("n") == 400


# ---- bad input: a clear error and an unchanged store ------------------------------------

BAD_KEYS = [b"bytes", 1, None, ("t",), "", "a" * 1025, "é" * 512 + "a", "a" * 1023 + "é",
            "\ud800", "x\udc00y",
            # NUL: reserved for internal names such as the cluster-wide add's lease
            "a\x00b", "\x00add:keep"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
def test_invalid_keys_change_nothing(cache: Cache, key: Any) -> None:
    cache.set("keep", "me")
    cache.get("keep")
    before = _snapshot(cache)
    calls: list[Any] = [
        lambda: cache.set(key, 1), lambda: cache.get(key), lambda: cache.add(key, 1),
        lambda: cache.delete(key), lambda: cache.has(key), lambda: cache.pull(key),
        lambda: cache.incr(key), lambda: cache.decr(key), lambda: cache.touch(key, 5),
        lambda: cache.ttl(key), lambda: cache.get_many(["keep", key]),
        lambda: cache.set_many({"new": 1, key: 2}), lambda: cache.delete_many(["keep", key]),
        lambda: cache.lock(key), lambda: cache.remember(key, 5, lambda: 1),
        lambda: key in cache,
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError, match="key must be"):
            call()
    assert _snapshot(cache) == before
    assert cache.get("keep") == "me"


def test_unhashable_key(cache: Cache) -> None:
    with pytest.raises(InvalidKeyError, match="got list"):
        cache.get(["a"])  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [lambda: 1, threading.Lock(), (x for x in "ab"),
                                   [1, threading.Lock()]], ids=["lambda", "lock", "gen", "nested"])
def test_unpicklable_values_change_nothing(cache: Cache, value: Any) -> None:
    cache.set("k", "before")
    cache.get("k")
    before = _snapshot(cache)
    for call in (lambda: cache.set("k", value), lambda: cache.add("new", value),
                 lambda: cache.set_many({"k": 2, "new": value}),
                 lambda: cache.remember("r", 5, lambda: value)):
        with pytest.raises(InvalidValueError, match="does not pickle") as info:
            call()
        assert isinstance(info.value, (TypeError, HypercacheioError))
    assert _snapshot(cache) == before
    assert cache.get("k") == "before"


@pytest.mark.parametrize("ttl", ["10", b"1", [1], True, object(), 1j])
def test_invalid_ttl_types_change_nothing(cache: Cache, ttl: Any) -> None:
    cache.set("k", "before")
    before = _snapshot(cache)
    for call in (lambda: cache.set("k", 1, ttl=ttl), lambda: cache.add("n", 1, ttl=ttl),
                 lambda: cache.touch("k", ttl), lambda: cache.set_many({"k": 1}, ttl=ttl),
                 lambda: cache.lock("l", ttl=ttl)):
        with pytest.raises(TypeError, match="ttl"):
            call()
    assert _snapshot(cache) == before
    assert cache.get("k") == "before"


def test_nan_ttl(cache: Cache) -> None:
    cache.set("k", "before")
    with pytest.raises(ValueError, match="NaN"):
        cache.set("k", 1, ttl=float("nan"))
    assert cache.get("k") == "before"


def test_pickle_of_a_value_is_stored_not_the_object(cache: Cache) -> None:
    value = {"a": [1]}
    cache.set("k", value)
    value["a"].append(2)  # mutating the caller's object after set changes nothing
    assert cache.get("k") == {"a": [1]}
    assert pickle.loads(_snapshot(cache)[0][2]) == {"a": [1]}


class Box:
    """A hashable object that can change: it may sit in a frozenset or a tuple."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.parametrize("wrap", [lambda b: frozenset({b}), lambda b: (frozenset({b}),)],
                         ids=["frozenset", "tuple-of-frozenset"])
def test_mutating_an_object_inside_a_returned_frozenset_changes_nothing(
        cache: Cache, wrap: Any) -> None:
    cache.set("k", wrap(Box(1)))
    first = cache.get("k")
    box = next(iter(first if isinstance(first, frozenset) else first[0]))
    box.value = 2
    again = cache.get("k")
    assert next(iter(again if isinstance(again, frozenset) else again[0])).value == 1


def test_a_cache_used_without_a_name_reads(cache_dir: str) -> None:
    """Regression: ``Cache(d).get(k)`` dropped its Cache before the L1 miss reached the
    store (the L1 called back through a weak reference) and answered None."""
    Cache(cache_dir).set("k", "v")
    assert Cache(cache_dir).get("k") == "v"
    assert Cache(cache_dir, l1_max_items=0).get("k") == "v"
