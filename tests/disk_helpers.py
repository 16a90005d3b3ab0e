"""A small real file system for full-disk tests: a tmpfs the test mounts (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TMPFS_SIZE = "4m"


def mounted_tmpfs(tmp_path: Path, size: str = TMPFS_SIZE) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` under ``tmp_path`` for the test (skip where it cannot)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system of ``path`` (a new file there) until ``leave`` bytes are free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 1):
            try:
                while True:
                    st = os.statvfs(path.parent)
                    free = st.f_bavail * st.f_frsize - leave
                    if free <= 0:
                        break
                    os.write(fd, b"\0" * min(free, chunk))
            except OSError:
                pass  # full to the last byte
    finally:
        os.close(fd)
    return path
