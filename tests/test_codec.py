"""codec: tags, round trips, key validation."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from hypercacheio import InvalidKeyError, InvalidValueError
from hypercacheio.codec import (
    INT64_MAX,
    INT64_MIN,
    MAX_KEY_BYTES,
    TAG_BYTES,
    TAG_INT,
    TAG_PICKLE,
    TAG_STR,
    UndecodableValue,
    check_key,
    check_stored_key,
    decode,
    encode,
    payload_size,
)
from hypercacheio.replication.frames import decode_batch, encode_batch
from hypercacheio.replication.quorum import ADD_PREFIX
from hypercacheio.replication.records import SET, Record


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        (0, TAG_INT),
        (-5, TAG_INT),
        (INT64_MAX, TAG_INT),
        (INT64_MIN, TAG_INT),
        (INT64_MAX + 1, TAG_PICKLE),
        (INT64_MIN - 1, TAG_PICKLE),
        (True, TAG_PICKLE),  # bool is not stored as an int: incr must refuse it
        (b"", TAG_BYTES),
        (b"\x00\xff", TAG_BYTES),
        ("", TAG_STR),
        ("héllo €", TAG_STR),
        ("a\x00b", TAG_STR),
        ("\ud800", TAG_PICKLE),  # a lone surrogate cannot be SQLite TEXT
        (None, TAG_PICKLE),
        (1.5, TAG_PICKLE),
        ([1, "a"], TAG_PICKLE),
        ({"a": (1, 2)}, TAG_PICKLE),
        (bytearray(b"x"), TAG_PICKLE),
    ],
)
def test_encode_tag_and_round_trip(value: Any, tag: int) -> None:
    got_tag, payload = encode(value)
    assert got_tag == tag
    back = decode(got_tag, payload)
    assert back == value
    assert type(back) is type(value)


def test_decode_bytes_from_memoryview() -> None:
    assert decode(TAG_BYTES, memoryview(b"ab")) == b"ab"


@pytest.mark.parametrize("value", [lambda: 1, threading.Lock(), (x for x in ())])
def test_unpicklable_value(value: Any) -> None:
    with pytest.raises(InvalidValueError, match="does not pickle") as info:
        encode(value)
    assert isinstance(info.value, TypeError)


def test_undecodable_pickle() -> None:
    with pytest.raises(UndecodableValue):
        decode(TAG_PICKLE, b"\x80\x05garbage")
    with pytest.raises(UndecodableValue):  # a global that no longer exists
        decode(TAG_PICKLE, b"chypercacheio_nowhere\nNothing\n.")
    with pytest.raises(UndecodableValue):
        decode(TAG_PICKLE, pickle.dumps(1)[:-1])  # truncated


def test_payload_size() -> None:
    assert payload_size(7) == 8
    assert payload_size(b"abc") == 3
    assert payload_size("é") == 2


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "a" * MAX_KEY_BYTES,
        "é" * (MAX_KEY_BYTES // 2),  # 2-byte chars: exactly 1024 bytes
        "€" * (MAX_KEY_BYTES // 3),  # 3-byte chars: 1023 bytes
        "😀" * (MAX_KEY_BYTES // 4),  # 4-byte chars: exactly 1024 bytes
        "with space",
    ],
)
def test_valid_keys(key: str) -> None:
    assert check_key(key) is key


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (b"bytes", "got bytes"),
        (1, "got int"),
        (None, "got NoneType"),
        (("a",), "got tuple"),
        ("", "got str of 0 bytes"),
        ("a" * (MAX_KEY_BYTES + 1), "got str of 1025 bytes"),
        ("é" * (MAX_KEY_BYTES // 2) + "a", "got str of 1025 bytes"),
        ("a" * (MAX_KEY_BYTES - 1) + "é", "got str of 1025 bytes"),
        ("€" * (MAX_KEY_BYTES // 3 + 1), "got str of 1026 bytes"),
        ("😀" * (MAX_KEY_BYTES // 4 + 1), "got str of 1028 bytes"),
        ("\ud800", "lone surrogate"),
        ("ok\udfffok", "lone surrogate"),
        ("with space\x00and nul", "NUL character .* at index 10 of a str of 18"),
        ("\x00", "NUL character .* at index 0 "),
        ("é\x00" * 10, "NUL character .* at index 1 "),
        (ADD_PREFIX + "k", "NUL character"),  # the quorum's internal name for add's claim
        ("a" * (MAX_KEY_BYTES + 1) + "\x00", "got str of 1026 bytes"),  # the size first
    ],
)
def test_invalid_keys(key: Any, says: str) -> None:
    with pytest.raises(InvalidKeyError, match=says) as info:
        check_key(key)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("key", ["a\x00b", "\x00add:k", "é\x00"])
def test_a_key_with_nul_from_another_store_still_travels(key: str) -> None:
    """Replication frames check keys with ``check_stored_key``: a key stored before NUL
    was refused replicates; the other rules hold."""
    assert check_stored_key(key) is key
    for bad in ("", "a" * MAX_KEY_BYTES + "\x00", "\x00\ud800", b"a\x00"):
        with pytest.raises(InvalidKeyError):
            check_stored_key(bad)
    records = [Record(1, SET, key, TAG_STR, "v", None, 1 << 16, "node-a", origin_seq=1)]
    assert decode_batch(encode_batch("node-a", records)).records[0].key == key


def test_str_subclass_is_not_a_key() -> None:
    class Name(str):
        pass

    with pytest.raises(InvalidKeyError, match="got Name"):
        check_key(Name("a"))
