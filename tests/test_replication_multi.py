"""Active-active (multi-writer) replication at the store level, without the network.

Three (or four) stores in their own directories, each clustered and ``multi_writer`` with
its own node id, write concurrently; their oplog records travel between every pair through
msgpack frames in random order, duplicated, dropped (repaired by a later resend from the
last acknowledged position) and delayed. At the end every store holds the same rows
(checksum with versions) and what the documented rules predict from the log of every write:
last writer wins on (hlc, node), and a counter is its base's value plus every increment made
on that base (``hypercacheio.store.counters``).
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import FakeClock
from hypercacheio.codec import TAG_BYTES, TAG_INT, TAG_STR, TAG_TOMBSTONE
from hypercacheio.replication import Record
from hypercacheio.replication.antientropy import differing, repair
from hypercacheio.replication.frames import (
    decode_batch,
    decode_snapshot_chunk,
    encode_batch,
    encode_snapshot_chunk,
)
from hypercacheio.replication.records import CLEAR, DELETE, INCR, SET, TOUCH
from hypercacheio.store import Store
from hypercacheio.store.mesh import BUCKETS
from test_replication_store import V1_TABLES

pytestmark = pytest.mark.timeout(180)

Version = tuple[int, str]


# ---- the harness: stores, links, and the log of every write --------------------------------

@dataclass
class Link:
    """One direction of a pair: what the sender has sent, what the receiver acknowledged."""

    src: Store
    dst: Store
    name: str  # the receiver's name, as the sender registered it
    cursor: int = 0
    acked: int = 0
    flight: list[tuple[int, int, bytes]] = field(default_factory=list)
    delivered: set[tuple[int, int]] = field(default_factory=set)

    def ack(self, lo: int, hi: int) -> None:
        self.delivered.add((lo, hi))
        moved = True
        while moved:
            moved = False
            for a, b in list(self.delivered):
                if a <= self.acked < b:
                    self.acked = b
                    moved = True
                if b <= self.acked:
                    self.delivered.discard((a, b))
        self.src.peer_ack(self.name, self.acked)


class Mesh:
    def __init__(self, stores: dict[str, Store]) -> None:
        self.stores = stores
        self.links: list[Link] = []
        for a in stores:
            for b in stores:
                if a != b:
                    self.join(a, b)

    def join(self, a: str, b: str, cursor: int = 0) -> Link:
        self.stores[a].peer_ack(b, cursor)  # registered: the oplog waits for it
        link = Link(self.stores[a], self.stores[b], b, cursor, cursor)
        self.links.append(link)
        return link

    def send(self, rng: random.Random, link: Link) -> None:
        records = link.src.oplog_since(link.cursor, rng.randint(1, 20))
        if records:
            link.flight.append((link.cursor, records[-1].seq,
                                encode_batch(link.src.node_id, records)))
            link.cursor = records[-1].seq

    def deliver(self, rng: random.Random, link: Link, drop: float = 0.0,
                dup: float = 0.0) -> None:
        i = rng.randrange(len(link.flight))  # any in-flight batch: reordered
        lo, hi, frame = link.flight[i] if rng.random() < dup else link.flight.pop(i)
        if rng.random() < drop:
            return  # lost: a later resend repairs it
        link.dst.apply(decode_batch(frame).records)
        link.ack(lo, hi)

    def step(self, rng: random.Random, drop: float = 0.05, dup: float = 0.1) -> None:
        link = rng.choice(self.links)
        roll = rng.random()
        if roll < 0.45:
            self.send(rng, link)
        elif roll < 0.95:
            if link.flight:
                self.deliver(rng, link, drop, dup)
        else:
            link.cursor = link.acked  # resend what is not acknowledged (drops, delays)

    def settle(self, rng: random.Random) -> None:
        for _ in range(10_000):
            busy = False
            for link in self.links:
                while link.flight:
                    self.deliver(rng, link)
                    busy = True
                last = link.src.oplog_position()
                if link.acked < last:
                    link.cursor = link.acked
                    while link.cursor < last:
                        self.send(rng, link)
                    busy = True
            if not busy:
                return
        raise AssertionError("the mesh did not settle")


class Log:
    """Every record any store wrote locally: what the rules are checked against."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def run(self, store: Store, write: Callable[[], object]) -> None:
        before = store.oplog_position()
        try:
            write()
        except (TypeError, OverflowError, KeyError):
            pass
        self.records.extend(store.oplog_since(before, 1000))

    def expected(self, now: float) -> dict[str, tuple[int, object, float | None] | None]:
        """Per key: the row the rules give at ``now``, from the writes alone (increments
        are only made on counters that never expire)."""
        clears = [(r.hlc, r.node) for r in self.records if r.op == CLEAR]
        floor: Version = max(clears, default=(0, ""))
        keys = {r.key for r in self.records if r.key is not None}
        out: dict[str, tuple[int, object, float | None] | None] = {}
        for key in keys:
            mine = [r for r in self.records if r.key == key]
            writes = [r for r in mine if r.op in (SET, DELETE, TOUCH)]
            assert all(r.op != TOUCH for r in writes)  # active-active logs a touch as a set
            base: Version = floor
            top: Record | None = None
            for r in writes:
                if (r.hlc, r.node) > base:
                    base, top = (r.hlc, r.node), r
            incrs = [r for r in mine if r.op == INCR and (r.base_hlc, r.base_node) == base]
            # each origin's last record on the base holds its whole contribution
            last: dict[str, Record] = {}
            for r in incrs:
                if r.node not in last or r.origin_seq > last[r.node].origin_seq:
                    last[r.node] = r
            total = sum(r.total or 0 for r in last.values())
            assert total == sum(r.delta or 0 for r in incrs)
            if top is not None and top.op == SET:
                assert top.tag is not None
                if last:
                    assert top.tag == TAG_INT
                    out[key] = (TAG_INT, int(top.value or 0) + total, top.expire_at)
                else:
                    out[key] = (top.tag, top.value, top.expire_at)
            elif last:  # a base of value 0 (a delete, a clear, nothing)
                expires = [r.expire_at for r in last.values()]
                expire = None if None in expires else max(e for e in expires if e is not None)
                out[key] = (TAG_INT, total, expire)
            else:
                out[key] = None
            row = out[key]
            if row is not None and row[2] is not None and row[2] <= now:
                out[key] = None
        return out


def _stores(tmp_path: Path, names: str, clock: Callable[[], float]) -> dict[str, Store]:
    stores = {}
    for name in names:
        store = Store(str(tmp_path / name), clock=clock)
        store.mark_clustered(True, multi_writer=True)
        stores[name] = store
    return stores


def _write(rng: random.Random, store: Store, log: Log, now: float, keys: list[str],
           counters: list[str], clear: bool = True) -> None:
    key = rng.choice(keys)
    counter = rng.choice(counters)
    expire = rng.choice([None, now + 3600.0, now + rng.uniform(0.001, 0.05)])
    roll = rng.random()
    if roll < 0.40:
        delta = rng.randint(-5, 9)
        log.run(store, lambda: store.incr(counter, delta, None))
    elif roll < 0.50:
        log.run(store, lambda: store.set(counter, TAG_INT, rng.randint(0, 100), None))
    elif roll < 0.55:
        log.run(store, lambda: store.delete(counter))
    elif roll < 0.58:
        log.run(store, lambda: store.touch(counter, now + 7200.0))
    elif roll < 0.72:
        value = rng.choice([(TAG_STR, "s" * rng.randint(0, 9)),
                            (TAG_BYTES, rng.randbytes(rng.randint(0, 9)))])
        log.run(store, lambda: store.set(key, *value, expire))
    elif roll < 0.78:
        log.run(store, lambda: store.set_many([(k, TAG_STR, "m", expire)
                                               for k in rng.sample(keys, 3)]))
    elif roll < 0.83:
        log.run(store, lambda: store.add(key, TAG_STR, "added", expire))
    elif roll < 0.92:
        log.run(store, lambda: store.delete(key))
    elif roll < 0.97:
        log.run(store, lambda: store.touch(key, now + 600.0))
    elif roll < 0.975 and clear:
        log.run(store, store.clear)
    else:
        log.run(store, lambda: store.pull(key))


def _interleave(rng: random.Random, stores: dict[str, Store], mesh: Mesh, log: Log,
                clock: FakeClock, keys: list[str], counters: list[str], rounds: int, *,
                write_share: float) -> None:
    """``rounds`` steps: a write (no clear) on a random store with probability
    ``write_share``, else one step of the mesh's deliveries."""
    for _ in range(rounds):
        if rng.random() < write_share:
            _write(rng, rng.choice(list(stores.values())), log, clock.now, keys, counters,
                   clear=False)
            clock.advance(0.001)
        else:
            mesh.step(rng)


def _check(stores: dict[str, Store], log: Log | None = None,
           now: float | None = None) -> None:
    sums = {name: s.checksum(versions=True) for name, s in stores.items()}
    assert len(set(sums.values())) == 1, sums
    digests = [s.bucket_digests().buckets for s in stores.values()]
    assert all(d == digests[0] for d in digests)
    if log is None:
        return
    assert now is not None
    for key, row in log.expected(now).items():
        for name, s in stores.items():
            assert s.get(key) == row, (name, key)


# ---- convergence -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_concurrent_writes_on_three_stores_converge(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    mesh, log = Mesh(stores), Log()
    keys = [f"k{i}" for i in range(12)]
    counters = [f"n{i}" for i in range(4)]
    for _ in range(1500):
        if rng.random() < 0.5:
            _write(rng, rng.choice(list(stores.values())), log, clock.now, keys, counters)
            clock.advance(rng.choice([0.0, 0.0005, 0.002]))
        elif rng.random() < 0.01:
            rng.choice(list(stores.values())).purge_expired()  # each in its own time
        else:
            mesh.step(rng)
    mesh.settle(rng)
    _check(stores, log, clock.now)
    assert sum(1 for r in log.records if r.op == INCR) > 200  # the workload did increment
    # every store applied every write of every origin: the vectors agree
    vectors = [s.version_vector() for s in stores.values()]
    assert all(v == vectors[0] for v in vectors)
    for s in stores.values():  # each origin's own numbers are dense
        own = sorted(r.origin_seq for r in log.records if r.node == s.node_id)
        assert own == list(range(1, len(own) + 1))


def test_counters_converge_to_the_exact_sum(tmp_path: Path) -> None:
    """Only increments, on every node at once, delivered in any order with duplicates."""
    rng = random.Random(7)
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    mesh = Mesh(stores)
    total: dict[str, int] = {}
    for _ in range(3000):
        if rng.random() < 0.6:
            key, delta = rng.choice(["x", "y"]), rng.randint(-3, 10)
            rng.choice(list(stores.values())).incr(key, delta, None)
            total[key] = total.get(key, 0) + delta
        else:
            mesh.step(rng, drop=0.1, dup=0.3)
    mesh.settle(rng)
    for s in stores.values():
        assert {k: s.get(k) for k in total} == {k: (TAG_INT, v, None) for k, v in total.items()}
    _check(stores)


def test_concurrent_increments_past_64_bits_are_held_at_the_bound(tmp_path: Path) -> None:
    """Each node's increment is in range alone; together they leave it. The records still
    apply (a refused record would stop the stream for good) and every node holds the bound."""
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    top = 2**63 - 1
    a.incr("big", top - 10, None)  # a base of value 0 (new key) on both
    b.apply(a.oplog_since(0))
    clock.advance(0.001)
    a.incr("big", 8, None)
    b.incr("big", 9, None)  # concurrently: top - 10 + 8 + 9 > top
    from_a, from_b = a.oplog_since(1), b.oplog_since(0)
    a.apply(from_b)
    b.apply(from_a)
    assert a.get("big") == b.get("big") == (TAG_INT, top, None)
    # a live integer base (a set), then increments from both that overflow together
    clock.advance(0.001)
    a.set("big2", TAG_INT, top - 5, None)
    b.apply(a.oplog_since(0))
    clock.advance(0.001)
    a.incr("big2", 4, None)
    b.incr("big2", 3, None)
    a.apply(b.oplog_since(0))
    b.apply(a.oplog_since(0))
    assert a.get("big2") == b.get("big2") == (TAG_INT, top, None)
    # below the bound again: still exact from there on
    a.incr("big2", -top, None)
    b.apply(a.oplog_since(0))
    assert a.get("big2") == b.get("big2") == (TAG_INT, 0, None)


def test_a_set_starts_a_new_base_on_every_node(tmp_path: Path) -> None:
    """The documented rule: a set with version V discards increments made on an older base,
    wherever they arrive first; increments on the new base add up."""
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    a, b, c = stores["a"], stores["b"], stores["c"]
    a.incr("n", 5, None)
    batch_a = a.oplog_since(0)
    b.apply(batch_a)
    c.apply(batch_a)
    clock.advance(0.001)
    b.incr("n", 3, None)  # on a's base
    clock.advance(0.001)
    a.set("n", TAG_INT, 100, None)  # a new base: b's +3 is discarded
    clock.advance(0.001)
    c.incr("n", 1, None)  # also on the old base
    from_a, from_b, from_c = (s.oplog_since(1 if s is a else 0) for s in (a, b, c))
    b.apply(from_c)
    b.apply(from_a)
    c.apply(from_a)
    c.apply(from_b)
    a.apply(from_c)
    a.apply(from_b)
    for s in (a, b, c):
        assert s.get("n") == (TAG_INT, 100, None)
    clock.advance(0.001)
    b.incr("n", 2, None)  # on the new base: counted
    c.incr("n", 4, None)
    for s, others in ((a, (b, c)), (b, (c,)), (c, (b,))):
        for o in others:
            s.apply(o.oplog_since(0))
    for s in (a, b, c):
        assert s.get("n") == (TAG_INT, 106, None)
    _check(stores)


def test_a_contribution_waits_for_the_set_it_counts_from(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    a.set("n", TAG_INT, 10, 5000.0 + clock.now)
    b.apply(a.oplog_since(0))
    b.incr("n", 7, None)
    c = Store(str(tmp_path / "c"), clock=clock)
    c.mark_clustered(True, multi_writer=True)
    assert c.apply(b.oplog_since(0)).applied == 1  # kept, not counted yet
    assert c.get("n") is None
    c.apply(a.oplog_since(0))
    assert c.get("n") == (TAG_INT, 17, 5000.0 + clock.now) == b.get("n")


def test_duplicates_and_replays_are_no_ops(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    for i in range(10):
        a.incr("n", 1, None)
        a.set(f"k{i}", TAG_STR, "v", None)
    records = a.oplog_since(0, 100)
    assert b.apply(records[10:]).applied == 10  # the later half first: out of order
    assert b.version_vector()[a.node_id] == 0  # a gap: nothing below it is known yet
    # the earlier increments are in the later contributions already: skipped
    assert b.apply(records) == (5, 15) and b.version_vector()[a.node_id] == 20
    assert b.apply(records).applied == 0  # a replay
    assert b.apply(list(reversed(records))).skipped_older == 20
    assert b.get("n") == (TAG_INT, 10, None)
    relayed = b.apply(records[:1])  # no echo: applied records are not logged again
    assert relayed.applied == 0 and b.oplog_position() == 0


def test_relayed_records_keep_their_origin(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    a, b, c = stores["a"], stores["b"], stores["c"]
    a.incr("n", 2, None)
    a.set("k", TAG_STR, "v", None)
    b.apply(a.oplog_since(0), relay=True)  # b acts as a catch-up source
    relayed = b.oplog_since(0)
    assert [(r.node, r.origin_seq) for r in relayed] == [(a.node_id, 1), (a.node_id, 2)]
    assert relayed[0].total == 2 and relayed[0].base_hlc == 0
    decoded = decode_batch(encode_batch(b.node_id, relayed)).records
    assert c.apply(decoded).applied == 2
    assert c.apply(a.oplog_since(0)).applied == 0  # the same writes from their origin
    assert c.get("n") == (TAG_INT, 2, None) and c.version_vector()[a.node_id] == 2


def test_real_processes_writing_on_every_store(tmp_path: Path) -> None:
    """Two processes per store increment shared counters at once; the exchange afterwards
    gives every store the exact sum."""
    names = "abc"
    for name in names:
        Store(str(tmp_path / name)).mark_clustered(True, multi_writer=True)
    script = (
        "import json, random, sys\n"
        "from hypercacheio.codec import TAG_STR\n"
        "from hypercacheio.store import Store\n"
        "s = Store(sys.argv[1]); rng = random.Random(sys.argv[2]); sums = {}\n"
        "for i in range(400):\n"
        "    k = rng.choice(['x', 'y', 'z']); d = rng.randint(-2, 7)\n"
        "    s.incr(k, d, None); sums[k] = sums.get(k, 0) + d\n"
        "    s.set(f'{sys.argv[2]}-{i % 20}', TAG_STR, str(i), None)\n"
        "print(json.dumps(sums))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / name),
                               f"{name}{i}"], stdout=subprocess.PIPE)
             for name in names for i in range(2)]
    expected: dict[str, int] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        for k, v in json.loads(out).items():
            expected[k] = expected.get(k, 0) + v
    stores = {name: Store(str(tmp_path / name)) for name in names}
    for s in stores.values():  # each store's own sequence is dense across its processes
        own = [r.origin_seq for r in s.oplog_since(0, 10_000) if r.node == s.node_id]
        assert own == list(range(1, 2 * 800 + 1))
    rng = random.Random(3)
    mesh = Mesh(stores)
    for _ in range(500):
        mesh.step(rng, drop=0.1, dup=0.2)
    mesh.settle(rng)
    for s in stores.values():
        assert {k: s.get(k) for k in expected} == {
            k: (TAG_INT, v, None) for k, v in expected.items()}
    _check(stores)


# ---- deletes ------------------------------------------------------------------------------

def test_a_delete_is_never_undone_by_a_late_or_replayed_record(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    a, b, c = stores["a"], stores["b"], stores["c"]
    a.set("k", TAG_STR, "old", None)
    a.incr("n", 5, None)
    early = a.oplog_since(0)
    b.apply(early)
    clock.advance(0.001)
    b.delete("k")
    b.delete("n")
    deletes = b.oplog_since(0)
    for s in (a, c):
        s.apply(deletes)  # c gets the deletes before the writes they delete
    c.apply(early)
    a.apply(early)  # replays
    b.apply(list(reversed(early)))
    for s in (a, b, c):
        assert s.get("k") is None and s.get("n") is None
    # the same with the version vectors lost: the versions alone still refuse them
    for s in (b, c):
        s.conn().execute("DELETE FROM origins WHERE origin = ?", (a.node_id,))
        s.apply(decode_batch(encode_batch(a.node_id, early)).records)
        assert s.get("k") is None and s.get("n") is None
    _check(stores)


def test_tombstones_wait_for_every_peer(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    a.peer_ack("b", 0)
    a.peer_ack("c", 0)
    a.set("k", TAG_STR, "v", None)
    a.delete("k")
    clock.advance(8 * 24 * 3600)  # past the tombstone window
    a.peer_ack("b", a.oplog_position())
    a.purge_expired()
    tomb = "SELECT tag FROM entries WHERE key = 'k'"
    assert a.conn().execute(tomb).fetchone() == (TAG_TOMBSTONE,)  # c has not acknowledged
    a.peer_ack("c", a.oplog_position())
    a.purge_expired()
    assert a.conn().execute(tomb).fetchone() is None
    b.set("k2", TAG_STR, "v", None)
    b.delete("k2")  # b has no peer registered: the window alone
    clock.advance(8 * 24 * 3600)
    b.purge_expired()
    assert b.conn().execute("SELECT count(*) FROM entries").fetchone() == (0,)


# ---- clock skew ---------------------------------------------------------------------------

def test_a_version_far_ahead_is_applied_counted_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    far = FakeClock(clock.now + 3600)
    a = _stores(tmp_path, "a", far)["a"]
    b = Store(str(tmp_path / "b"), clock=clock, max_clock_skew=30.0)
    b.mark_clustered(True, multi_writer=True)
    a.set("k", TAG_STR, "v", None)
    a.set("j", TAG_STR, "v", None)
    b.apply(a.oplog_since(0, 1))
    b.apply(a.oplog_since(1, 1))
    assert b.get("k") == (TAG_STR, "v", None) and b.get("j") == (TAG_STR, "v", None)
    assert b.skew_counts == {a.node_id: 2}
    assert caplog.text.count("ahead of this host's clock") == 1
    assert b.last_hlc() >= a.last_hlc()  # observed: b's next write stamps beyond it
    b.set("k", TAG_STR, "later", None)
    a.apply(b.oplog_since(0))
    assert a.get("k") == (TAG_STR, "later", None)


# ---- snapshots ----------------------------------------------------------------------------

def test_a_fourth_store_bootstraps_from_a_snapshot_under_writes(tmp_path: Path) -> None:
    rng = random.Random(11)
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    mesh, log = Mesh(stores), Log()
    keys = [f"k{i}" for i in range(40)]
    counters = [f"n{i}" for i in range(5)]

    def work(rounds: int) -> None:
        _interleave(rng, stores, mesh, log, clock, keys, counters, rounds, write_share=0.5)

    work(1500)
    for s in stores.values():  # a counter that only ever grows, on every node
        log.run(s, lambda: s.incr("m", 5, None))  # noqa: B023 (run at once)
    d = _stores(tmp_path, "d", clock)["d"]
    for name in "abc":
        stores[name].peer_ack("d", 0)  # registered before the snapshot: nothing trimmed
    a = stores["a"]
    start = a.snapshot_begin()
    after = None
    while True:
        work(20)  # writes go on between chunks
        chunk = a.snapshot_chunk(start, after, 7)
        d.apply_snapshot(decode_snapshot_chunk(encode_snapshot_chunk(chunk)))
        if chunk.done:
            break
        after = chunk.rows[-1].key
    assert d.version_vector()[a.node_id] >= dict(start.vector)[a.node_id] > 0
    stores["d"] = d
    for name in "abc":  # then the records after it, from every store
        mesh.join(name, "d", start.position if name == "a" else 0)
        mesh.join("d", name)
    mesh.settle(rng)
    _check(stores, log, clock.now)
    assert d.get("m") == (TAG_INT, 15, None)
    work(500)
    mesh.settle(rng)
    _check(stores, log, clock.now)


def test_snapshot_frames_carry_counters_and_vector(tmp_path: Path) -> None:
    clock = FakeClock()
    a = _stores(tmp_path, "a", clock)["a"]
    a.set("n", TAG_INT, 10, None)
    a.incr("n", 5, None)
    start = a.snapshot_begin()
    chunk = next(iter(a.snapshot_chunks(start)))
    assert chunk.rows[0].value == 10  # the base's value: the contribution travels beside it
    decoded = decode_snapshot_chunk(encode_snapshot_chunk(chunk))
    assert decoded == chunk and decoded.start.vector == ((a.node_id, 2),)


# ---- anti-entropy -------------------------------------------------------------------------

def test_anti_entropy_repairs_a_store_restored_from_an_older_copy(tmp_path: Path) -> None:
    rng = random.Random(5)
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    mesh, log = Mesh(stores), Log()
    keys = [f"k{i}" for i in range(300)]
    counters = [f"n{i}" for i in range(5)]

    def work(rounds: int) -> None:
        _interleave(rng, stores, mesh, log, clock, keys, counters, rounds, write_share=0.6)

    work(1500)
    mesh.settle(rng)
    c = stores["c"]
    backup = sqlite3.connect(str(tmp_path / "c-backup.sqlite"))
    with sqlite3.connect(c.path) as live:
        live.backup(backup)
    work(1500)
    mesh.settle(rng)
    _check(stores, log, clock.now)
    with sqlite3.connect(c.path) as live:  # c's file goes back in time, behind its back
        backup.backup(live)
        live.execute("DELETE FROM entries WHERE key IN ('k1', 'k2', 'n1')")
        live.execute("DELETE FROM counters WHERE key = 'n2'")
    backup.close()
    assert c.checksum(versions=True) != stores["a"].checksum(versions=True)
    found = differing(c.bucket_digests(), stores["a"].bucket_digests())
    assert 0 < len(found) < BUCKETS
    result = repair(stores["a"], c)
    assert result.differing == found and result.to_b > 0
    repair(stores["b"], c)
    _check(stores, log, clock.now)
    # c's stream starts again (its oplog went back in time); its new writes reach the others:
    # the vectors it learned keep it from reusing sequence numbers they have seen
    for link in mesh.links:
        if link.src is c:
            link.cursor = link.acked = 0
            link.delivered.clear()
    work(300)
    log.run(c, lambda: c.set("after", TAG_STR, "restore", None))
    log.run(c, lambda: c.incr("n0", 1000, None))
    mesh.settle(rng)
    _check(stores, log, clock.now)
    assert stores["a"].get("after") == (TAG_STR, "restore", None)


def test_anti_entropy_repairs_lost_batches_and_a_missed_clear(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    for i in range(50):
        a.set(f"k{i}", TAG_STR, "v", None)
        b.incr("n", 1, None)
    b.apply(a.oplog_since(0, 20))  # the rest of the stream is lost
    clock.advance(0.01)
    a.clear()
    a.set("fresh", TAG_STR, "v", None)
    a.incr("n", 2, None)  # a never saw b's increments: a count on the clear's base
    result = repair(a, b)
    assert result.differing
    assert a.checksum(versions=True) == b.checksum(versions=True)
    assert b.get("k30") is None and b.get("n") == (TAG_INT, 2, None)
    assert repair(a, b).differing == []  # converged: nothing left to move
    # the vector came along: the lost stream, replayed now, changes nothing
    assert b.apply(a.oplog_since(0, 1000)).applied == 0


def test_digest_sees_a_changed_version_and_contribution(tmp_path: Path) -> None:
    a = _stores(tmp_path, "a", FakeClock())["a"]
    for i in range(100):
        a.set(f"k{i}", TAG_STR, "v", None)
    a.incr("n", 1, None)
    before = a.bucket_digests().buckets
    a.conn().execute("UPDATE entries SET hlc = hlc - 1 WHERE key = 'k7'")
    a.conn().execute("UPDATE counters SET total = 9")
    after = a.bucket_digests().buckets
    assert len(differing(before, after)) == 2


def test_a_version_1_database_becomes_a_multi_writer_store(tmp_path: Path) -> None:
    directory = tmp_path / "v1"
    directory.mkdir()
    conn = sqlite3.connect(directory / "hypercacheio.sqlite")
    conn.executescript(V1_TABLES + """
    INSERT INTO entries VALUES ('n', 0, 4, NULL, 9, 123 << 16, 'v1node');
    INSERT INTO oplog(op, key, tag, value, expire_at, hlc, node)
        VALUES ('set', 'n', 0, 4, NULL, 123 << 16, 'v1node');
    """)
    conn.close()
    clock = FakeClock()
    s = Store(str(directory), clock=clock)
    s.mark_clustered(True, multi_writer=True)
    assert s.oplog_since(0)[0].origin_seq == 0  # the old row: no origin sequence
    assert s.incr("n", 3, None) == 7
    record = s.oplog_since(1)[0]
    assert (record.origin_seq, record.base_hlc, record.total) == (1, 123 << 16, 3)
    other = _stores(tmp_path, "o", clock)["o"]
    other.apply(s.oplog_since(0))
    assert other.get("n") == (TAG_INT, 7, None)


def test_standalone_stores_keep_no_counters(tmp_path: Path) -> None:
    plain = Store(str(tmp_path / "plain"))
    plain.incr("n", 1, None)
    clustered = Store(str(tmp_path / "ps"), clustered=True)  # primary/secondary: one writer
    clustered.incr("n", 1, None)
    for s in (plain, clustered):
        assert s.contributions() == []
    assert clustered.oplog_since(0)[0].total is None



def test_primary_secondary_apply_ignores_origin_sequences(tmp_path: Path) -> None:
    """A single-writer secondary orders by versions and its stream position alone: a
    primary restored from an older copy (its numbers start again) still gets through."""
    clock = FakeClock()
    secondary = Store(str(tmp_path / "s"), clock=clock)
    first = Record(1, SET, "k", TAG_STR, "a", None, 1 << 40, "p", None, 5)
    again = Record(1, SET, "k", TAG_STR, "b", None, 2 << 40, "p", None, 3)
    secondary.apply([first])
    assert secondary.apply([again]).applied == 1
    assert secondary.get("k") == (TAG_STR, "b", None) and secondary.version_vector() == {
        secondary.node_id: 0}


@pytest.mark.parametrize("bad", [
    [1, "incr", "n", TAG_INT, 3, None, 1 << 40, "o", 1, 0, 0, "", 3],  # no origin_seq
    [1, "incr", "n", TAG_INT, 3, None, 1 << 40, "o", 1, 2, None, "", 3],  # no base
    [1, "incr", "n", TAG_INT, 3, None, 1 << 40, "o", 1, 2, 0, 7, 3],  # base_node not a str
    [1, "set", "n", TAG_INT, 3, None, 1 << 40, "o", None, 2, 0, "", 3],  # a set with a total
    [1, "delete", "n", None, None, None, 1 << 40, "o", None, 2, 0, None, None],
    [1, "set", "n", TAG_INT, 3, None, 1 << 40, "o", None, -1, None, None, None],
    [1, "set", "n", TAG_INT, 3, None, 1 << 40, "o", None, 2, None, None],  # 12 fields
])
def test_malformed_contribution_records_are_refused(bad: list[object]) -> None:
    import msgpack

    from hypercacheio.errors import MalformedFrame

    frame = msgpack.packb({"v": 1, "kind": "batch", "source": "o", "records": [bad]})
    with pytest.raises(MalformedFrame):
        decode_batch(frame)


def test_contribution_records_survive_their_frames(tmp_path: Path) -> None:
    a = _stores(tmp_path, "a", FakeClock())["a"]
    a.incr("n", -4, 99.5)
    records = a.oplog_since(0)
    assert decode_batch(encode_batch(a.node_id, records)).records == records
    assert (records[0].total, records[0].delta, records[0].value) == (-4, -4, -4)


def test_a_counter_made_by_increments_expires_at_the_latest_asked(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = _stores(tmp_path, "abc", clock)
    a, b, c = stores["a"], stores["b"], stores["c"]
    a.incr("n", 1, clock.now + 100)
    b.incr("n", 2, clock.now + 200)
    c.incr("m", 1, clock.now + 100)
    c.incr("n", 4, clock.now + 50)
    a.incr("m", 1, None)  # never, if one asked for never
    for s in stores.values():
        for o in stores.values():
            if o is not s:
                s.apply(list(reversed(o.oplog_since(0))))
    for s in stores.values():
        assert s.get("n") == (TAG_INT, 7, clock.now + 200)
        assert s.get("m") == (TAG_INT, 2, None)
    _check(stores)
    a.set("n", TAG_INT, 0, None)  # a new base: the old contributions are no longer counted
    assert len(a.contributions("n")) == 3
    a.purge_expired()
    assert a.contributions("n") == []


def test_a_contribution_on_a_clear_counts_once_the_clear_arrives(tmp_path: Path) -> None:
    """Found by the random workload (seed 6): an increment made right after a clear (its
    base is the clear) reaches a store before the clear does."""
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    a.set("n", TAG_INT, 66, None)
    clock.advance(0.001)
    b.clear()
    b.incr("n", 7, None)
    a.apply(b.oplog_since(1))  # the increment first: it waits
    assert a.get("n") == (TAG_INT, 66, None)
    a.apply(b.oplog_since(0))
    b.apply(a.oplog_since(0))
    assert a.get("n") == b.get("n") == (TAG_INT, 7, None)
    _check(stores)


def test_an_expired_counter_is_the_same_base_purged_or_not(tmp_path: Path) -> None:
    """Each host purges expired rows in its own time; a counter incremented after its
    expiry counts from the same base (value 0, the expired row's version) on all of them."""
    clock = FakeClock()
    stores = _stores(tmp_path, "ab", clock)
    a, b = stores["a"], stores["b"]
    a.set("n", TAG_INT, 50, clock.now + 10)
    b.apply(a.oplog_since(0))
    clock.advance(11)
    a.purge_expired()  # a purged it, b not yet
    assert a.conn().execute("SELECT tag FROM entries WHERE key = 'n'").fetchone() == (
        TAG_TOMBSTONE,)
    a.incr("n", 1, None)
    b.incr("n", 2, None)
    a.apply(b.oplog_since(0))
    b.apply(a.oplog_since(1))
    assert a.get("n") == b.get("n") == (TAG_INT, 3, None)
    b.purge_expired()
    _check(stores)
