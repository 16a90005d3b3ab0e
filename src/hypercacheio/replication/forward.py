"""Writes on a secondary host: sent to the primary, then applied here with its version.

A ``Cache`` whose role is ``secondary`` (``Cache(role="secondary", primary_url=...)``, or
``HYPERCACHEIO_SERVER_ROLE=secondary`` through ``Cache.from_env`` and the Django and Flask
backends) becomes a ``SecondaryCache`` in ``__init__``: reads stay local (L1 and this
host's store, which the primary's node keeps up to date by pushing its oplog), and every
write goes to the primary's node with ``PrimaryClient`` (``node/primary_client.py``, a
``RemoteCache`` whose writes answer their version):

- the answer is the primary's: ``add``'s winner, ``incr``'s value, ``delete``'s count;
- the primary's node answers each write with the version it took (``X-Hypercacheio-Version``
  and ``X-Hypercacheio-Origin``, ``node/protocol.py``) and the expiry it stored; the same
  write is applied here with ``Store.apply`` at that version, so that this host reads its
  own write at once (every process of the host: the apply moves the L1 tokens), and the
  push of the same record later is skipped as not newer;
- a touch comes back as the whole touched row (a touch alone could land here on an older
  copy of the value, which the push of the newer value would then no longer replace);
- locks are taken on the primary (its client is the lock backend): one authority, so
  fencing numbers grow across the cluster;
- the primary unreachable: ``NodeUnavailable`` within ``HYPERCACHEIO_TIMEOUT`` and nothing
  written here (never a local write behind the primary's back). A write that reached the
  primary but whose answer was lost arrives here with the push.

A write that changed nothing on the primary (``add`` of a live key, ``delete`` of a key the
primary no longer holds) takes no version and applies nothing here: this host's copy
follows with the push. ``set_many`` and ``delete_many`` of more than ``BATCH_MAX_KEYS`` keys
go as several requests (a transaction each on the primary).

The HTTP client is imported only when a secondary cache is made:
``import hypercacheio`` does not load it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..api import check_delta
from ..cache import _GONE, MISSING, Cache
from ..codec import TAG_INT, decode_or, encode
from .records import CLEAR, DELETE, INCR, SET, Record

if TYPE_CHECKING:
    from ..lock import Lock
    from ..node.primary_client import PrimaryClient, Written

log = logging.getLogger("hypercacheio.replication.forward")

BATCH_MAX_KEYS = 1000  # as node/protocol.py (not imported: it would load the node package)

_classes: dict[type[Cache], type[SecondaryCache]] = {}
_warned: list[bool] = []  # the missing-version warning is logged once per process


def secondary_class(cls: type[Cache]) -> type[SecondaryCache]:
    """The secondary form of a Cache class: ``SecondaryCache``, or for a subclass of Cache
    a class that keeps the subclass's methods in front (their ``super()`` calls forward)."""
    if issubclass(cls, SecondaryCache):
        return cls
    if cls is Cache:
        return SecondaryCache
    made = _classes.get(cls)
    if made is None:
        made = _classes[cls] = type(f"Secondary{cls.__name__}", (cls, SecondaryCache),
                                    {"__module__": cls.__module__})
    return made


def become_secondary(cache: Cache) -> None:
    """Make ``cache`` (its settings' role is secondary) send its writes to the primary."""
    from ..node.primary_client import PrimaryClient

    s = cache.settings
    primary = PrimaryClient(s.primary_url, s.api_token or None, s.timeout, default_ttl=None)
    cache.__class__ = secondary_class(type(cache))
    cache._primary = primary  # type: ignore[attr-defined]
    cache._locks = primary  # every lock on the primary: its fences are the cluster's


class SecondaryCache(Cache):
    """A ``Cache`` on a secondary host: local reads, writes and locks on the primary (see
    the module's notes). Made by ``Cache.__init__``, not directly."""

    _primary: PrimaryClient

    # ---- helpers ---------------------------------------------------------------------

    def _apply(self, records: list[Record], keys: Iterable[str] = (), *,
               changed: bool = False) -> None:
        """The primary's write, here at its version (nothing when it took none; with
        ``changed``, the write surely changed something there, so a missing version means a
        primary that does not send it)."""
        versioned = [r for r in records if r.hlc]
        if versioned:
            self.store.apply(versioned)
        elif changed and records and not _warned:
            _warned.append(True)
            log.warning("the primary at %s answered a write without its version (a node "
                        "older than this library?): this host reads its own writes only "
                        "once the primary pushes them", self._primary.url)
        for key in keys:
            self._forget_l1(key)

    @staticmethod
    def _set_record(full: str, tag: int, payload: Any, written: Written,
                    op: str = SET, delta: int | None = None) -> Record:
        return Record(0, op, full, tag, payload, written.expire_at, written.version,
                      written.origin, delta)

    @staticmethod
    def _delete_record(full: str, written: Written) -> Record:
        # The tombstone's end: this host's own window (tombstones are not compared).
        return Record(0, DELETE, full, None, None, None, written.version, written.origin)

    # ---- writes ----------------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: Any = MISSING) -> bool:
        full = self._key(key)
        seconds = self._seconds(ttl)
        tag, payload = encode(value)
        if seconds is _GONE:
            written = self._primary.delete_written(full)[1]
            self._apply([self._delete_record(full, written)], (key,))
        else:
            written = self._primary.set_written(full, tag, payload, seconds)
            self._apply([self._set_record(full, tag, payload, written)], (key,), changed=True)
        return True

    def add(self, key: str, value: Any, ttl: Any = MISSING) -> bool:
        full = self._key(key)
        seconds = self._seconds(ttl)
        tag, payload = encode(value)
        if seconds is _GONE:
            return False
        added, written = self._primary.add_written(full, tag, payload, seconds)
        if added:
            self._apply([self._set_record(full, tag, payload, written)], (key,), changed=True)
        return added

    def set_many(self, mapping: Mapping[str, Any], ttl: Any = MISSING) -> list[str]:
        seconds = self._seconds(ttl)
        rows = {self._key(k): encode(v) for k, v in mapping.items()}  # the last of a key
        fulls = list(rows)
        for start in range(0, len(fulls), BATCH_MAX_KEYS):
            chunk = fulls[start:start + BATCH_MAX_KEYS]
            if seconds is _GONE:
                written = self._primary.delete_many_written(chunk)[1]
                self._apply([self._delete_record(full, written) for full in chunk])
            else:
                written = self._primary.set_many_written(
                    [(full, *rows[full]) for full in chunk], seconds)
                self._apply([self._set_record(full, *rows[full], written) for full in chunk],
                            changed=True)
        for key in mapping:
            self._forget_l1(key)
        return []

    def delete(self, key: str) -> bool:
        full = self._key(key)
        deleted, written = self._primary.delete_written(full)
        self._apply([self._delete_record(full, written)], (key,))
        return deleted

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        fulls = [self._key(k) for k in keys]
        count = 0
        for start in range(0, len(fulls), BATCH_MAX_KEYS):
            chunk = fulls[start:start + BATCH_MAX_KEYS]
            deleted, written = self._primary.delete_many_written(chunk)
            count += deleted
            self._apply([self._delete_record(full, written) for full in chunk])
        for key in keys:
            self._forget_l1(key)
        return count

    def pull(self, key: str, default: Any = None) -> Any:
        full = self._key(key)
        row, written = self._primary.pull_written(full)
        self._apply([self._delete_record(full, written)], (key,))
        return decode_or(row, default)

    def incr(self, key: str, delta: int = 1, *, create: bool = True) -> int:
        check_delta(delta)
        full = self._key(key)
        seconds = self._seconds(MISSING)
        value, written = self._primary.incr_written(
            full, delta, None if seconds is _GONE else seconds, create)
        self._apply([self._set_record(full, TAG_INT, value, written, INCR, delta)], (key,),
                    changed=True)
        return value

    def touch(self, key: str, ttl: Any = MISSING) -> bool:
        full = self._key(key)
        seconds = self._seconds(ttl)
        if seconds is _GONE:
            deleted, written = self._primary.delete_written(full)
            self._apply([self._delete_record(full, written)], (key,))
            return deleted
        row, written = self._primary.touch_written(full, seconds)
        if row is not None:  # the touched row, whole (see the module's notes)
            self._apply([self._set_record(full, row[0], row[1], written)], (key,),
                        changed=True)
        return row is not None

    def clear(self) -> None:
        written = self._primary.clear_written()[1]
        self._apply([Record(0, CLEAR, None, None, None, None, written.version,
                            written.origin)])
        if self._l1 is not None:
            self._l1.clear()

    # ---- locks -----------------------------------------------------------------------

    def restore_lock(self, name: str, owner: str) -> Lock:
        """A handle on a lock that ``owner`` acquired elsewhere (held on the primary)."""
        held = self._primary.restore_lock(self._key(name), owner)
        lock = self.lock(name, ttl=None, owner=owner)
        lock.fence, lock.ttl = held.fence, held.ttl
        return lock

    # ---- the primary -----------------------------------------------------------------

    def close(self) -> None:
        """Close this thread's database connection and the connections to the primary."""
        super().close()
        self._primary.close()

    def __repr__(self) -> str:
        return (f"<SecondaryCache {self.store.directory!r} prefix={self.prefix!r} "
                f"primary={self._primary.url!r}>")


__all__ = ["BATCH_MAX_KEYS", "SecondaryCache", "become_secondary", "secondary_class"]
