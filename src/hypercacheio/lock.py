"""Lock: a named lock held in the store, with an owner token and a fencing number."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from .errors import LockError, LockTimeout

if TYPE_CHECKING:
    from .store import Store

DEFAULT_BLOCKING_TIMEOUT = 10.0


class LockBackend(Protocol):
    """Where a lock lives: the local store, or a node reached over HTTP."""

    def try_lock(self, name: str, owner: str, ttl: float | None) -> int | None:
        """Grant the lock to ``owner`` if free, expired or already theirs: the fence, or None."""

    def unlock(self, name: str, owner: str) -> bool: ...

    def force_unlock(self, name: str) -> bool: ...

    def extend_lock(self, name: str, owner: str, ttl: float | None) -> bool: ...

    def lock_state(self, name: str, owner: str) -> tuple[bool, bool]:
        """(held by anyone, held by ``owner``) now."""


class StoreLocks:
    """The locks of a local Store: ttl in seconds becomes an absolute wall-clock expiry."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _expire_at(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.store.clock() + ttl

    def try_lock(self, name: str, owner: str, ttl: float | None) -> int | None:
        return self.store.lock_acquire(name, owner, self._expire_at(ttl))

    def unlock(self, name: str, owner: str) -> bool:
        return self.store.lock_release(name, owner)

    def force_unlock(self, name: str) -> bool:
        return self.store.lock_force_release(name)

    def extend_lock(self, name: str, owner: str, ttl: float | None) -> bool:
        return self.store.lock_extend(name, owner, self._expire_at(ttl))

    def lock_state(self, name: str, owner: str) -> tuple[bool, bool]:
        info = self.store.lock_info(name)
        return info is not None, info is not None and info[0] == owner


class Lock:
    """A lock shared by every process (and every client of a node) using the same store.

    ``ttl`` bounds how long a crashed holder can keep it (None: until released).
    ``fence`` is the grant's fencing number; it grows with every grant of any lock, so
    a resource can refuse work stamped with an older number than it has seen.
    """

    def __init__(
        self,
        backend: LockBackend,
        name: str,
        ttl: float | None,
        owner: str | None = None,
        *,
        blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        display_name: str | None = None,
    ) -> None:
        if ttl is not None and not ttl > 0:
            raise ValueError(f"lock ttl must be > 0 seconds or None, got {ttl}")
        self._backend = backend
        self.key = name
        self.name = display_name or name
        self.ttl = None if ttl is None else float(ttl)
        self.owner = owner if owner is not None else uuid.uuid4().hex
        self.blocking_timeout = blocking_timeout
        self.fence: int | None = None
        self._monotonic = monotonic
        self._sleep = sleep

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; with ``blocking``, wait up to ``timeout`` s (None: forever)."""
        deadline = None if timeout is None else self._monotonic() + timeout
        delay = 0.001
        while True:
            fence = self._backend.try_lock(self.key, self.owner, self.ttl)
            if fence is not None:
                self.fence = fence
                return True
            if not blocking:
                return False
            if deadline is not None:
                left = deadline - self._monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            self._sleep(delay)
            delay = min(delay * 2, 0.05)

    def get(self) -> bool:
        """The PHP package's ``get()``: try once, do not wait."""
        return self.acquire(blocking=False)

    def block(self, seconds: float) -> bool:
        """The PHP package's ``block($seconds)``: wait up to ``seconds``, else LockTimeout."""
        if not self.acquire(blocking=True, timeout=seconds):
            raise LockTimeout(f"lock {self.name!r} not acquired within {seconds} s")
        return True

    def release(self) -> bool:
        """Release if this owner holds it; False if it is not ours (any more)."""
        released = self._backend.unlock(self.key, self.owner)
        if released:
            self.fence = None
        return released

    def force_release(self) -> bool:
        """Release whoever holds it."""
        self.fence = None
        return self._backend.force_unlock(self.key)

    def extend(self, ttl: float | None = None) -> bool:
        """Give a held lock a new ttl from now; False if this owner no longer holds it."""
        if ttl is not None:
            if not ttl > 0:
                raise ValueError(f"lock ttl must be > 0 seconds or None, got {ttl}")
            self.ttl = float(ttl)
        return self._backend.extend_lock(self.key, self.owner, self.ttl)

    def locked(self) -> bool:
        """True if anyone holds the lock now."""
        return self._backend.lock_state(self.key, self.owner)[0]

    def owned(self) -> bool:
        """True if this owner holds the lock now."""
        return self._backend.lock_state(self.key, self.owner)[1]

    def __enter__(self) -> Lock:
        if not self.acquire(blocking=True, timeout=self.blocking_timeout):
            raise LockTimeout(
                f"lock {self.name!r} not acquired within {self.blocking_timeout} s")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.release() and exc_type is None:
            raise LockError(f"lock {self.name!r} expired or was taken before release "
                            f"(ttl {self.ttl} s); the protected work may have overlapped")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} owner={self.owner} fence={self.fence}>"
