"""Lock: a named lock held in the store, with an owner token and a fencing number."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import LockError, LockTimeout

if TYPE_CHECKING:
    from .store import Store

DEFAULT_BLOCKING_TIMEOUT = 10.0


class Lock:
    """A lock shared by every process (and, later, every node) using the same store.

    ``ttl`` bounds how long a crashed holder can keep it (None: until released).
    ``fence`` is the grant's fencing number; it grows with every grant of any lock, so
    a resource can refuse work stamped with an older number than it has seen.
    """

    def __init__(
        self,
        store: Store,
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
        self._store = store
        self.key = name
        self.name = display_name or name
        self.ttl = ttl
        self.owner = owner if owner is not None else uuid.uuid4().hex
        self.blocking_timeout = blocking_timeout
        self.fence: int | None = None
        self._monotonic = monotonic
        self._sleep = sleep

    def _expire_at(self) -> float | None:
        return None if self.ttl is None else self._store.clock() + self.ttl

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; with ``blocking``, wait up to ``timeout`` s (None: forever)."""
        deadline = None if timeout is None else self._monotonic() + timeout
        delay = 0.001
        while True:
            fence = self._store.lock_acquire(self.key, self.owner, self._expire_at())
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
        released = self._store.lock_release(self.key, self.owner)
        if released:
            self.fence = None
        return released

    def force_release(self) -> bool:
        """Release whoever holds it."""
        self.fence = None
        return self._store.lock_force_release(self.key)

    def extend(self, ttl: float | None = None) -> bool:
        """Give a held lock a new ttl from now; False if this owner no longer holds it."""
        if ttl is not None:
            if not ttl > 0:
                raise ValueError(f"lock ttl must be > 0 seconds or None, got {ttl}")
            self.ttl = ttl
        return self._store.lock_extend(self.key, self.owner, self._expire_at())

    def locked(self) -> bool:
        """True if anyone holds the lock now."""
        return self._store.lock_info(self.key) is not None

    def owned(self) -> bool:
        """True if this owner holds the lock now."""
        info = self._store.lock_info(self.key)
        return info is not None and info[0] == self.owner

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
        return f"<Lock {self.name!r} owner={self.owner} fence={self.fence}>"
