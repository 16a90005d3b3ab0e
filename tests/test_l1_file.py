"""The L1 token file on a full disk, truncated, replaced, or not a regular file: clear errors
or a repair, never SIGBUS (real processes, a real tmpfs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from disk_helpers import fill
from hypercacheio import Cache
from hypercacheio.errors import StorageError
from hypercacheio.l1 import TABLE_BYTES, TokenTable
from hypercacheio.store import TOKENS_NAME

pytestmark = pytest.mark.timeout(120)


def run_child(code: str, *args: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


CREATE_ON_FULL_DISK = """
    import sys
    from hypercacheio import Cache
    from hypercacheio.errors import StorageFullError
    try:
        c = Cache(sys.argv[1])
        c.clear()  # renews every slot: writes the whole token file
        for i in range(200):
            c.set(f"k{i}", "v" * 100)
    except StorageFullError as exc:
        print("StorageFullError:", exc)
        sys.exit(3)
    print("no error")
"""


@pytest.mark.parametrize("leave", [256 * 1024, 0], ids=["room-for-sqlite-only", "last-byte"])
def test_token_file_on_a_full_disk_is_storage_full_not_sigbus(small_tmpfs: Path,
                                                              leave: int) -> None:
    directory = small_tmpfs / "cache"
    with Cache(str(directory)) as c:  # the database exists; the token file will not
        c.set("before", 1)
    os.unlink(directory / TOKENS_NAME)
    fill(small_tmpfs / "filler", leave)
    done = run_child(CREATE_ON_FULL_DISK, str(directory))
    assert done.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert "StorageFullError" in done.stdout and "free space" in done.stdout
    os.unlink(small_tmpfs / "filler")  # and once space is freed, it works
    done = run_child(CREATE_ON_FULL_DISK, str(directory))
    assert done.returncode == 0 and "no error" in done.stdout, done.stderr
    assert os.path.getsize(directory / TOKENS_NAME) == TABLE_BYTES


def test_token_file_blocks_are_reserved(tmp_path: Path) -> None:
    path = tmp_path / TOKENS_NAME
    table = TokenTable(str(path))
    st = os.stat(path)
    assert st.st_size == TABLE_BYTES
    assert st.st_blocks * 512 >= TABLE_BYTES  # allocated, not a sparse hole
    table.close()


TRUNCATED_UNDER_ME = """
    import sys
    from hypercacheio import Cache
    c = Cache(sys.argv[1])
    c.set("k", "one")
    assert c.get("k") == "one" and c.get("k") == "one"  # an L1 entry now
    print("ready", flush=True)
    sys.stdin.readline()  # the parent truncates the token file meanwhile
    c.set("other", 2)  # the write path finds the file shrunk and repairs it
    print("get", c.get("k"), c.get("other"), flush=True)
    c.set("k", "two")
    print("get", c.get("k"), flush=True)
    print("repairs", c.store.tokens.repairs, flush=True)
"""


def test_truncated_token_file_is_repaired_not_sigbus(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRUNCATED_UNDER_ME),
                             str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.truncate(directory / TOKENS_NAME, 0)  # as `: > hypercacheio.l1` would
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert proc.returncode == 0, err
    assert out.split("\n")[:3] == ["get one 2", "get two", "repairs 1"]
    assert os.path.getsize(directory / TOKENS_NAME) == TABLE_BYTES
    assert "truncated by another process" in err  # the warning says what happened


def test_replaced_token_file_is_mapped_anew_and_stays_coherent(tmp_path: Path) -> None:
    directory = str(tmp_path / "cache")
    old = Cache(directory)
    old.set("k", "one")
    assert old.get("k") == "one"
    path = os.path.join(directory, TOKENS_NAME)
    with open(path + ".new", "wb") as fh:  # another file takes the name
        fh.write(b"\0" * TABLE_BYTES)
    os.replace(path + ".new", path)
    new = Cache(directory)  # maps the new file
    assert new.get("k") == "one" and new.get("k") == "one"  # L1 entry in the new process
    old.set("k", "two")  # publishes: must reach the file `new` maps
    assert new.get("k") == "two"
    assert old.store.tokens.repairs == 1
    old.close()
    new.close()


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo", "oversized"])
def test_token_path_that_is_not_our_file_is_refused(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    path = directory / TOKENS_NAME
    target = tmp_path / "elsewhere"
    if kind == "symlink":
        target.write_bytes(b"\0" * TABLE_BYTES)
        path.symlink_to(target)
        words = "symbolic link"
    elif kind == "directory":
        path.mkdir()
        words = "directory"
    elif kind == "fifo":
        os.mkfifo(path)
        words = "not a regular file"
    else:
        path.write_bytes(b"\0" * (TABLE_BYTES + 1))
        words = "not a hypercacheio token table"
    with pytest.raises(StorageError, match=words) as info:
        Cache(str(directory))
    assert str(path) in str(info.value)
    if kind == "symlink":
        assert target.read_bytes() == b"\0" * TABLE_BYTES  # untouched


def test_dropped_cache_releases_the_token_file_at_once(tmp_path: Path) -> None:
    import gc

    def token_fds() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").endswith(TOKENS_NAME)
            except OSError:
                pass
        return count

    before = token_fds()
    gc.disable()  # no cycle collection: only reference counting may free it
    try:
        c = Cache(str(tmp_path / "cache"))
        c.set("k", 1)
        assert c.get("k") == 1
        assert token_fds() > before  # ours, and the dup the mmap object keeps
        c.close()
        del c
        assert token_fds() == before
    finally:
        gc.enable()


TRUNCATED_ON_A_FULL_DISK = """
    import sys
    from hypercacheio import Cache
    from hypercacheio.errors import StorageFullError
    c = Cache(sys.argv[1])
    c.set("k", "one")
    assert c.get("k") == "one" and c.get("k") == "one"
    print("ready", flush=True)
    sys.stdin.readline()  # truncated, and the disk filled, meanwhile
    try:
        c.set("other", 2)
        print("set worked", flush=True)
    except StorageFullError as exc:
        print("full:", exc, flush=True)
    print("get", c.get("k"), flush=True)  # reads go on, from the store
    sys.stdin.readline()  # space freed meanwhile
    c.set("k", "two")
    print("get", c.get("k"), c.get("k"), flush=True)
"""


def test_truncated_token_file_on_a_full_disk_is_an_error_then_recovers(
        small_tmpfs: Path) -> None:
    directory = small_tmpfs / "cache"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRUNCATED_ON_A_FULL_DISK),
                             str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.truncate(directory / TOKENS_NAME, 0)
        fill(small_tmpfs / "filler")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        first = proc.stdout.readline()
        assert first.startswith("full:") and "free space" in first, first
        assert proc.stdout.readline().strip() == "get one"
        os.unlink(small_tmpfs / "filler")
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert proc.returncode == 0, err
    assert out.strip() == "get two two"
    assert os.path.getsize(directory / TOKENS_NAME) == TABLE_BYTES
