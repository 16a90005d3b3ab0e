"""The coherent in-process layer (L1) and the shared invalidation table it trusts.

The table is a small file of 64-bit slots beside the database, mapped into every process
of the host. After a write commits, the writer stores a fresh random token in the slot of
each key it changed (``crc32(key) % SLOTS``). An L1 entry remembers the slot and the token
it read *before* it read the database; a hit is valid only while the slot still holds
that token. "Commit, then token" on the writer and "token, then read" on the reader mean
a reader can never keep a value older than a write that committed before its read began.
Tokens are random, never counters, so a slot cannot return to an old value (no ABA).
Collisions only cost a refetch.
"""

from __future__ import annotations

import mmap
import os
import random
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from . import codec

SLOTS = 1 << 16
_SLOT_BYTES = 8

# Tokens come from a generator reseeded from the OS in every forked child, so that a
# parent and its children never draw the same sequence (that would allow ABA).
_rng = random.Random(os.urandom(16))


def _reseed() -> None:
    _rng.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)


def slot_of(key: str) -> int:
    """The slot of a stored key: stable across processes (unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) & (SLOTS - 1)


class TokenTable:
    """The shared slot file, mapped read-write into this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size < SLOTS * _SLOT_BYTES:
                os.ftruncate(fd, SLOTS * _SLOT_BYTES)
            self._mm = mmap.mmap(fd, SLOTS * _SLOT_BYTES, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # A memoryview of unsigned 64-bit ints: reading ``tokens[slot]`` costs ~40 ns.
        self.tokens = memoryview(self._mm).cast("Q")

    def publish(self, keys: Iterable[str]) -> list[int]:
        """Give each key's slot a fresh token; returns the slots (for ``publish_slots``)."""
        slots = [slot_of(key) for key in keys]
        self.publish_slots(slots)
        return slots

    def publish_slots(self, slots: list[int]) -> None:
        """Give each slot a fresh token."""
        tokens = self.tokens
        draw = _rng.getrandbits
        for slot in slots:
            tokens[slot] = draw(64)

    def publish_all(self) -> None:
        """Invalidate every slot (after ``clear`` or a bulk change)."""
        self._mm[:] = os.urandom(SLOTS * _SLOT_BYTES)

    def close(self) -> None:
        try:
            self.tokens.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass


# Values that callers cannot mutate; L1 keeps them as they are. Others are kept encoded
# and decoded on every hit, so that a caller mutating a returned object changes nothing.
_IMMUTABLE = frozenset({int, float, complex, str, bytes, bool, type(None)})


def is_immutable(value: Any) -> bool:
    kind = type(value)
    if kind in _IMMUTABLE:
        return True
    if kind is tuple or kind is frozenset:  # hashable members may still be mutable objects
        return all(is_immutable(v) for v in value)
    return False


ABSENT = object()  # an L1 entry recording that the key is absent from the store


class L1:
    """A bounded map key -> (value, slot, token, deadline, encoded).

    ``encoded`` is None when ``value`` is returned as is, else the (tag, payload) to decode.
    ``deadline`` is the earlier of the row's expiry and ``now + max_age`` (None: neither
    is set, and a hit needs no clock read). The optional age bound caps how long an entry
    is trusted at all; writers publish tokens both before and after their commit, so a
    writer killed between the two has still invalidated what other processes hold.
    """

    __slots__ = ("data", "max_items", "max_age", "tokens")

    def __init__(self, tokens: TokenTable, max_items: int, max_age: float | None) -> None:
        self.data: dict[str, tuple[Any, int, int, float | None, Any]] = {}
        self.max_items = max_items
        self.max_age = max_age
        self.tokens = tokens.tokens

    def put(self, key: str, slot: int, token: int, value: Any, tag: int, payload: Any,
            expire_at: float | None, now: float) -> None:
        data = self.data
        if len(data) >= self.max_items and key not in data:
            try:  # first in, first out: the oldest insertion goes
                del data[next(iter(data))]
            except (StopIteration, KeyError, RuntimeError):
                pass
        deadline = entry_deadline(expire_at, now, self.max_age)
        if value is ABSENT or is_immutable(value):
            data[key] = (value, slot, token, deadline, None)
        else:
            data[key] = (None, slot, token, deadline, (tag, payload))

    def discard(self, key: str) -> None:
        self.data.pop(key, None)

    def clear(self) -> None:
        self.data.clear()


def entry_deadline(expire_at: float | None, now: float, max_age: float | None) -> float | None:
    """Until when an L1 entry may be served: the row's expiry, capped by the age bound."""
    if max_age is None:
        return expire_at
    bound = now + max_age
    return bound if expire_at is None or expire_at > bound else expire_at


def decode_entry(encoded: tuple[int, Any]) -> Any:
    return codec.decode(encoded[0], encoded[1])


Clock = Callable[[], float]
