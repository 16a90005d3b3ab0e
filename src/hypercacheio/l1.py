"""The coherent in-process layer (L1) and the shared invalidation table it trusts.

The table is a small file of 64-bit slots beside the database, mapped into every process
of the host. After a write commits, the writer stores a fresh random token in the slot of
each key it changed (``crc32(key) % SLOTS``). An L1 entry remembers the slot and the token
it read *before* it read the database; a hit is valid only while the slot still holds
that token. "Commit, then token" on the writer and "token, then read" on the reader mean
a reader can never keep a value older than a write that committed before its read began.
Tokens are random, never counters, so a slot cannot return to an old value (no ABA).
Collisions only cost a refetch.

The file is mapped, so an access to a page the file no longer backs is a SIGBUS, which
kills the process. Hence: its blocks are reserved before it is mapped (a full disk is a
``StorageFullError`` at open, never a signal at the first token write); only a regular file
is accepted; and the write path checks the file (``fstat`` of the descriptor kept open)
before each publish, so that a file shrunk by another process is grown back (and every
slot renewed) before it is touched, and a replaced file is mapped anew. What cannot be
checked without slowing every hit is an L1 hit that follows an outside truncation before
any hypercacheio process has repaired the file (the node repairs it within a fraction of a
second); SQLite's own ``-shm`` file has the same exposure.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import mmap
import os
import random
import stat
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from .codec import TAG_INT, UndecodableValue, decode
from .errors import StorageError, StorageFullError, StorageReadOnlyError

log = logging.getLogger(__name__)

SLOTS = 1 << 16
_SLOT_BYTES = 8
TABLE_BYTES = SLOTS * _SLOT_BYTES
PATH_CHECK_INTERVAL = 1.0  # seconds between checks that the path still names our file
FILL_CHECK_EVERY = 64  # L1 fills between two checks of the file's size
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}

# Tokens come from a generator reseeded from the OS in every forked child, so that a
# parent and its children never draw the same sequence (that would allow ABA).
_rng = random.Random(os.urandom(16))


def _reseed() -> None:
    _rng.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)


def slot_of(key: str) -> int:
    """The slot of a stored key: stable across processes (unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) & (SLOTS - 1)


def _table_error(path: str, exc: OSError, doing: str) -> StorageError:
    """The project's error for an OSError on the token table, naming the path and the fix."""
    code = exc.errno
    if code in _FULL:
        return StorageFullError(
            f"the file system holding {path} is full ({doing}); free space there and retry")
    if code == errno.ELOOP:
        return StorageError(f"{path} is a symbolic link; hypercacheio refuses to map it "
                            "(remove it: it is recreated on the next open)")
    if code == errno.EISDIR:
        return StorageError(f"{path} is a directory; remove it (the token table is a file "
                            "that hypercacheio recreates)")
    if code in _READ_ONLY:
        return StorageReadOnlyError(
            f"cannot write {path} ({exc.strerror}); give this user (uid {os.getuid()}) write "
            "access to the storage directory and its files, or use another directory")
    return StorageError(f"cannot use the token table {path} ({doing}): {exc.strerror or exc}")


def _reserve(fd: int, path: str) -> None:
    """Give the file ``TABLE_BYTES`` of allocated blocks (never a sparse hole to fault on)."""
    size = os.fstat(fd).st_size
    if size > TABLE_BYTES:
        raise StorageError(f"{path} is {size} bytes, not a hypercacheio token table "
                           f"({TABLE_BYTES} bytes); remove it (it is recreated)")
    try:
        os.posix_fallocate(fd, 0, TABLE_BYTES)
        return
    except AttributeError:  # no posix_fallocate on this platform
        pass
    except OSError as exc:
        if exc.errno not in _NO_FALLOCATE:
            raise _table_error(path, exc, "reserving its blocks") from exc
    # Fallback: write zeros past the current end (only there: live tokens stay untouched).
    zeros = bytes(64 * 1024)
    try:
        while size < TABLE_BYTES:
            size += os.pwrite(fd, zeros[:TABLE_BYTES - size], size)
        os.fsync(fd)
    except OSError as exc:
        raise _table_error(path, exc, "writing its blocks") from exc


def _open_table(path: str) -> tuple[int, mmap.mmap, os.stat_result]:
    """Open (creating) the table file, refusing anything but a regular file; reserve, map."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise _table_error(path, exc, "opening it") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"{path} is not a regular file; remove it (the token table "
                               "is a file that hypercacheio recreates)")
        fcntl.flock(fd, fcntl.LOCK_EX)  # one process at a time grows a new file
        try:
            _reserve(fd, path)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            mm = mmap.mmap(fd, TABLE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise _table_error(path, exc, "mapping it") from exc
        return fd, mm, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


class TokenTable:
    """The shared slot file, mapped read-write into this process.

    ``tokens`` is a memoryview of unsigned 64-bit ints: reading ``tokens[slot]`` costs ~40 ns.
    While the file cannot be used (shrunk by another process and not growable, e.g. on a
    full disk), ``shared`` is False, ``tokens`` is private memory, the L1 maps attached to
    this table are emptied and stop filling, and every publish (every write) raises.
    """

    def __init__(self, path: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._users: weakref.WeakSet[L1] = weakref.WeakSet()
        self._fills = 0
        self.repairs = 0  # times the file was found shrunk or replaced and mapped again
        fd, mm, st = _open_table(path)
        self._attach(fd, mm, st)
        self._path_checked = monotonic()

    def _attach(self, fd: int, mm: mmap.mmap | None, st: os.stat_result | None) -> None:
        self._fd = fd
        # The descriptor stays open for the checks; a FileIO owns it, so that it is closed
        # when the table is dropped without close() (as the mmap unmaps itself).
        self._owner = io.FileIO(fd, "r+", closefd=True) if fd >= 0 else None
        self._mm = mm
        self._identity = (st.st_dev, st.st_ino) if st is not None else None
        self.shared = mm is not None
        if mm is not None:
            self.tokens = memoryview(mm).cast("Q")
        else:
            self.tokens = memoryview(bytearray(TABLE_BYTES)).cast("Q")
        for user in list(self._users):
            user.retarget(self)

    # ---- checks -----------------------------------------------------------------------

    def check(self, *, writing: bool = True) -> None:
        """Make sure the mapped file still backs the map before it is touched.

        One ``fstat`` of the kept descriptor (and, once a second, an ``lstat`` of the path):
        a shrunk file is grown back, a replaced one is mapped anew. When that fails, this
        process stops trusting the file (see the class); ``writing`` then raises the reason.
        """
        if self.shared:
            try:
                st = os.fstat(self._fd)
            except OSError:
                st = None
            if st is not None and st.st_size >= TABLE_BYTES and st.st_nlink > 0:
                now = self._monotonic()
                if now - self._path_checked < PATH_CHECK_INTERVAL:
                    return
                self._path_checked = now
                try:
                    here = os.lstat(self.path)
                except OSError:
                    here = None
                if here is not None and (here.st_dev, here.st_ino) == self._identity:
                    return
        self._repair(writing)

    def check_on_fill(self) -> None:
        """The check, every ``FILL_CHECK_EVERY`` L1 fills (the read path's periodic look)."""
        self._fills += 1
        if self._fills >= FILL_CHECK_EVERY:
            self._fills = 0
            self.check(writing=False)

    def _repair(self, writing: bool) -> None:
        with self._lock:
            try:
                self._repair_locked()
            except StorageError as exc:
                if self.shared:
                    log.error("the L1 token table cannot be used; this process serves "
                              "reads from the store only and refuses writes until it can: "
                              "%s", exc)
                    old = self._owner
                    self._attach(-1, None, None)
                    _close(old)
                if writing:
                    raise

    def _repair_locked(self) -> None:
        fd = self._fd
        if fd >= 0:
            st: os.stat_result | None
            here: os.stat_result | None
            try:
                st = os.fstat(fd)
                here = os.lstat(self.path)
            except OSError:
                st = here = None
            if st is not None and here is not None and st.st_nlink > 0 \
                    and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                if st.st_size >= TABLE_BYTES:
                    return  # another thread repaired it
                # Shrunk in place: grow it back under the file lock, before touching the map.
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    _reserve(fd, self.path)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                log.warning("the L1 token table %s had been truncated by another process; "
                            "restored it and invalidated every L1 entry", self.path)
                self.repairs += 1
                self._renew_all()
                for user in list(self._users):
                    user.clear()
                return
        # Replaced (or never usable): map whatever the path names now, if it is acceptable.
        new_fd, mm, st2 = _open_table(self.path)
        old = self._owner
        log.warning("the L1 token table %s was replaced or unusable; mapped the file now "
                    "at that path and invalidated every L1 entry", self.path)
        self.repairs += 1
        self._attach(new_fd, mm, st2)
        self._renew_all()
        _close(old)

    # ---- publishing -------------------------------------------------------------------

    def publish(self, keys: Iterable[str]) -> list[int]:
        """Give each key's slot a fresh token; returns the slots (for ``publish_slots``).

        This is the first publish of every write (before its COMMIT): it checks the file.
        """
        self.check()
        slots = [slot_of(key) for key in keys]
        self.publish_slots(slots)
        return slots

    def publish_slots(self, slots: list[int]) -> None:
        """Give each slot a fresh token (the second publish of a write, right after its first:
        no check of its own)."""
        tokens = self.tokens
        draw = _rng.getrandbits
        for slot in slots:
            tokens[slot] = draw(64)

    def publish_all(self) -> None:
        """Invalidate every slot (after ``clear`` or a bulk change)."""
        self.check()
        self._renew_all()

    def _renew_all(self) -> None:
        if self._mm is not None:
            self._mm[:] = os.urandom(TABLE_BYTES)

    def attach(self, user: L1) -> None:
        """Let ``user`` follow this table when it is mapped anew."""
        self._users.add(user)

    def close(self) -> None:
        try:
            self.tokens.release()
            if self._mm is not None:
                self._mm.close()
        except (BufferError, ValueError):
            pass
        _close(self._owner)
        self._owner = None
        self._fd = -1


def _close(owner: io.FileIO | None) -> None:
    if owner is not None:
        try:
            owner.close()
        except OSError:
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
MISS = object()  # what ``L1.get`` gives (through the default ``fill``) when L1 cannot answer


def _miss(key: str, default: Any) -> Any:
    return MISS


def encoded_size(key: str, tag: int, payload: Any) -> int:
    """The bytes an entry is counted for: its key and its encoded value."""
    if tag == TAG_INT or payload is None:
        return len(key) + 8
    if type(payload) is str and not payload.isascii():
        return len(key) + len(payload.encode("utf-8", "surrogatepass"))
    return len(key) + len(payload)


class L1:
    """A map key -> (value, slot, token, deadline, encoded, size), bounded in items and bytes.

    The one L1 lookup of the package: ``Cache.get`` *is* ``L1.get`` (see Cache), and the
    node's GET route calls it with the default ``fill``, which answers ``MISS``.

    ``encoded`` is None when ``value`` is returned as is, else the (tag, payload) to decode.
    ``deadline`` is the earlier of the row's expiry and ``now + max_age`` (None: neither
    is set, and a hit needs no clock read). The optional age bound caps how long an entry
    is trusted at all; writers publish tokens both before and after their commit, so a
    writer killed between the two has still invalidated what other processes hold.
    ``size`` is the entry's encoded size (``encoded_size``); ``bytes`` is their sum, kept
    at most ``max_bytes`` by dropping the oldest entries (first in, first out).
    """

    __slots__ = ("data", "max_items", "max_bytes", "max_age", "tokens", "clock", "fill",
                 "hits", "absent_hits", "bytes", "enabled", "table", "_lock", "__weakref__")

    def __init__(self, table: TokenTable, max_items: int, max_age: float | None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, clock: Callable[[], float] = time.time,
                 fill: Callable[[str, Any], Any] = _miss) -> None:
        self.data: dict[str, tuple[Any, int, int, float | None, Any, int]] = {}
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self.fill = fill  # called on a miss as fill(key, default); its answer is returned
        self.hits = 0  # answered from L1 (a value, or known absent)
        self.absent_hits = 0  # of which known absent
        self.bytes = 0
        self._lock = threading.Lock()  # writers of data and bytes (the hit path only reads)
        self.table = table
        self.tokens = table.tokens
        self.enabled = table.shared
        table.attach(self)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` from L1 if no process wrote it since, else ``fill(key, default)``.

        The hottest code of the package: one subscript, one unpack, the slot's token, the
        deadline, one counter. A known-absent key answers ``default``.
        """
        try:
            value, slot, token, deadline, encoded, _ = self.data[key]
        except (KeyError, TypeError):  # not in L1 (unhashable: the fill says why)
            return self.fill(key, default)
        if self.tokens[slot] == token and (deadline is None or deadline > self.clock()):
            self.hits += 1
            if encoded is None:
                if value is not ABSENT:
                    return value
                self.absent_hits += 1
                return default
            try:
                return decode(*encoded)
            except UndecodableValue:  # its class went away since: a miss
                self.hits -= 1
                self.discard(key)
        return self.fill(key, default)

    def token_of(self, key: str) -> tuple[int, int]:
        """The key's slot and its token now: read *before* the store is (see the module)."""
        slot = slot_of(key)
        return slot, self.tokens[slot]

    def put(self, key: str, slot: int, token: int, value: Any, tag: int, payload: Any,
            expire_at: float | None) -> None:
        """Remember a value read from the store (or ``ABSENT``) under the token read first."""
        size = encoded_size(key, tag, payload)
        if value is ABSENT or is_immutable(value):
            self._put(key, (value, slot, token, self._deadline(expire_at), None, size))
        else:
            self._put(key, (None, slot, token, self._deadline(expire_at), (tag, payload), size))

    def put_answer(self, key: str, slot: int, token: int, answer: Any, size: int,
                   expire_at: float | None) -> None:
        """Remember an answer that is kept as it is (the node's response body and headers)."""
        self._put(key, (answer, slot, token, self._deadline(expire_at), None, len(key) + size))

    def _deadline(self, expire_at: float | None) -> float | None:
        return entry_deadline(expire_at, self.clock(), self.max_age)

    def _put(self, key: str, entry: tuple[Any, int, int, float | None, Any, int]) -> None:
        size = entry[5]
        if not self.enabled or size > self.max_bytes or self.max_items <= 0:
            self.discard(key)
            return
        self.table.check_on_fill()
        with self._lock:
            data = self.data
            old = data.pop(key, None)
            if old is not None:
                self.bytes -= old[5]
            while data and (len(data) >= self.max_items or self.bytes + size > self.max_bytes):
                try:  # first in, first out: the oldest insertion goes
                    oldest = next(iter(data))
                    self.bytes -= data.pop(oldest)[5]
                except (StopIteration, KeyError, RuntimeError):
                    break
            data[key] = entry
            self.bytes += size

    def discard(self, key: str) -> None:
        with self._lock:
            old = self.data.pop(key, None)
            if old is not None:
                self.bytes -= old[5]

    def clear(self) -> None:
        with self._lock:
            self.data.clear()
            self.bytes = 0

    def retarget(self, table: TokenTable) -> None:
        """Follow ``table`` after it was mapped anew: every entry goes (its token is moot)."""
        self.tokens = table.tokens
        self.enabled = table.shared
        self.clear()


def entry_deadline(expire_at: float | None, now: float, max_age: float | None) -> float | None:
    """Until when an L1 entry may be served: the row's expiry, capped by the age bound."""
    if max_age is None:
        return expire_at
    bound = now + max_age
    return bound if expire_at is None or expire_at > bound else expire_at


Clock = Callable[[], float]
