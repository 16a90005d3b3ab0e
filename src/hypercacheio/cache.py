"""Cache: the public API, composed of the coherent L1 and the SQLite store."""

from __future__ import annotations

import logging
import pickle
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .api import CacheBase, check_delta
from .codec import TAG_INT, TAG_PICKLE, check_key, decode, decode_or, encode
from .config import Settings
from .l1 import ABSENT, L1
from .lock import DEFAULT_BLOCKING_TIMEOUT, Lock, LockBackend, StoreLocks
from .store import Store

if TYPE_CHECKING:
    from .node.client import RemoteCache

log = logging.getLogger(__name__)

MISSING: Any = object()  # "argument not given" / "no value"; None is a value
_NEVER = float("inf")
_GONE = object()  # a ttl <= 0: store nothing, remove the key


def _no_l1() -> None:
    return None


def ttl_seconds(ttl: Any) -> float:
    """A ttl that is neither left out nor None, as seconds (<= 0: remove the key)."""
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        try:
            seconds = float(ttl)
        except OverflowError:
            raise ValueError(f"ttl of {ttl} seconds is too large; use None for "
                             "never") from None
    else:
        raise TypeError(f"ttl must be seconds (int, float, timedelta) or None, "
                        f"got {type(ttl).__name__}")
    if seconds != seconds:  # NaN
        raise ValueError("ttl must be a number of seconds, got NaN")
    return seconds


class _StoreReader:
    """The L2 read path of one Cache: what L1 calls on a miss, and ``get`` without L1.

    It holds the store, the prefix, the L1 and the counters, never the Cache itself: the
    L1 holds it, and the Cache's ``get`` is the L1's bound method, so a reference back to
    the Cache would let ``Cache(d).get(k)`` run after its Cache is gone (with a weak
    reference) or keep a dropped Cache alive until a GC pass (with a strong one). The L1
    it fills is held weakly for the same reason (the L1 holds this reader).
    """

    __slots__ = ("store", "prefix", "l1", "hits", "misses")

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.l1: Callable[[], L1 | None] = _no_l1
        self.hits = 0  # found by the store path
        self.misses = 0  # missed by the store path

    def __call__(self, key: str, default: Any) -> Any:
        full = self.prefix + check_key(key)
        l1 = self.l1()
        if l1 is not None:
            slot, token = l1.token_of(full)  # the token before the row (see l1.py)
        row = self.store.get(full)
        if row is None:
            self.misses += 1
            if l1 is not None:
                l1.put(key, slot, token, ABSENT, TAG_INT, None, None)
            return default
        tag, payload, expire_at = row
        try:  # decode(), inlined for the commonest tag: this is the L2 read path
            value = pickle.loads(payload) if tag == TAG_PICKLE else decode(tag, payload)
        except Exception as exc:  # what decode() calls UndecodableValue
            log.warning("value of %r cannot be decoded (%s); treating it as a miss", key, exc)
            self.misses += 1
            return default
        self.hits += 1
        if l1 is not None:
            l1.put(key, slot, token, value, tag, payload, expire_at)
        return value


class Cache(CacheBase):
    """A cache shared by every process of the host through one SQLite file.

    ``get`` serves from the in-process L1 while no process has written the key since;
    otherwise it reads the store. Every write is one SQLite transaction.

    With ``role="secondary"`` (``HYPERCACHEIO_SERVER_ROLE``) reads stay local and writes and
    locks go to the primary's node at ``primary_url``; ``__init__`` then makes the object a
    ``hypercacheio.replication.forward.SecondaryCache`` (the choice is made once: the
    methods of a cache in the default role carry no role check).
    """

    _ha_node: RemoteCache | None = None  # active-active: the local node (add and locks)

    def __init__(
        self,
        directory: str | None = None,
        *,
        prefix: str | None = None,
        default_ttl: float | timedelta | None = MISSING,
        l1_max_items: int | None = None,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        **options: Any,
    ) -> None:
        given: dict[str, Any] = dict(options)
        if directory is not None:
            given["directory"] = directory
        if prefix is not None:
            given["prefix"] = prefix
        if default_ttl is not MISSING:
            given["default_ttl"] = default_ttl
        if l1_max_items is not None:
            given["l1_max_items"] = l1_max_items
        try:
            self.settings = settings.replace(**given) if settings else Settings(**given)
        except TypeError as exc:  # an unknown keyword
            raise TypeError(f"Cache(): {exc}") from None
        s = self.settings
        self.prefix = s.prefix
        self.default_ttl = s.default_ttl
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self.store = Store(
            s.directory, busy_timeout=s.busy_timeout, max_bytes=s.max_bytes,
            max_entries=s.max_entries, cull_frequency=s.cull_frequency,
            clustered=s.clustered, allow_network_fs=s.allow_network_fs, clock=clock,
        )
        self._locks: LockBackend = StoreLocks(self.store)  # a secondary's: the primary
        self._reader = reader = _StoreReader(self.store, self.prefix)
        self._l1 = L1(self.store.tokens, s.l1_max_items, s.l1_max_age,
                      max_bytes=s.l1_max_bytes, clock=clock,
                      fill=reader) if s.l1_max_items else None
        if self._l1 is not None:
            reader.l1 = weakref.ref(self._l1)
        if self._l1 is not None and type(self).get is Cache.get:
            # ``get`` is the L1's own lookup (it calls the store reader on a miss): an L1
            # hit then costs one Python call, not two. A subclass's ``get`` is kept.
            self.__dict__["get"] = self._l1.get
        if s.role == "secondary":
            from .replication.forward import become_secondary

            become_secondary(self)
        elif s.active_active:
            # Active-active: writes stay local (the node ships the oplog), but add and
            # locks are cluster-wide: decided by the local node with a majority.
            from .node.client import RemoteCache

            self._ha_node = RemoteCache(
                "http://localhost" if s.node_socket else f"http://{s.node_host}:{s.node_port}",
                s.api_token or None, s.timeout, unix_socket=s.node_socket, default_ttl=None)
            self._locks = self._ha_node

    @property
    def l1_hits(self) -> int:
        """Gets answered by L1 (a value, or a key known to be absent)."""
        return self._l1.hits if self._l1 is not None else 0

    @property
    def hits(self) -> int:
        """Gets that found a value (from L1 or the store)."""
        l1 = self._l1
        return self._reader.hits + (l1.hits - l1.absent_hits if l1 is not None else 0)

    @hits.setter
    def hits(self, value: int) -> None:
        l1 = self._l1
        self._reader.hits = value - (l1.hits - l1.absent_hits if l1 is not None else 0)

    @property
    def misses(self) -> int:
        """Gets that found nothing (from L1 or the store)."""
        return self._reader.misses + (self._l1.absent_hits if self._l1 is not None else 0)

    @misses.setter
    def misses(self, value: int) -> None:
        self._reader.misses = value - (self._l1.absent_hits if self._l1 is not None else 0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Cache:
        """A cache configured from ``HYPERCACHEIO_*`` variables (keywords override them)."""
        clock_args = {k: overrides.pop(k) for k in ("clock", "monotonic", "sleep")
                      if k in overrides}
        return cls(settings=Settings.from_env(environ, **overrides), **clock_args)

    # ---- helpers ---------------------------------------------------------------------

    def _key(self, key: Any) -> str:
        return self.prefix + check_key(key)

    def _seconds(self, ttl: Any) -> Any:
        """A ttl argument as seconds: None (never), > 0, or _GONE (ttl <= 0)."""
        if ttl is MISSING:
            ttl = self.default_ttl
        if ttl is None:
            return None
        seconds = ttl_seconds(ttl)
        return _GONE if seconds <= 0 else seconds

    def _expire_at(self, ttl: Any) -> Any:
        """Absolute expiry for a ttl: None (never), _GONE (ttl <= 0) or a wall-clock time."""
        seconds = self._seconds(ttl)
        if seconds is None or seconds is _GONE:
            return seconds
        return self._clock() + seconds

    def _forget_l1(self, key: str) -> None:
        if self._l1 is not None:
            self._l1.discard(key)

    # ---- reads -----------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing or expired.

        With L1 on, ``__init__`` replaces this method on the instance by ``L1.get`` (the one
        L1 lookup, shared with the node), which falls back to the store reader.
        """
        if self._l1 is not None:
            return self._l1.get(key, default)
        return self._reader(key, default)

    def has(self, key: str) -> bool:
        """True if ``key`` holds a live value."""
        return self.get(key, MISSING) is not MISSING

    __contains__ = has

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """A dict of the keys that hold live values (missing keys are left out)."""
        keys = list(keys)
        for key in keys:
            check_key(key)
        found: dict[str, Any] = {}
        get = self.get  # per-key gets keep L1 filling and token order simple
        for key in keys:
            value = get(key, MISSING)
            if value is not MISSING:
                found[key] = value
        return found

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key``: None if it never expires, 0.0 if missing or expired."""
        row = self.store.get(self._key(key))
        if row is None:
            return 0.0
        if row[2] is None:
            return None
        return max(0.0, row[2] - self._clock())

    # ---- writes ----------------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: Any = MISSING) -> bool:
        """Store ``value``; ``ttl`` seconds (None: forever; <= 0: remove the key)."""
        full = self._key(key)
        expire_at = self._expire_at(ttl)
        tag, payload = encode(value)
        if expire_at is _GONE:
            self.store.delete(full)
        else:
            self.store.set(full, tag, payload, expire_at)
        self._forget_l1(key)
        return True

    def forever(self, key: str, value: Any) -> bool:
        """Store ``value`` with no expiry, whatever ``default_ttl`` says."""
        return self.set(key, value, ttl=None)

    def add(self, key: str, value: Any, ttl: Any = MISSING) -> bool:
        """Store only if ``key`` is missing or expired (atomic across processes)."""
        full = self._key(key)
        expire_at = self._expire_at(ttl)
        tag, payload = encode(value)
        if expire_at is _GONE:
            return False
        if self._ha_node is not None and not self.settings.ha_local_add:
            ttl_left = None if expire_at is None else max(0.001, expire_at - self._clock())
            added = self._ha_node.add(full, value, ttl_left)
            if added:
                self._forget_l1(key)
            return added
        added = self.store.add(full, tag, payload, expire_at)
        if added:
            self._forget_l1(key)
        return added

    def set_many(self, mapping: Mapping[str, Any], ttl: Any = MISSING) -> list[str]:
        """Store every pair in one transaction; returns the keys that failed (none)."""
        expire_at = self._expire_at(ttl)
        rows = [(self._key(k), *encode(v)) for k, v in mapping.items()]
        if expire_at is _GONE:
            self.store.delete_many([r[0] for r in rows])
        else:
            self.store.set_many((full, tag, payload, expire_at) for full, tag, payload in rows)
        for key in mapping:
            self._forget_l1(key)
        return []

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it held a live value."""
        full = self._key(key)
        deleted = self.store.delete(full)
        self._forget_l1(key)
        return deleted

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove keys in one transaction; returns how many held live values."""
        keys = list(keys)
        fulls = [self._key(k) for k in keys]
        count = self.store.delete_many(fulls)
        for key in keys:
            self._forget_l1(key)
        return count

    def pull(self, key: str, default: Any = None) -> Any:
        """Get and delete ``key`` in one transaction."""
        full = self._key(key)
        row = self.store.pull(full)
        self._forget_l1(key)
        return decode_or(row, default)

    def incr(self, key: str, delta: int = 1, *, create: bool = True) -> int:
        """Add ``delta`` atomically and return the new value; a missing key starts at 0.

        With ``create=False`` a missing key raises KeyError and nothing is stored
        (Django's contract for ``incr``).
        """
        check_delta(delta)
        full = self._key(key)
        expire = self._expire_at(MISSING)
        try:
            value = self.store.incr(full, delta, None if expire is _GONE else expire,
                                    create=create)
        except TypeError:
            # An int beyond 64 bits is stored pickled; say what is really wrong with it.
            current = decode_or(self.store.get(full), None)
            if type(current) is int:
                raise OverflowError(f"cannot increment {key!r}: its value {current} is "
                                    "outside the 64-bit range") from None
            raise
        self._forget_l1(key)
        return value

    def decr(self, key: str, delta: int = 1, *, create: bool = True) -> int:
        """Subtract ``delta`` atomically and return the new value."""
        return self.incr(key, -check_delta(delta), create=create)

    def touch(self, key: str, ttl: Any = MISSING) -> bool:
        """Give ``key`` a new ttl from now; False if it is missing. ttl <= 0 removes it."""
        full = self._key(key)
        expire_at = self._expire_at(ttl)
        if expire_at is _GONE:
            touched = self.store.delete(full)
        else:
            touched = self.store.touch(full, expire_at)
        self._forget_l1(key)
        return touched

    def clear(self) -> None:
        """Remove every entry of the store (all prefixes; locks stay)."""
        self.store.clear()
        if self._l1 is not None:
            self._l1.clear()

    # ---- locks -----------------------------------------------------------------------

    def lock(self, name: str, ttl: float | timedelta | None = 10.0, owner: str | None = None,
             *, blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> Lock:
        """A lock named ``name`` held for at most ``ttl`` seconds (not yet acquired)."""
        full = self._key(name)
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
        if seconds is not None and (isinstance(seconds, bool)
                                    or not isinstance(seconds, (int, float))):
            raise TypeError(f"lock ttl must be seconds or None, got {type(ttl).__name__}")
        if owner is not None and not isinstance(owner, str):
            raise TypeError(f"lock owner must be a str, got {type(owner).__name__}")
        return Lock(self._locks, full, None if seconds is None else float(seconds), owner,
                    blocking_timeout=blocking_timeout, monotonic=self._monotonic,
                    sleep=self._sleep, display_name=name)

    def restore_lock(self, name: str, owner: str) -> Lock:
        """A handle on a lock that ``owner`` acquired elsewhere (another process or request)."""
        lock = self.lock(name, ttl=None, owner=owner)
        if self._ha_node is not None:  # active-active: the lease a majority holds
            held = self._ha_node.restore_lock(self._key(name), owner)
            lock.fence, lock.ttl = held.fence, held.ttl
            return lock
        info = self.store.lock_info(self._key(name))
        if info is not None and info[0] == owner:
            lock.fence = info[2]
            if info[1] is not None:
                lock.ttl = max(0.001, info[1] - self._clock())
        return lock

    # ---- maintenance -----------------------------------------------------------------

    def purge_expired(self) -> int:
        """Remove every expired entry and lock now; returns how many entries went."""
        return self.store.purge_expired()

    def stats(self) -> dict[str, Any]:
        """Counters of this Cache object and figures of the store it shares."""
        out = {
            "hits": self.hits,
            "misses": self.misses,
            "l1_hits": self.l1_hits,
            "l1_items": len(self._l1.data) if self._l1 is not None else 0,
            "l1_bytes": self._l1.bytes if self._l1 is not None else 0,
        }
        out.update(self.store.stats())
        return out

    def close(self) -> None:
        """Close this thread's database connection; the cache reopens it if used again."""
        self.store.close()

    def __repr__(self) -> str:
        return f"<Cache {self.store.directory!r} prefix={self.prefix!r}>"


__all__ = ["Cache", "MISSING"]
