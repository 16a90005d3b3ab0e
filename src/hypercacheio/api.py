"""CacheLike: the one contract that ``Cache`` (local) and ``RemoteCache`` (a node) satisfy.

Code written against ``CacheLike`` runs unchanged on either. The defaults are the same on
both sides: ``ttl`` left out means the cache's ``default_ttl`` (``None``: never expires),
``ttl=None`` means forever, and a ttl <= 0 removes the key (``add`` then stores nothing).
``mypy`` checks that both classes keep to it (the ``TYPE_CHECKING`` block at the end).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .codec import MAX_KEY_BYTES
from .lock import DEFAULT_BLOCKING_TIMEOUT, Lock

T = TypeVar("T")
C = TypeVar("C", bound="CacheBase")

REMEMBER_LOCK_TTL = 60.0  # seconds a crashed ``remember`` computation can hold its key's lock


@runtime_checkable
class CacheLike(Protocol):
    """The cache API shared by ``Cache`` and ``RemoteCache`` (``ttl`` as described above)."""

    default_ttl: float | None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing or expired."""
        ...

    def has(self, key: str) -> bool:
        """True if ``key`` holds a live value (also ``key in cache``)."""
        ...

    def __contains__(self, key: str) -> bool: ...

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """A dict of the keys that hold live values (missing keys are left out)."""
        ...

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key``: None if it never expires, 0.0 if missing or expired."""
        ...

    def set(self, key: str, value: Any, ttl: Any = ...) -> bool:
        """Store ``value``; True."""
        ...

    def forever(self, key: str, value: Any) -> bool:
        """Store ``value`` with no expiry, whatever ``default_ttl`` says."""
        ...

    def add(self, key: str, value: Any, ttl: Any = ...) -> bool:
        """Store only if ``key`` is missing or expired (atomic); True if stored."""
        ...

    def set_many(self, mapping: Mapping[str, Any], ttl: Any = ...) -> list[str]:
        """Store every pair in one transaction; returns the keys that failed (none)."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it held a live value."""
        ...

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove keys in one transaction; returns how many held live values."""
        ...

    def pull(self, key: str, default: Any = None) -> Any:
        """Get and delete ``key`` atomically."""
        ...

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` atomically and return the new value; a missing key starts at 0."""
        ...

    def decr(self, key: str, delta: int = 1) -> int:
        """Subtract ``delta`` atomically and return the new value."""
        ...

    def touch(self, key: str, ttl: Any = ...) -> bool:
        """Give ``key`` a new ttl from now; False if it is missing."""
        ...

    def clear(self) -> object:
        """Remove every entry (locks stay)."""
        ...

    def remember(self, key: str, ttl: Any, fn: Callable[[], T]) -> T:
        """The value of ``key``, or ``fn()`` stored under it, computed once at a time."""
        ...

    def lock(self, name: str, ttl: float | timedelta | None = 10.0, owner: str | None = None,
             *, blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> Lock:
        """A lock named ``name`` held for at most ``ttl`` seconds (not yet acquired)."""
        ...

    def restore_lock(self, name: str, owner: str) -> Lock:
        """A handle on a lock that ``owner`` acquired elsewhere."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters of this object and figures of the store behind it."""
        ...

    def close(self) -> None:
        """Release connections; the object reconnects if used again."""
        ...


def remember_lock_name(key: str) -> str:
    """The lock that serializes ``remember(key, ...)`` computations (a digest for long keys)."""
    name = f"hypercacheio:remember:{key}"
    if len(name.encode("utf-8")) > MAX_KEY_BYTES:
        name = "hypercacheio:remember:#" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return name


def check_delta(delta: object) -> int:
    """``delta`` of incr/decr, refused unless it is a plain int (a bool is not a counter step)."""
    if type(delta) is not int:
        raise TypeError(f"delta must be an int, got {type(delta).__name__}")
    return delta


class CacheBase:
    """What ``Cache`` and ``RemoteCache`` share word for word: ``remember`` (over their own
    ``get``, ``set`` and ``lock``) and the context manager that calls their ``close``."""

    __slots__ = ()

    # Provided by the subclass (declared here for mypy only).
    if TYPE_CHECKING:
        def get(self, key: str, default: Any = None) -> Any: ...
        def set(self, key: str, value: Any, ttl: Any = ...) -> bool: ...
        def lock(self, name: str, ttl: float | timedelta | None = 10.0,
                 owner: str | None = None, *,
                 blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> Lock: ...
        def close(self) -> None: ...

    def remember(self, key: str, ttl: Any, fn: Callable[[], T]) -> T:
        """The value of ``key``, or ``fn()`` stored under it, computed once across processes
        (and, on a node, across its clients).

        Concurrent callers wait on a lock while one of them computes; if the lock cannot be
        had within the default lock wait, the caller computes on its own.
        """
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        lock = self.lock(remember_lock_name(key), ttl=REMEMBER_LOCK_TTL)
        got = lock.acquire(blocking=True, timeout=DEFAULT_BLOCKING_TIMEOUT)
        try:
            value = self.get(key, _MISSING)
            if value is _MISSING:
                value = fn()
                self.set(key, value, ttl)
            return value
        finally:
            if got:
                lock.release()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


_MISSING = object()  # remember's own "not there" (a stored None is a value)


if TYPE_CHECKING:  # mypy fails here if Cache or RemoteCache drifts from CacheLike
    from .cache import Cache
    from .node.client import RemoteCache

    def _satisfies(local: Cache, remote: RemoteCache) -> tuple[CacheLike, CacheLike]:
        return local, remote


__all__ = ["CacheBase", "CacheLike", "check_delta", "remember_lock_name"]
