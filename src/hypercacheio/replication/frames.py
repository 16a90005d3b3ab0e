"""The wire form of replication: msgpack frames of oplog records and of snapshot chunks.

A frame is one msgpack map (the transport adds any length prefix)::

    {"v": 1, "kind": "batch", "source": node_id,
     "records": [[seq, op, key, tag, value, expire_at, hlc, node, delta,
                  origin_seq, base_hlc, base_node, total], ...]}
    {"v": 1, "kind": "snapshot",
     "start": [position, hlc, source, cleared_hlc, cleared_node, [[origin, seq], ...]],
     "after": key | None, "done": bool,
     "rows": [[key, tag, value, expire_at, hlc, node], ...],
     "counters": [[key, origin, base_hlc, base_node, total, origin_seq, expire_at], ...]}

A record of 9 fields (no origin sequence, no contribution), a start of 5 fields and a
chunk without ``counters`` are also read (what this format was before active-active).

Values travel as they are stored, with their codec tag: an int as an int, ``str`` as a
msgpack str, ``bytes`` and pickles as msgpack bin. Nothing here ever unpickles.

Decoding validates the whole frame before it returns anything (types, ops and the fields
each op carries, keys, sizes): a frame that fails raises ``MalformedFrame``, so nothing of a
malformed batch can be applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

import msgpack

from ..codec import (
    INT64_MAX,
    INT64_MIN,
    TAG_BYTES,
    TAG_INT,
    TAG_PICKLE,
    TAG_STR,
    TAG_TOMBSTONE,
    check_stored_key,
)
from ..errors import InvalidKeyError, MalformedFrame
from .records import (
    CLEAR,
    DELETE,
    INCR,
    OPS,
    SET,
    TOUCH,
    CounterRow,
    Record,
    SnapshotChunk,
    SnapshotRow,
    SnapshotStart,
)

FRAME_VERSION = 1
MAX_FRAME_BYTES = 64 << 20  # a frame larger than this is refused before it is unpacked
MAX_BATCH_RECORDS = 10_000
MAX_SNAPSHOT_ROWS = 10_000
MAX_NODE_ID = 128  # characters of a node id

_VALUE_TYPE: dict[int, type] = {TAG_INT: int, TAG_BYTES: bytes, TAG_STR: str, TAG_PICKLE: bytes}


class Batch(NamedTuple):
    """A decoded batch: the node id of the store whose oplog it was read from, its records."""

    source: str
    records: list[Record]


# ---- encoding ------------------------------------------------------------------------------

def encode_batch(source: str, records: Sequence[Record]) -> bytes:
    """One frame of oplog records read from the store whose node id is ``source``."""
    return msgpack.packb({
        "v": FRAME_VERSION, "kind": "batch", "source": source,
        "records": [list(record) for record in records],
    }, use_bin_type=True)


def encode_snapshot_chunk(chunk: SnapshotChunk) -> bytes:
    start = [*chunk.start[:5], [list(pair) for pair in chunk.start.vector]]
    return msgpack.packb({
        "v": FRAME_VERSION, "kind": "snapshot", "start": start,
        "after": chunk.after, "done": chunk.done, "rows": [list(row) for row in chunk.rows],
        "counters": [list(c) for c in chunk.counters],
    }, use_bin_type=True)


# ---- decoding ------------------------------------------------------------------------------

def _bad(what: str) -> NoReturn:
    raise MalformedFrame(f"malformed replication frame: {what}; nothing of it was applied")


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    _bad(f"msgpack extension type {code} is not allowed")


def _unpack(data: bytes, kind: str, max_bytes: int) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        _bad(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        _bad(f"{len(data)} bytes, over the limit of {max_bytes}")
    try:
        frame = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True,
                                ext_hook=_refuse_ext, timestamp=0, use_list=True)
    except MalformedFrame:
        raise
    except Exception as exc:  # msgpack raises ValueError, TypeError and its own kinds
        _bad(f"not msgpack ({type(exc).__name__}: {exc})")
    if type(frame) is not dict:
        _bad(f"expected a map, got {type(frame).__name__}")
    if frame.get("v") != FRAME_VERSION or type(frame.get("v")) is not int:
        _bad(f"unknown frame version {frame.get('v')!r} (this node speaks {FRAME_VERSION})")
    if frame.get("kind") != kind:
        _bad(f"expected a {kind!r} frame, got {frame.get('kind')!r}")
    return frame


def _int(value: Any, what: str, low: int = 0, high: int = INT64_MAX) -> int:
    if type(value) is not int or not low <= value <= high:
        _bad(f"{what} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def _node(value: Any, what: str, empty: bool = False) -> str:
    if type(value) is not str or len(value) > MAX_NODE_ID or (not value and not empty):
        _bad(f"{what} must be a {'' if empty else 'non-empty '}string of at most "
             f"{MAX_NODE_ID} characters, got {_show(value)}")
    return value


def _key(value: Any, what: str) -> str:
    """A key as stored: a key with NUL, written before NUL was refused, still travels."""
    try:
        return check_stored_key(value)
    except InvalidKeyError as exc:
        _bad(f"{what}: {exc}")


def _expiry(value: Any, what: str, required: bool = False) -> float | None:
    if value is None and not required:
        return None
    if type(value) is not float or not math.isfinite(value):
        _bad(f"{what} must be a finite float{'' if required else ' or nil'}, "
             f"got {_show(value)}")
    return value


def _payload(tag: Any, value: Any, what: str) -> None:
    kind = _VALUE_TYPE.get(tag) if type(tag) is int else None
    if kind is None:
        _bad(f"{what}: unknown value tag {_show(tag)}")
    if type(value) is not kind:
        _bad(f"{what}: a value of tag {tag} must be {kind.__name__}, got {_show(value)}")
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        _bad(f"{what}: integer value outside the 64-bit range")


def _none(value: Any, what: str) -> None:
    if value is not None:
        _bad(f"{what} must be nil, got {_show(value)}")


def _show(value: Any) -> str:
    """A value's type (and a short form of a scalar): never a payload's content."""
    if value is None or type(value) in (int, float, bool):
        return repr(value)
    return type(value).__name__


def _record(item: Any, index: int) -> Record:
    where = f"record {index}"
    if type(item) is not list or len(item) not in (9, 13):
        _bad(f"{where} must be an array of 9 or 13 fields")
    seq, op, key, tag, value, expire_at, hlc, node, delta = item[:9]
    origin_seq, base_hlc, base_node, total = item[9:] if len(item) == 13 else (0, None, None,
                                                                                None)
    _int(origin_seq, f"{where}: origin_seq")
    _int(seq, f"{where}: seq", 1)
    if type(op) is not str or op not in OPS:
        _bad(f"{where}: unknown op {op if type(op) is str else _show(op)!r}")
    where = f"record {index} ({op})"
    _int(hlc, f"{where}: hlc", 1)
    _node(node, f"{where}: node")
    if op == CLEAR:
        for field, name in ((key, "key"), (tag, "tag"), (value, "value"),
                            (expire_at, "expire_at"), (delta, "delta"), (base_hlc, "base_hlc"),
                            (base_node, "base_node"), (total, "total")):
            _none(field, f"{where}: {name}")
        return Record(seq, op, None, None, None, None, hlc, node, None, origin_seq)
    _key(key, f"{where}: key")
    _expiry(expire_at, f"{where}: expire_at")
    if op == SET:
        _payload(tag, value, where)
        _none(delta, f"{where}: delta")
    elif op == INCR:
        if tag != TAG_INT or type(tag) is not int:
            _bad(f"{where}: tag must be {TAG_INT} (int), got {_show(tag)}")
        _payload(tag, value, where)
        _int(delta, f"{where}: delta", INT64_MIN)
        if total is not None:  # an active-active contribution
            _int(base_hlc, f"{where}: base_hlc")
            _node(base_node, f"{where}: base_node", empty=True)
            _int(total, f"{where}: total", INT64_MIN)
            _int(origin_seq, f"{where}: origin_seq", 1)
        else:
            _none(base_hlc, f"{where}: base_hlc")
            _none(base_node, f"{where}: base_node")
        return Record(seq, op, key, tag, value, expire_at, hlc, node, delta, origin_seq,
                      base_hlc, base_node, total)
    else:  # DELETE, TOUCH
        assert op in (DELETE, TOUCH)
        for field, name in ((tag, "tag"), (value, "value"), (delta, "delta"),
                            (base_hlc, "base_hlc"), (base_node, "base_node"),
                            (total, "total")):
            _none(field, f"{where}: {name}")
    if op == SET:
        for field, name in ((base_hlc, "base_hlc"), (base_node, "base_node"),
                            (total, "total")):
            _none(field, f"{where}: {name}")
    return Record(seq, op, key, tag, value, expire_at, hlc, node, delta, origin_seq)


def decode_batch(data: bytes, *, max_records: int = MAX_BATCH_RECORDS,
                 max_bytes: int = MAX_FRAME_BYTES) -> Batch:
    """A batch frame, validated whole; ``MalformedFrame`` if anything in it is wrong."""
    frame = _unpack(data, "batch", max_bytes)
    if set(frame) != {"v", "kind", "source", "records"}:
        _bad(f"a batch has the fields v, kind, source, records; got {sorted(map(str, frame))}")
    source = _node(frame["source"], "source")
    items = frame["records"]
    if type(items) is not list:
        _bad(f"records must be an array, got {_show(items)}")
    if len(items) > max_records:
        _bad(f"{len(items)} records, over the limit of {max_records} per batch")
    return Batch(source, [_record(item, i) for i, item in enumerate(items)])


def _row(item: Any, index: int) -> SnapshotRow:
    where = f"snapshot row {index}"
    if type(item) is not list or len(item) != 6:
        _bad(f"{where} must be an array of 6 fields")
    key, tag, value, expire_at, hlc, node = item
    _key(key, f"{where}: key")
    if tag == TAG_TOMBSTONE and type(tag) is int:
        _none(value, f"{where} (tombstone): value")
        _expiry(expire_at, f"{where} (tombstone): expire_at", required=True)
    else:
        _payload(tag, value, where)
        _expiry(expire_at, f"{where}: expire_at")
    _int(hlc, f"{where}: hlc")  # 0: a counter on a base never written (store/counters.py)
    _node(node, f"{where}: node", empty=True)
    return SnapshotRow(key, tag, value, expire_at, hlc, node)


def _counter(item: Any, index: int) -> CounterRow:
    where = f"snapshot counter {index}"
    if type(item) is not list or len(item) != 7:
        _bad(f"{where} must be an array of 7 fields")
    key, origin, base_hlc, base_node, total, origin_seq, expire_at = item
    return CounterRow(_key(key, f"{where}: key"), _node(origin, f"{where}: origin"),
                      _int(base_hlc, f"{where}: base_hlc"),
                      _node(base_node, f"{where}: base_node", empty=True),
                      _int(total, f"{where}: total", INT64_MIN),
                      _int(origin_seq, f"{where}: origin_seq", 1),
                      _expiry(expire_at, f"{where}: expire_at"))


def _vector(value: Any) -> tuple[tuple[str, int], ...]:
    if type(value) is not list or len(value) > 100_000:
        _bad("start: the version vector must be an array of [origin, seq] pairs")
    pairs = []
    for pair in value:
        if type(pair) is not list or len(pair) != 2:
            _bad("start: the version vector must be an array of [origin, seq] pairs")
        pairs.append((_node(pair[0], "start: vector origin"), _int(pair[1], "start: vector seq")))
    return tuple(pairs)


def decode_snapshot_chunk(data: bytes, *, max_rows: int = MAX_SNAPSHOT_ROWS,
                          max_bytes: int = MAX_FRAME_BYTES) -> SnapshotChunk:
    """A snapshot frame, validated whole (rows in strictly increasing key order, after
    ``after``); ``MalformedFrame`` if anything in it is wrong."""
    frame = _unpack(data, "snapshot", max_bytes)
    fields = {"v", "kind", "start", "after", "done", "rows"}
    if set(frame) not in (fields, fields | {"counters"}):
        _bad("a snapshot chunk has the fields v, kind, start, after, done, rows, counters; "
             f"got {sorted(map(str, frame))}")
    start = frame["start"]
    if type(start) is not list or len(start) not in (5, 6):
        _bad("start must be an array of 5 or 6 fields")
    position, hlc, source, cleared_hlc, cleared_node = start[:5]
    begin = SnapshotStart(_int(position, "start: position"), _int(hlc, "start: hlc"),
                          _node(source, "start: source"),
                          _int(cleared_hlc, "start: cleared_hlc"),
                          _node(cleared_node, "start: cleared_node", empty=True),
                          _vector(start[5]) if len(start) == 6 else ())
    raw_counters = frame.get("counters", [])
    if type(raw_counters) is not list or len(raw_counters) > max_rows * 64:
        _bad("counters must be an array (of at most 64 per row allowed)")
    after = frame["after"]
    if after is not None:
        _key(after, "after")
    done = frame["done"]
    if type(done) is not bool:
        _bad(f"done must be a boolean, got {_show(done)}")
    items = frame["rows"]
    if type(items) is not list:
        _bad(f"rows must be an array, got {_show(items)}")
    if len(items) > max_rows:
        _bad(f"{len(items)} rows, over the limit of {max_rows} per chunk")
    if not items and not done:
        _bad("a chunk that is not the last one must hold rows")
    rows = [_row(item, i) for i, item in enumerate(items)]
    previous = after
    for i, row in enumerate(rows):
        if previous is not None and row.key <= previous:
            _bad(f"snapshot row {i}: keys must be in increasing order after {after!r}")
        previous = row.key
    found = tuple(_counter(item, i) for i, item in enumerate(raw_counters))
    return SnapshotChunk(begin, after, rows, done, found)


__all__ = [
    "FRAME_VERSION", "MAX_BATCH_RECORDS", "MAX_FRAME_BYTES", "MAX_NODE_ID",
    "MAX_SNAPSHOT_ROWS", "Batch", "decode_batch", "decode_snapshot_chunk", "encode_batch",
    "encode_snapshot_chunk",
]
