"""The exceptions of hypercacheio: one root, each subclass also a fitting builtin."""

from __future__ import annotations


class HypercacheioError(Exception):
    """Root of every error raised by hypercacheio."""


class InvalidKeyError(HypercacheioError, ValueError):
    """A key is not a non-empty ``str`` of at most 1,024 UTF-8 bytes."""


class InvalidValueError(HypercacheioError, TypeError):
    """A value cannot be encoded (it does not pickle)."""


class ConfigError(HypercacheioError, ValueError):
    """A setting (keyword argument or ``HYPERCACHEIO_*`` variable) is invalid."""


class StorageError(HypercacheioError, OSError):
    """The storage directory or database cannot be used (path, permissions, file system)."""


class LockError(HypercacheioError, RuntimeError):
    """A lock operation failed."""


class LockTimeout(LockError, TimeoutError):
    """A lock could not be acquired within the allowed time."""


class NodeUnavailable(HypercacheioError, ConnectionError):
    """A node daemon could not be reached or did not answer in time."""


class AuthError(HypercacheioError, PermissionError):
    """A node refused the API token."""
