"""One error vocabulary for storage: a full disk, a read-only mount and a damaged file, on
real files (a small tmpfs mounted for the test)."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from disk_helpers import fill
from hypercacheio import Cache
from hypercacheio.codec import TAG_STR
from hypercacheio.errors import (
    StorageCorruptError,
    StorageError,
    StorageFullError,
    StorageReadOnlyError,
)
from hypercacheio.store import DB_NAME, Store

pytestmark = pytest.mark.timeout(120)


def _writes(c: Cache) -> dict[str, Callable[[], object]]:
    return {
        "set": lambda: c.set("k", os.urandom(30000)),
        "add": lambda: c.add("new", os.urandom(30000)),
        "incr": lambda: c.incr("n"),
        "delete": lambda: c.delete("k"),
        "clear": lambda: c.clear(),
        "touch": lambda: c.touch("k", 100),
        "set_many": lambda: c.set_many({f"m{i}": os.urandom(30000) for i in range(4)}),
        "lock": lambda: c.lock("l", ttl=10).acquire(blocking=False),
    }


def test_full_disk_every_write_fails_at_once_reads_go_on_and_it_recovers(
        small_tmpfs: Path) -> None:
    directory = small_tmpfs / "cache"
    c = Cache(str(directory), busy_timeout=30, l1_max_items=0)  # files exist before the fill
    for i in range(20):
        c.set(f"keep{i}", f"v{i}")
    c.set("k", "v")
    filler = fill(small_tmpfs / "filler")
    failed: list[str] = []
    for name, write in _writes(c).items():
        for _ in range(50):  # the first writes may still fit in pages SQLite holds free
            started = time.monotonic()
            try:
                write()
            except StorageFullError as exc:
                assert time.monotonic() - started < 5, f"{name} waited for the busy timeout"
                assert str(c.store.path) in str(exc) and "free space" in str(exc)
                failed.append(name)
                break
        else:
            pytest.fail(f"{name} never failed on a full file system")
    assert failed == list(_writes(c))
    assert c.get("keep3") == "v3"  # reads go on
    assert c.stats()["entries"] >= 20
    filler.unlink()
    for write in _writes(c).values():
        write()  # and every write works again
    c.set("after", 1)
    assert Cache(str(directory)).get("after") == 1


def test_read_only_mount_gives_read_only_errors(small_tmpfs: Path, tmp_path: Path) -> None:
    directory = small_tmpfs / "cache"
    c = Cache(str(directory), l1_max_items=0)
    c.set("k", "v")
    c.close()
    # A read-only view of the same directory (a busy tmpfs cannot be remounted read-only).
    view = tmp_path / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(directory), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        with pytest.raises(StorageReadOnlyError) as info:
            Cache(str(view))
        message = str(info.value)
        assert "read-only" in message and str(view) in message
        assert "corrupt" not in message and "damaged" not in message
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)


def test_sqlite_read_only_is_a_read_only_error(cache_dir: str) -> None:
    import sqlite3

    from hypercacheio.store import storage_error

    s = Store(cache_dir)
    s.set("k", TAG_STR, "v", None)
    ro = sqlite3.connect(f"file:{s.path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as raw:
            ro.execute("DELETE FROM entries")
    finally:
        ro.close()
    error = storage_error(raw.value, s.path, "write", 60.0)
    assert isinstance(error, StorageReadOnlyError)
    assert s.path in str(error) and "corrupt" not in str(error)


def test_damaged_page_reads_miss_and_log_once_writes_raise(
        cache_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    s = Store(cache_dir)
    s.set_many([(f"k{i:05d}", TAG_STR, "x" * 200, None) for i in range(3000)])
    s.checkpoint("TRUNCATE")
    s.close()
    path = os.path.join(cache_dir, DB_NAME)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # scribble over pages in the middle (not the header)
        for offset in range(size // 3, 2 * size // 3, 4096):
            fh.seek(offset + 100)
            fh.write(os.urandom(200))
    s = Store(cache_dir)
    caplog.set_level(logging.ERROR, logger="hypercacheio.store")
    results = [s.get(f"k{i:05d}") for i in range(3000)]  # never raises
    assert None in results  # the damaged pages read as misses
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and DB_NAME in errors[0].getMessage()
    with pytest.raises(StorageCorruptError, match="move it"):
        for i in range(3000):
            s.set(f"k{i:05d}", TAG_STR, "y", None)
            s.delete(f"k{i:05d}")


def test_busy_timeout_names_the_setting(cache_dir: str) -> None:
    import sqlite3

    s = Store(cache_dir, busy_timeout=0.05)
    holder = sqlite3.connect(s.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for write in (lambda: s.set("k", TAG_STR, "v", None), lambda: s.delete("k")):
            with pytest.raises(StorageError, match="busy_timeout=0.05 s") as info:
                write()
            assert type(info.value) is StorageError
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    s.set("k", TAG_STR, "v", None)
