"""One translation of storage failures into the project's errors (``hypercacheio.errors``).

Every ``sqlite3.Error`` and ``OSError`` that reaches a public method of ``Store`` passes
through ``storage_error``: the error says which file, what went wrong, and what to do.
SQLite's own result code decides (``sqlite_errorcode``, Python >= 3.11); on older Pythons
its message does, and for the generic I/O codes the state of the file system does.
"""

from __future__ import annotations

import errno
import os

from ..errors import (
    StorageCorruptError,
    StorageError,
    StorageFullError,
    StorageReadOnlyError,
)
from .fs import out_of_space, read_only_mount

# SQLite's primary result codes (the low byte of an extended code).
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY = 3, 5, 6, 8
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 10, 11, 13, 14, 26

FULL, READ_ONLY, CORRUPT, BUSY, OTHER = "full", "read-only", "corrupt", "busy", "other"

_BY_CODE = {
    SQLITE_FULL: FULL, SQLITE_READONLY: READ_ONLY, SQLITE_PERM: READ_ONLY,
    SQLITE_CORRUPT: CORRUPT, SQLITE_NOTADB: CORRUPT, SQLITE_BUSY: BUSY, SQLITE_LOCKED: BUSY,
}
# Python 3.10 has no result code on the exception: SQLite's messages for the same codes.
_BY_MESSAGE = (
    ("database or disk is full", FULL), ("readonly database", READ_ONLY),
    ("disk image is malformed", CORRUPT), ("file is not a database", CORRUPT),
    ("database is locked", BUSY), ("database table is locked", BUSY),
)
_BY_ERRNO = {errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EROFS: READ_ONLY,
             errno.EACCES: READ_ONLY, errno.EPERM: READ_ONLY}


def classify(exc: BaseException, path: str) -> str:
    """What a failure means: FULL, READ_ONLY, CORRUPT, BUSY or OTHER."""
    if isinstance(exc, OSError):
        return _BY_ERRNO.get(exc.errno or 0, OTHER)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        kind = _BY_CODE.get(code & 0xFF, OTHER)
    else:
        text = str(exc).lower()
        kind = next((k for m, k in _BY_MESSAGE if m in text), OTHER)
        if kind == OTHER and ("disk i/o error" in text or "unable to open" in text):
            code = SQLITE_IOERR
    if kind == OTHER and "could not decode to utf-8" in str(exc).lower():
        kind = CORRUPT  # a TEXT value whose bytes were damaged on disk
    if kind == OTHER and code is not None and code & 0xFF in (SQLITE_IOERR, SQLITE_CANTOPEN):
        directory = os.path.dirname(path)  # an I/O error says little: look at the disk
        if out_of_space(directory):
            kind = FULL
        elif read_only_mount(directory) or not os.access(directory, os.W_OK):
            kind = READ_ONLY
    return kind


def storage_error(exc: BaseException, path: str, doing: str,
                  busy_timeout: float) -> StorageError:
    """The project error for a failure of ``doing`` (e.g. "write") on the database ``path``."""
    if isinstance(exc, StorageError):
        return exc
    kind = classify(exc, path)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if kind == FULL:
        return StorageFullError(
            f"{path}: could not {doing}: the file system is full or over quota ({detail}); "
            "free space there (or lower max_bytes); reads go on, and writes work again as "
            "soon as space is freed")
    if kind == READ_ONLY:
        where = "is mounted read-only" if read_only_mount(os.path.dirname(path)) else \
            f"or its files are not writable by this user (uid {os.getuid()})"
        return StorageReadOnlyError(
            f"{path}: could not {doing}: the database cannot be written ({detail}): its "
            f"file system {where}; check the mount and the owner and permissions of the "
            "directory and of the -wal and -shm files")
    if kind == CORRUPT:
        return StorageCorruptError(
            f"{path}: could not {doing}: the file is damaged or is not a hypercacheio "
            f"database ({detail}); stop the processes using it and move it (with its -wal "
            "and -shm files) away: the cache starts again empty")
    if kind == BUSY:
        return StorageError(
            f"{path}: could not {doing} within busy_timeout={busy_timeout:g} s: another "
            f"connection held the database lock that long ({detail}); look for a stuck "
            "process or a long transaction, or raise busy_timeout")
    return StorageError(f"{path}: could not {doing} ({detail})")
