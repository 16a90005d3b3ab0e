"""Replication frames: msgpack batches and snapshot chunks, strictly validated; a malformed
frame raises MalformedFrame and nothing of it reaches a store."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import FakeClock
from hypercacheio.codec import TAG_BYTES, TAG_INT, TAG_PICKLE, TAG_STR
from hypercacheio.errors import HypercacheioError, MalformedFrame, ReplicationError
from hypercacheio.replication import Record
from hypercacheio.replication.frames import (
    MAX_BATCH_RECORDS,
    decode_batch,
    decode_snapshot_chunk,
    encode_batch,
    encode_snapshot_chunk,
)
from hypercacheio.store import Store

HLC = 1 << 50


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _batch(*records: list[Any], source: Any = "src") -> bytes:
    return _pack({"v": 1, "kind": "batch", "source": source, "records": list(records)})


GOOD = [1, "set", "k", TAG_STR, "v", None, HLC, "node", None]


@pytest.fixture
def primary(tmp_path: Path, clock: FakeClock) -> Store:
    return Store(str(tmp_path / "primary"), clustered=True, clock=clock)


def test_a_batch_round_trips(primary: Store, clock: FakeClock) -> None:
    primary.set("s", TAG_STR, "é€", clock.now + 1.5)
    primary.set("b", TAG_BYTES, b"\x00\xff" * 10, None)
    primary.set("p", TAG_PICKLE, pickle.dumps(object), None)
    primary.set("i", TAG_INT, -(2**63), None)
    primary.incr("n", 2**62, None)
    primary.touch("s", None)
    primary.delete("b")
    primary.clear()
    records = primary.oplog_since(0, 100)
    batch = decode_batch(encode_batch(primary.node_id, records))
    assert batch.source == primary.node_id
    assert batch.records == records
    assert [type(r.value) for r in batch.records[:3]] == [str, bytes, bytes]


def test_a_snapshot_chunk_round_trips(primary: Store, clock: FakeClock) -> None:
    primary.set("a", TAG_STR, "x", clock.now + 9.25)
    primary.set("b", TAG_INT, 5, None)
    primary.delete("b")
    start = primary.snapshot_begin()
    for limit in (1, 10):
        for chunk in primary.snapshot_chunks(start, limit):
            assert decode_snapshot_chunk(encode_snapshot_chunk(chunk)) == chunk


BAD_RECORDS = {
    "not an array": "set",
    "too few fields": GOOD[:8],
    "seq zero": [0, *GOOD[1:]],
    "seq a bool": [True, *GOOD[1:]],
    "unknown op": [1, "merge", *GOOD[2:]],
    "op not a string": [1, 3, *GOOD[2:]],
    "empty key": [1, "set", "", *GOOD[3:]],
    "key too long": [1, "set", "k" * 1025, *GOOD[3:]],
    "key not a string": [1, "set", b"k", *GOOD[3:]],
    "unknown tag": [1, "set", "k", 9, "v", None, HLC, "node", None],
    "tombstone tag in a set": [1, "set", "k", -1, None, None, HLC, "node", None],
    "str value as bytes": [1, "set", "k", TAG_STR, b"v", None, HLC, "node", None],
    "int value as str": [1, "set", "k", TAG_INT, "1", None, HLC, "node", None],
    "pickle value as str": [1, "set", "k", TAG_PICKLE, "x", None, HLC, "node", None],
    "expiry a string": [1, "set", "k", TAG_STR, "v", "soon", HLC, "node", None],
    "expiry infinite": [1, "set", "k", TAG_STR, "v", float("inf"), HLC, "node", None],
    "hlc negative": [1, "set", "k", TAG_STR, "v", None, -1, "node", None],
    "hlc a float": [1, "set", "k", TAG_STR, "v", None, 1.5, "node", None],
    "node empty": [1, "set", "k", TAG_STR, "v", None, HLC, "", None],
    "node too long": [1, "set", "k", TAG_STR, "v", None, HLC, "n" * 129, None],
    "set with a delta": [1, "set", "k", TAG_INT, 1, None, HLC, "node", 1],
    "incr without delta": [1, "incr", "k", TAG_INT, 1, None, HLC, "node", None],
    "incr of a str": [1, "incr", "k", TAG_STR, "1", None, HLC, "node", 1],
    "delete with a value": [1, "delete", "k", None, "v", None, HLC, "node", None],
    "touch with a tag": [1, "touch", "k", TAG_INT, None, 5.0, HLC, "node", None],
    "clear with a key": [1, "clear", "k", None, None, None, HLC, "node", None],
}


@pytest.mark.parametrize("record", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_bad_record_spoils_the_whole_batch(record: Any) -> None:
    with pytest.raises(MalformedFrame, match="malformed replication frame") as info:
        decode_batch(_batch(GOOD, record))
    assert isinstance(info.value, ReplicationError)
    assert isinstance(info.value, HypercacheioError) and isinstance(info.value, ValueError)


BAD_FRAMES = {
    "not msgpack": b"\xc1garbage",
    "trailing bytes": _batch(GOOD) + b"\x00",
    "truncated": _batch(GOOD)[:-3],
    "an array": _pack([1, "batch"]),
    "wrong version": _pack({"v": 2, "kind": "batch", "source": "s", "records": []}),
    "wrong kind": _pack({"v": 1, "kind": "snapshot", "source": "s", "records": []}),
    "extra field": _pack({"v": 1, "kind": "batch", "source": "s", "records": [], "x": 1}),
    "records a map": _pack({"v": 1, "kind": "batch", "source": "s", "records": {}}),
    "source missing": _pack({"v": 1, "kind": "batch", "records": []}),
    "source empty": _batch(GOOD, source=""),
    "an extension type": _pack({"v": 1, "kind": "batch", "source": "s",
                                "records": [msgpack.ExtType(5, b"x")]}),
    "invalid utf-8": b"\x84\xa1v\x01\xa4kind\xa5batch\xa6source\xa1\xff\xa7records\x90",
}


@pytest.mark.parametrize("data", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_malformed_batch_frames(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_batch(data)


def test_oversized_batches_are_refused() -> None:
    with pytest.raises(MalformedFrame, match="over the limit of 3 per batch"):
        decode_batch(_batch(GOOD, GOOD, GOOD, GOOD), max_records=3)
    with pytest.raises(MalformedFrame, match="bytes, over the limit of 100"):
        decode_batch(_batch(*[GOOD] * 5), max_bytes=100)
    assert len(decode_batch(_batch(*[GOOD] * MAX_BATCH_RECORDS)).records) == MAX_BATCH_RECORDS
    with pytest.raises(MalformedFrame):
        decode_batch(_batch(*[GOOD] * (MAX_BATCH_RECORDS + 1)))


def test_an_error_never_shows_a_value() -> None:
    secret = "hunter2-secret-value"
    bad = [1, "set", "k", TAG_INT, secret, None, HLC, "node", None]
    with pytest.raises(MalformedFrame) as info:
        decode_batch(_batch(bad))
    assert secret not in str(info.value)


def test_a_malformed_frame_changes_nothing(tmp_path: Path, primary: Store,
                                           clock: FakeClock) -> None:
    secondary = Store(str(tmp_path / "secondary"), clock=clock)
    for i in range(499):
        primary.set(f"k{i}", TAG_INT, i, None)
    records = [list(r) for r in primary.oplog_since(0, 500)]
    before = secondary.live_digest()
    frame = _batch(*records, [500, "set", "bad", 7, 1, None, HLC, "n", None])
    with pytest.raises(MalformedFrame):
        secondary.apply(decode_batch(frame).records)
    assert secondary.live_digest() == before == (0, Store(str(tmp_path / "empty")).checksum())
    assert secondary.last_hlc() < HLC  # not even the clock moved
    secondary.apply(decode_batch(_batch(*records, source=primary.node_id)).records)
    assert secondary.checksum() == primary.checksum()


def _chunk(rows: list[Any], after: Any = None, done: Any = True,
           start: Any = None) -> bytes:
    return _pack({"v": 1, "kind": "snapshot", "start": start or [3, HLC, "src", 0, ""],
                  "after": after, "done": done, "rows": rows})


ROW = ["k", TAG_STR, "v", None, HLC, "node"]
BAD_CHUNKS = {
    "keys out of order": _chunk([["b", *ROW[1:]], ["a", *ROW[1:]]]),
    "duplicate keys": _chunk([ROW, ROW]),
    "a key not after 'after'": _chunk([ROW], after="k"),
    "not done and empty": _chunk([], done=False),
    "done not a bool": _chunk([ROW], done=1),
    "tombstone with a value": _chunk([["k", -1, "v", 5.0, HLC, "n"]]),
    "tombstone without expiry": _chunk([["k", -1, None, None, HLC, "n"]]),
    "row too short": _chunk([ROW[:5]]),
    "start too short": _chunk([ROW], start=[3, HLC, "src", 0]),
    "start negative position": _chunk([ROW], start=[-3, HLC, "src", 0, ""]),
    "a batch": _batch(GOOD),
}


@pytest.mark.parametrize("data", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_malformed_snapshot_chunks(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_snapshot_chunk(data)


def test_a_good_chunk_decodes() -> None:
    chunk = decode_snapshot_chunk(_chunk([["a", -1, None, 5.0, HLC, "n"], ROW], after="0"))
    assert [r.key for r in chunk.rows] == ["a", "k"] and chunk.done
    assert chunk.start.source == "src"


def test_records_hold_the_types_the_store_applies(tmp_path: Path, clock: FakeClock) -> None:
    s = Store(str(tmp_path / "s"), clock=clock)
    frame = _batch([1, "set", "k", TAG_BYTES, b"\x00", 5.0e9, HLC, "n", None],
                   [2, "incr", "n", TAG_INT, 9, None, HLC + 1, "n", 4])
    result = s.apply(decode_batch(frame).records)
    assert result.applied == 2
    assert s.get("k") == (TAG_BYTES, b"\x00", 5.0e9)
    assert s.get("n") == (TAG_INT, 9, None)
    assert decode_batch(frame).records[1] == Record(2, "incr", "n", TAG_INT, 9, None,
                                                    HLC + 1, "n", 4)
