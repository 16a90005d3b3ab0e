"""Value encoding: how a Python value becomes a (tag, payload) row and back.

``int`` (within int64) is stored as an SQLite INTEGER so that ``incr`` is one SQL
statement; ``bytes`` and ``str`` are stored raw; everything else is pickled. A node
never calls ``decode`` on a pickle: it moves (tag, payload) pairs as they are.
"""

from __future__ import annotations

import pickle
from typing import Any

from .errors import InvalidKeyError, InvalidValueError

TAG_TOMBSTONE = -1
TAG_INT = 0
TAG_BYTES = 1
TAG_STR = 2
TAG_PICKLE = 3
TAGS = {TAG_INT: "int", TAG_BYTES: "bytes", TAG_STR: "str", TAG_PICKLE: "pickle"}

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_KEY_BYTES = 1024

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

Payload = int | bytes | str


class UndecodableValue(Exception):
    """A stored pickle that no longer loads (class renamed, other version): a miss."""


def encode(value: Any) -> tuple[int, Payload]:
    """Encode a value; raises InvalidValueError for what does not pickle."""
    kind = type(value)
    if kind is int and INT64_MIN <= value <= INT64_MAX:
        return TAG_INT, value
    if kind is bytes:
        return TAG_BYTES, value
    if kind is str:
        if value.isascii():
            return TAG_STR, value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: SQLite TEXT cannot hold it, pickle does
            return TAG_PICKLE, pickle.dumps(value, PICKLE_PROTOCOL)
        return TAG_STR, value
    try:
        return TAG_PICKLE, pickle.dumps(value, PICKLE_PROTOCOL)
    except Exception as exc:  # pickle raises many kinds: TypeError, PicklingError, AttributeError
        raise InvalidValueError(
            f"value of type {kind.__name__} cannot be stored: it does not pickle ({exc})"
        ) from exc


def decode(tag: int, payload: Any) -> Any:
    """Decode a stored row; raises UndecodableValue when a pickle no longer loads."""
    if tag == TAG_PICKLE:
        try:
            return pickle.loads(payload)
        except Exception as exc:
            raise UndecodableValue(str(exc)) from exc
    if tag == TAG_BYTES:
        return bytes(payload)
    return payload


def decode_or(row: tuple[int, Any] | tuple[int, Any, Any] | None, default: Any) -> Any:
    """The value of a (tag, payload, ...) row, or ``default`` when there is no row or its
    pickle no longer loads."""
    if row is None:
        return default
    try:
        return decode(row[0], row[1])
    except UndecodableValue:
        return default


def payload_size(payload: Payload) -> int:
    if isinstance(payload, int):
        return 8
    if isinstance(payload, str):
        return len(payload.encode("utf-8", "surrogatepass"))
    return len(payload)


def check_key(key: Any) -> str:
    """Return the key if valid, else raise InvalidKeyError saying what is wrong. The rule
    for keys and lock names alike: a non-empty str of at most ``MAX_KEY_BYTES`` UTF-8
    bytes without NUL. NUL is kept out so that internal names (the cluster-wide add's
    lease ``"\\x00add:" + key``, ``replication.quorum.ADD_PREFIX``) can never be spelled
    by a caller; SQLite's text functions and many tools cut text at NUL anyway."""
    if type(key) is not str:
        raise InvalidKeyError(
            f"key must be a non-empty str of at most {MAX_KEY_BYTES} UTF-8 bytes, "
            f"got {type(key).__name__}"
        )
    n = len(key)
    if n == 0 or n > MAX_KEY_BYTES // 4 or not key.isascii():
        size = _utf8_len(key)
        if n == 0 or size > MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"key must be a non-empty str of at most {MAX_KEY_BYTES} UTF-8 bytes, "
                f"got str of {size} bytes"
            )
    if "\0" in key:
        raise InvalidKeyError(
            f"key must be a str without the NUL character (\\x00, reserved for internal "
            f"names), got one at index {key.index(chr(0))} of a str of {n} characters"
        )
    return key


def check_stored_key(key: Any) -> str:
    """``check_key`` for keys that come from another store (replication frames): NUL is
    let through, so that a key stored before NUL was refused still replicates; every
    other rule holds."""
    try:
        return check_key(key)
    except InvalidKeyError:
        if type(key) is not str or "\0" not in key:
            raise
        check_key(key.replace("\0", " "))  # same length in UTF-8: the other rules
        return key


def _utf8_len(key: str) -> int:
    try:
        return len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKeyError("key must be valid UTF-8 text (it holds a lone surrogate)") from None
