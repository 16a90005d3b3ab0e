"""The exceptions of hypercacheio: one root, each subclass also a fitting builtin."""

from __future__ import annotations


class HypercacheioError(Exception):
    """Root of every error raised by hypercacheio."""


class InvalidKeyError(HypercacheioError, ValueError):
    """A key or lock name is not a non-empty ``str`` of at most 1,024 UTF-8 bytes without
    NUL."""


class InvalidValueError(HypercacheioError, TypeError):
    """A value cannot be encoded (it does not pickle)."""


class ConfigError(HypercacheioError, ValueError):
    """A setting (keyword argument or ``HYPERCACHEIO_*`` variable) is invalid."""


class StorageError(HypercacheioError, OSError):
    """The storage directory or database cannot be used (path, permissions, file system)."""


class StorageFullError(StorageError):
    """The file system holding the store is full (or over quota): every write fails at once,
    reads go on, and writes work again as soon as space is freed."""


class StorageCorruptError(StorageError):
    """The database file is damaged or is not a hypercacheio database."""


class StorageReadOnlyError(StorageError):
    """The database (or its directory, ``-wal`` or ``-shm`` file) cannot be written by this
    process: read-only mount, or files owned by another user."""


class LockError(HypercacheioError, RuntimeError):
    """A lock operation failed."""


class LockTimeout(LockError, TimeoutError):
    """A lock could not be acquired within the allowed time."""


class NodeUnavailable(HypercacheioError, ConnectionError):
    """A node daemon could not be reached or did not answer in time."""


class AuthError(HypercacheioError, PermissionError):
    """A node refused the API token."""


class RequestRejected(HypercacheioError, ValueError):
    """The node refused a request as malformed or too large (a 4xx other than 401)."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(f"node answered {status}: {message}")
        self.status = status
        self.code = code


class ReplicationError(HypercacheioError, ValueError):
    """Replication data from a peer cannot be used (nothing of it was applied)."""


class MalformedFrame(ReplicationError):
    """A replication frame does not decode or does not validate: wrong types, an unknown
    op, an invalid key, or over the size limits. Nothing of it is applied."""


class FrameTooLarge(MalformedFrame):
    """A replication frame is over the size limit; the connection carrying it is closed."""


class HandshakeError(HypercacheioError, ConnectionError):
    """A replication peer was refused: wrong protocol version, cluster id or token proof,
    our own node id, or no complete handshake in time. Nothing from it was applied."""


class QuorumUnavailable(NodeUnavailable):
    """Active-active: a cluster-wide ``add`` or lock needs a majority of the configured
    nodes (``HYPERCACHEIO_PEER_ADDRS`` plus this one) and fewer answered in time; nothing
    was granted (503 ``quorum_unavailable`` over HTTP)."""
