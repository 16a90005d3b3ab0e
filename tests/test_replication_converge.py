"""Convergence: a random workload on a clustered primary, shipped through msgpack frames to
a plain secondary (duplicated, reordered within batches, replayed), and a snapshot taken
while another process keeps writing, then caught up from the oplog: the live rows of both
stores end up equal (``Store.checksum``)."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import FakeClock
from hypercacheio.codec import TAG_BYTES, TAG_INT, TAG_PICKLE, TAG_STR, Payload
from hypercacheio.replication import Record
from hypercacheio.replication.frames import (
    decode_batch,
    decode_snapshot_chunk,
    encode_batch,
    encode_snapshot_chunk,
)
from hypercacheio.store import Store

pytestmark = pytest.mark.timeout(120)


def _value(rng: random.Random) -> tuple[int, Payload]:
    kind = rng.randrange(4)
    if kind == 0:
        return TAG_INT, rng.randrange(-1000, 1000)
    if kind == 1:
        return TAG_STR, "v" * rng.randrange(0, 20) + "é"
    if kind == 2:
        return TAG_BYTES, rng.randbytes(rng.randrange(0, 30))
    return TAG_PICKLE, pickle.dumps({"n": rng.random()})


def _write(rng: random.Random, store: Store, clock: FakeClock, keys: list[str]) -> None:
    """One random write of any verb (or time passing: rows expire)."""
    key = rng.choice(keys)
    expire = rng.choice([None, None, clock.now + rng.uniform(0.5, 30)])
    roll = rng.random()
    if roll < 0.25:
        store.set(key, *_value(rng), expire)
    elif roll < 0.32:
        store.set_many([(rng.choice(keys), *_value(rng), expire) for _ in range(3)])
    elif roll < 0.40:
        store.add(key, *_value(rng), expire)
    elif roll < 0.55:
        try:
            store.incr(key, rng.randrange(-5, 6), expire)
        except (TypeError, OverflowError):
            pass
    elif roll < 0.68:
        store.delete(key)
    elif roll < 0.72:
        store.delete_many(rng.sample(keys, 3))
    elif roll < 0.76:
        store.pull(key)
    elif roll < 0.86:
        store.touch(key, rng.choice([None, clock.now + rng.uniform(0.5, 30)]))
    elif roll < 0.87:
        store.clear()
    elif roll < 0.97:
        clock.advance(rng.uniform(0, 3))
    else:
        store.purge_expired()


def _ship(rng: random.Random, primary: Store, secondary: Store, since: int,
          history: list[list[Record]], limit: int) -> int:
    """One batch through a frame: sometimes twice, reordered, or with an old one replayed."""
    records = primary.oplog_since(since, limit)
    if not records:
        return since
    batch = decode_batch(encode_batch(primary.node_id, records)).records
    assert batch == records
    if rng.random() < 0.3:
        rng.shuffle(batch)
    secondary.apply(batch)
    if rng.random() < 0.2:
        secondary.apply(batch)  # delivered twice
    if history and rng.random() < 0.2:
        secondary.apply(rng.choice(history))  # an old batch replayed late
    history.append(batch)
    return records[-1].seq


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_converges(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    primary = Store(str(tmp_path / "p"), clustered=True, clock=clock)
    secondary = Store(str(tmp_path / "s"), clock=clock)
    keys = [f"k{i}" for i in range(40)]
    since, history = 0, list[list[Record]]()
    for step in range(1500):
        _write(rng, primary, clock, keys)
        if rng.random() < 0.1:
            since = _ship(rng, primary, secondary, since, history, rng.randrange(1, 60))
        if step % 500 == 499:  # caught up: equal, with the primary's versions
            while since != primary.oplog_position():
                since = _ship(rng, primary, secondary, since, history, 100)
            assert secondary.checksum(versions=True) == primary.checksum(versions=True)
    while since != primary.oplog_position():
        since = _ship(rng, primary, secondary, since, history, 100)
    count, digest = primary.live_digest()
    assert count > 0
    assert secondary.live_digest() == (count, digest)
    for batch in history:  # every batch replayed once more, in reverse: nothing changes
        secondary.apply(list(reversed(batch)))
    assert secondary.checksum(versions=True) == primary.checksum(versions=True)
    clock.advance(40)  # everything with an expiry is gone on both at the same instant
    assert secondary.checksum() == primary.checksum()


def test_deletes_never_come_back_under_replays(tmp_path: Path) -> None:
    clock = FakeClock()
    primary = Store(str(tmp_path / "p"), clustered=True, clock=clock)
    secondary = Store(str(tmp_path / "s"), clock=clock)
    for i in range(50):
        primary.set(f"k{i}", TAG_INT, i, None)
    sets = primary.oplog_since(0, 100)
    primary.delete_many([f"k{i}" for i in range(0, 50, 2)])
    deletes = primary.oplog_since(sets[-1].seq, 100)
    secondary.apply(deletes)  # the deletes first, then every set late, twice
    secondary.apply(sets)
    secondary.apply(list(reversed(sets)))
    assert secondary.checksum() == primary.checksum()
    assert all(secondary.get(f"k{i}") is None for i in range(0, 50, 2))
    assert secondary.live_digest()[0] == 25


WRITER = """
import random, sys, os, time
from hypercacheio.store import Store
directory, ready, stop = sys.argv[1:4]
store = Store(directory)
rng = random.Random(7)
for i in range(200_000):
    key = f"k{rng.randrange(3000):05}"
    roll = rng.random()
    if roll < 0.5:
        store.set(key, 2, f"w{i}", None)
    elif roll < 0.65:
        try:
            store.incr(key, 1, None)
        except TypeError:
            pass
    elif roll < 0.85:
        store.delete(key)
    else:
        store.touch(key, time.time() + 3600)
    if i == 200:
        open(ready, "w").close()
    if i % 50 == 0 and os.path.exists(stop):
        break
store.close()
"""


def _moved(primary: Store, writer: subprocess.Popen[bytes]) -> Callable[[], bool]:
    """A test that the primary's oplog moved past where it is now (or the writer ended)."""
    seen = primary.oplog_position()
    return lambda: primary.oplog_position() > seen or writer.poll() is not None


def _catch_up(primary: Store, secondary: Store, since: int) -> int:
    """Ship every record after ``since`` through frames, acknowledged; the new position."""
    while records := primary.oplog_since(since, 500):
        batch = decode_batch(encode_batch(primary.node_id, records))
        secondary.apply(batch.records, ack=("primary", batch.source))
        since = records[-1].seq
    return since


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def test_snapshot_then_oplog_converges_while_another_process_writes(tmp_path: Path) -> None:
    primary = Store(str(tmp_path / "p"), clustered=True)
    primary.set_many([(f"k{i:05}", TAG_INT, i, None) for i in range(0, 3000, 2)])
    # a secondary away for long: rows the primary no longer has, all older than the snapshot
    secondary = Store(str(tmp_path / "s"), clock=FakeClock(time.time() - 86400))
    secondary.set_many([(f"k{i:05}", TAG_STR, "stale", None) for i in range(1, 3000, 3)])
    secondary.clock = time.time
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, primary.directory, str(ready),
                               str(stop)])
    try:
        _wait_for(ready.exists, "the writer to start")
        start = primary.snapshot_begin()
        chunks = 0
        for chunk in primary.snapshot_chunks(start, limit=150):
            secondary.apply_snapshot(decode_snapshot_chunk(encode_snapshot_chunk(chunk)),
                                     ack="primary")
            chunks += 1
            # writes land between every two chunk reads
            _wait_for(_moved(primary, writer), "the writer to write")
        assert chunks >= 10
        position = secondary.peer_position("primary")
        assert position is not None and position.acked == start.position
        since = start.position
        for _ in range(3):  # catch up while the writer goes on
            since = _catch_up(primary, secondary, since)
        _wait_for(lambda: primary.oplog_position() > start.position + 1000,
                  "a thousand writes since the snapshot began")
        since = _catch_up(primary, secondary, since)
        stop.touch()
        assert writer.wait(60) == 0
        _catch_up(primary, secondary, since)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    now = time.time()
    assert secondary.checksum(now, versions=True) == primary.checksum(now, versions=True)
    assert secondary.peer_position("primary").acked == primary.oplog_position()  # type: ignore[union-attr]
    assert secondary.live_digest(now)[0] > 500
