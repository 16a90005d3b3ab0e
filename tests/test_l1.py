"""l1: the shared token table, the bounded map, and coherence between Cache objects."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3

import pytest

from conftest import FakeClock
from hypercacheio import Cache
from hypercacheio.codec import TAG_INT
from hypercacheio.l1 import SLOTS, TokenTable, is_immutable, slot_of
from hypercacheio.store import DB_NAME, TOKENS_NAME


def _slots(keys: list[str]) -> list[int]:
    return [slot_of(k) for k in keys]


def test_slot_is_stable_across_processes() -> None:
    keys = ["a", "key:1", "é€😀", "x" * 1000, "\ud800-stored-as-surrogatepass"]
    here = _slots(keys)
    assert all(0 <= s < SLOTS for s in here)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, fresh hash seed
    with ctx.Pool(1) as pool:
        assert pool.apply(_slots, (keys,)) == here


def test_token_table_shared_between_mappings(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), TOKENS_NAME)
    a = TokenTable(path)
    b = TokenTable(path)
    assert os.path.getsize(path) == SLOTS * 8
    slot = slot_of("k")
    before = b.tokens[slot]
    a.publish(["k"])
    assert b.tokens[slot] != before
    seen = set()
    for _ in range(100):  # fresh tokens, never a repeat
        a.publish(["k"])
        seen.add(b.tokens[slot])
    assert len(seen) == 100
    snapshot = bytes(b.tokens.tobytes())
    a.publish_all()
    after = b.tokens.tobytes()
    changed = sum(x != y for x, y in zip(memoryview(snapshot).cast("Q"),
                                         memoryview(after).cast("Q"), strict=True))
    assert changed > SLOTS - 10
    a.close()
    b.close()


def test_is_immutable() -> None:
    assert is_immutable(1) and is_immutable("s") and is_immutable(None)
    assert is_immutable((1, ("a", b"b"), frozenset({1})))
    assert not is_immutable([1])
    assert not is_immutable((1, [2]))
    assert not is_immutable({"a": 1})
    assert not is_immutable(bytearray(b"x"))
    assert not is_immutable(frozenset({(1, object())}))  # hashable is not immutable


def test_l1_serves_hits_without_the_store(cache_dir: str) -> None:
    c = Cache(cache_dir)
    c.set("k", "v")
    assert c.get("k") == "v"
    before = c.stats()["l1_hits"]
    for _ in range(10):
        assert c.get("k") == "v"
    assert c.stats()["l1_hits"] == before + 10


def test_l1_remembers_misses(cache_dir: str) -> None:
    a = Cache(cache_dir)
    b = Cache(cache_dir)
    assert a.get("k", "dflt") == "dflt"
    assert a.get("k", "dflt") == "dflt"
    assert a.stats()["l1_hits"] == 1
    b.set("k", "now here")
    assert a.get("k") == "now here"


@pytest.mark.parametrize("op", ["set", "delete", "incr", "touch0", "add", "clear", "pull",
                                "set_many", "delete_many"])
def test_write_by_another_cache_invalidates(cache_dir: str, op: str) -> None:
    reader = Cache(cache_dir)
    writer = Cache(cache_dir, l1_max_items=0)
    writer.set("k", 1)
    writer.set("other", 1)
    assert reader.get("k") == 1  # now in reader's L1
    assert reader.get("k") == 1
    expected: object
    if op == "set":
        writer.set("k", 2)
        expected = 2
    elif op == "delete":
        writer.delete("k")
        expected = None
    elif op == "incr":
        writer.incr("k", 5)
        expected = 6
    elif op == "touch0":
        writer.touch("k", 0)
        expected = None
    elif op == "add":
        writer.delete("k")
        assert reader.get("k") is None
        writer.add("k", 3)
        expected = 3
    elif op == "clear":
        writer.clear()
        expected = None
    elif op == "pull":
        writer.pull("k")
        expected = None
    elif op == "set_many":
        writer.set_many({"k": 4, "z": 0})
        expected = 4
    else:
        writer.delete_many(["other", "k"])
        expected = None
    assert reader.get("k") == expected
    assert reader.get_many(["k"]) == ({} if expected is None else {"k": expected})


def test_l1_is_bounded(cache_dir: str) -> None:
    c = Cache(cache_dir, l1_max_items=3)
    for i in range(10):
        c.set(f"k{i}", i)
        c.get(f"k{i}")
    assert c.stats()["l1_items"] == 3
    assert c._l1 is not None and set(c._l1.data) == {"k7", "k8", "k9"}
    assert c.get("k0") == 0  # evicted from L1, still in the store


def test_l1_respects_row_expiry(cache_dir: str, clock: FakeClock) -> None:
    c = Cache(cache_dir, clock=clock)
    c.set("k", "v", ttl=10)
    assert c.get("k") == "v"
    clock.advance(9.9)
    assert c.get("k") == "v"
    clock.advance(0.1)
    assert c.get("k") is None


def test_l1_max_age_bounds_staleness(cache_dir: str, clock: FakeClock) -> None:
    # A write that never published its token (a writer killed between commit and publish):
    # the L1 serves the old value at most l1_max_age seconds.
    c = Cache(cache_dir, clock=clock, l1_max_age=5)
    c.set("k", 1)
    assert c.get("k") == 1
    raw = sqlite3.connect(os.path.join(cache_dir, DB_NAME))
    raw.execute("UPDATE entries SET value = 2 WHERE key = 'k' AND tag = ?", (TAG_INT,))
    raw.commit()
    raw.close()
    assert c.get("k") == 1  # the token did not move: the L1 trusts its copy
    clock.advance(5)
    assert c.get("k") == 2


@pytest.mark.parametrize("ttl", [None, 60])
def test_writer_killed_between_commit_and_publish_still_invalidates(
        cache_dir: str, clock: FakeClock, ttl: float | None) -> None:
    # The writer publishes before its COMMIT as well as after: if it dies right after the
    # COMMIT (simulated by skipping everything that follows it), readers that filled their
    # L1 earlier still refetch. No age bound is configured, so nothing else would save them.
    reader = Cache(cache_dir, clock=clock)
    writer = Cache(cache_dir, clock=clock)
    reader.set("k", "old", ttl=ttl)
    reader.set("other", "old", ttl=ttl)
    assert reader.get("k") == "old" and reader.get("other") == "old"
    assert reader.get("k") == "old"  # an L1 hit now
    died = RuntimeError("killed after COMMIT")

    def die(changed: list[str], everything: bool = False, slots: object = None) -> None:
        raise died

    writer.store._finish = die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        writer.set("k", "new", ttl=ttl)
    with pytest.raises(RuntimeError):
        writer.set_many({"other": "new"}, ttl=ttl)
    assert reader.get("k") == "new"
    assert reader.get("other") == "new"


def test_returned_mutables_are_copies(cache_dir: str) -> None:
    c = Cache(cache_dir)
    c.set("list", [1, 2])
    c.set("dict", {"a": [1]})
    c.set("tuple", (1, [2]))
    for _ in range(2):  # the first get fills L1, the second hits it
        got = c.get("list")
        got.append(3)
        d = c.get("dict")
        d["a"].append(2)
        d["b"] = 1
        t = c.get("tuple")
        t[1].append(3)
    assert c.get("list") == [1, 2]
    assert c.get("dict") == {"a": [1]}
    assert c.get("tuple") == (1, [2])
    many = c.get_many(["list"])
    many["list"].append(9)
    assert c.get_many(["list"]) == {"list": [1, 2]}


def test_l1_disabled(cache_dir: str) -> None:
    c = Cache(cache_dir, l1_max_items=0)
    c.set("k", 1)
    for _ in range(3):
        assert c.get("k") == 1
    st = c.stats()
    assert st["l1_hits"] == 0 and st["l1_items"] == 0 and st["hits"] == 3


def test_l1_is_bounded_in_bytes_and_clear_frees_them(cache_dir: str) -> None:
    bound = 1024 * 1024
    c = Cache(cache_dir, l1_max_bytes=bound)
    values = {f"big{i}": (b"b" * 100_000 if i % 3 == 0 else "s" * 100_000 if i % 3 == 1
                          else {"blob": b"d" * 100_000, "i": i}) for i in range(60)}
    for key, value in values.items():
        c.set(key, value)
    for _ in range(2):
        for key, value in values.items():
            assert c.get(key) == value
            assert c.stats()["l1_bytes"] <= bound
    st = c.stats()
    assert bound / 2 < st["l1_bytes"] <= bound and 0 < st["l1_items"] < 60
    assert c._l1 is not None
    assert st["l1_bytes"] == sum(entry[5] for entry in c._l1.data.values())
    c.delete("big59")
    assert c.stats()["l1_bytes"] == sum(entry[5] for entry in c._l1.data.values())
    c.clear()
    assert c.stats()["l1_bytes"] == 0 and c.stats()["l1_items"] == 0


def test_value_larger_than_the_byte_bound_is_not_kept(cache_dir: str) -> None:
    c = Cache(cache_dir, l1_max_bytes=1000)
    c.set("small", "x" * 10)
    c.set("large", "x" * 2000)
    assert c.get("small") == "x" * 10 and c.get("large") == "x" * 2000
    assert c._l1 is not None and set(c._l1.data) == {"small"}


def test_l1_max_bytes_from_the_environment() -> None:
    from hypercacheio.config import Settings
    from hypercacheio.errors import ConfigError

    assert Settings().l1_max_bytes == 32 * 1024 * 1024
    assert Settings.from_env({"HYPERCACHEIO_L1_MAX_BYTES": "1048576"}).l1_max_bytes == 1 << 20
    with pytest.raises(ConfigError, match="l1_max_bytes"):
        Settings(l1_max_bytes=-1)
