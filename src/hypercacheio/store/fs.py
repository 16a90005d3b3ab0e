"""File-system checks of the storage directory: it exists, is writable, and is local."""

from __future__ import annotations

import os

from ..errors import StorageError, StorageReadOnlyError

# File systems on which WAL's shared memory is unsafe (it needs one kernel).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "virtiofs",
    "fuse.sshfs", "sshfs", "fuse.s3fs", "fuse.gcsfuse", "glusterfs", "fuse.glusterfs",
    "ceph", "fuse.ceph", "lustre", "davfs", "fuse.davfs2", "vboxsf", "prl_fs", "vmhgfs",
    "fuse.vmhgfs-fuse", "fuse.rclone", "fuse.juicefs",
})


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the file system holding ``path`` (Linux), or None if unknown."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, right.split()[0]
    return best_type


def prepare_directory(directory: str, allow_network_fs: bool, mountinfo: str) -> None:
    """Create the storage directory if needed; refuse a file, an unwritable or a network one."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise StorageError(f"the storage path {directory} exists and is not a "
                               "directory; choose a directory path") from exc
        raise StorageError(
            f"cannot create the storage directory {directory}: {exc.strerror}; "
            "choose a writable directory (HYPERCACHEIO_SQLITE_PATH or directory=...)"
        ) from exc
    if not os.path.isdir(directory):
        raise StorageError(f"the storage path {directory} exists and is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        if read_only_mount(directory):
            raise StorageReadOnlyError(
                f"the storage directory {directory} is not writable: its file system is "
                "mounted read-only; remount it read-write or choose another directory")
        raise StorageReadOnlyError(
            f"the storage directory {directory} is not writable by this user "
            f"(uid {os.getuid()}); fix its permissions or choose another directory"
        )
    fstype = filesystem_type(directory, mountinfo)
    if fstype in NETWORK_FILESYSTEMS and not allow_network_fs:
        raise StorageError(
            f"the storage directory {directory} is on a {fstype} file system; "
            "SQLite WAL needs local storage (its shared memory works within one kernel "
            "only) and would corrupt data here; use a local disk or tmpfs directory"
        )


def file_size(path: str) -> int:
    """The size of a file, 0 if it is missing."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_only_mount(path: str) -> bool:
    """True if the file system holding ``path`` is mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def out_of_space(path: str) -> bool:
    """True if the file system holding ``path`` has no block (or no inode) left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)
