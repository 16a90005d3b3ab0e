"""The hybrid logical clock of a database: one per SQLite file, shared by every process.

A version is ``milliseconds << 16 | counter``. The last one handed out is a word of the
small shared file ``hypercacheio.clock`` (mapped by every process); a write takes
max(wall clock, last + 1) while it holds SQLite's write lock (inside BEGIN IMMEDIATE, or
inside the one write statement through the SQL function ``hcio_hlc``) and stores it back,
so versions are unique and strictly increasing in commit order across every process and
thread, and never go back when the wall clock does.

Why a shared file and not a row of ``meta``: a ``meta`` row written by every write dirties
a second page per commit, one more WAL frame (+6 us on a ~15 us ``set``). The file keeps
the boot it was written in; after a reboot (or when it is new) the opening process seeds it
from the database (``seed_value``) under the write lock, so a clock lost with the page
cache never hands out a version at or below one already stored.

The same file holds the generation of the ``clustered`` flag of ``meta``: a write reads
the flag again only when another process changed it (``mark_clustered`` bumps it).
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from typing import Protocol

CLOCK_NAME = "hypercacheio.clock"
CLOCK_BYTES = 4096
MAGIC = 0x31_6B_63_6F_6C_63_63_68  # b"hcclock1" little-endian
_MAGIC, _LAST, _GENERATION, _BOOT = 0, 1, 2, 3  # word indexes; the boot id takes 3 and 4
_STAMPS = 5  # versions handed out to local writes (not observed ones): a wake-up signal

SQL_OBSERVE = "UPDATE meta SET value = ? WHERE name = 'hlc' AND value < ?"
SQL_SEED = ("SELECT max(COALESCE((SELECT value FROM meta WHERE name = 'hlc'), 0), "
            "COALESCE((SELECT max(hlc) FROM entries), 0), "
            "COALESCE((SELECT max(hlc) FROM oplog), 0))")
# The one-statement set: the row takes the next version itself, under the write lock, and
# is written only while the store is not clustered (a clustered write needs an oplog row
# in the same transaction: no row written says "take the transaction path").
SQL_PUT_STAMPED = (
    "INSERT OR REPLACE INTO entries(key, tag, value, expire_at, size, hlc, node) "
    "SELECT ?, ?, ?, ?, ?, hcio_hlc(?), ? "
    "WHERE NOT EXISTS (SELECT 1 FROM meta WHERE name = 'clustered' AND value)"
)
# The clustered one-statement set: the view's trigger (``schema.LOGGED_PUT``) writes the
# row and its oplog row, only while the store is clustered (no change made says "take the
# transaction path"). Like SQL_PUT_STAMPED, the statement takes SQLite's write lock before
# it evaluates anything (its program's Transaction opcode runs first), so ``hcio_hlc`` runs
# under the lock, once (the trigger reads NEW.hlc, computed before it fires), and the
# oplog's seq order is the versions' order (tests/test_oplog_fastpath.py).
SQL_PUT_LOGGED = ("INSERT INTO logged_put(key, tag, value, expire_at, size, hlc, node) "
                  "VALUES (?, ?, ?, ?, ?, hcio_hlc(?), ?)")


def wall_hlc(seconds: float) -> int:
    """The version a wall-clock time stands for (its milliseconds, counter 0)."""
    return int(seconds * 1000) << 16


def _boot_words() -> tuple[int, int]:
    """This boot's id as two words (Linux); zeros elsewhere (then seeded once, when new)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            raw = bytes.fromhex(fh.read().strip().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        raw = b"\0" * 16
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


class _ThreadNotes(Protocol):
    """What ``stamping`` notes the version in: a store's per-thread state."""

    _local: threading.local  # replaced at fork: read on each call, never kept


class DatabaseClock:
    """The shared clock file of one database (every method but ``open`` runs under the
    database's write lock, which serialises them across processes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(f"{path} is not a regular file")
            if info.st_size < CLOCK_BYTES:
                os.posix_fallocate(fd, 0, CLOCK_BYTES)  # blocks reserved: no SIGBUS later
            self._map = mmap.mmap(fd, CLOCK_BYTES, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.words = memoryview(self._map).cast("Q")
        self._boot = _boot_words()

    def needs_seed(self) -> bool:
        """True if the file is new, or was last written before this boot."""
        w = self.words
        return w[_MAGIC] != MAGIC or (w[_BOOT], w[_BOOT + 1]) != self._boot

    def seed(self, conn: sqlite3.Connection) -> None:
        """Start from the highest version the database holds (under the write lock)."""
        floor = int(conn.execute(SQL_SEED).fetchone()[0] or 0)
        w = self.words
        w[_LAST] = max(int(w[_LAST]) if w[_MAGIC] == MAGIC else 0, floor)
        w[_BOOT], w[_BOOT + 1] = self._boot
        w[_MAGIC] = MAGIC

    def next(self, now: float) -> int:
        """The next version at wall-clock time ``now``."""
        return self.next_from_wall(int(now * 1000) << 16)

    def next_from_wall(self, physical: int) -> int:
        """``next`` for a wall-clock version (``stamping`` is its SQL-function form)."""
        w = self.words
        last = w[_LAST]
        version = physical if physical > last else last + 1
        w[_LAST] = version
        w[_STAMPS] = (w[_STAMPS] + 1) & 0xFFFF_FFFF_FFFF_FFFF
        return version

    def stamping(self, owner: _ThreadNotes) -> Callable[[int], int]:
        """``next_from_wall`` as the SQL function ``hcio_hlc``: it also keeps the version as
        ``owner._local.version`` (the writing thread's last: ``Store.last_version``).

        One function rather than a wrapper around ``next_from_wall``: it runs inside the
        one-statement ``set``, the hottest write.
        """
        words = self.words

        def hcio_hlc(physical: int) -> int:
            last = words[_LAST]
            version = physical if physical > last else last + 1
            words[_LAST] = version
            words[_STAMPS] = (words[_STAMPS] + 1) & 0xFFFF_FFFF_FFFF_FFFF
            owner._local.version = version
            return version

        return hcio_hlc

    def observe(self, remote: int) -> None:
        """Move the clock to ``remote`` if it is ahead."""
        if remote > self.words[_LAST]:
            self.words[_LAST] = remote

    def last(self) -> int:
        """The last version handed out or observed."""
        return int(self.words[_LAST])

    def stamps(self) -> int:
        """How many versions were handed out (``next``, ``hcio_hlc``), modulo 2**64."""
        return int(self.words[_STAMPS])

    @property
    def generation(self) -> int:
        """Bumped whenever the ``clustered`` flag of the database changes."""
        return int(self.words[_GENERATION])

    def bump_generation(self) -> None:
        self.words[_GENERATION] = (self.words[_GENERATION] + 1) & 0xFFFF_FFFF_FFFF_FFFF
