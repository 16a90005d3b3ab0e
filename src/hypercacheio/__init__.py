"""hypercacheio: a cache every worker process of a host and every server of a cluster share.

``RemoteCache`` (the node's client) is imported on first use, so that ``import hypercacheio``
does not load the HTTP client (urllib3, httptools) in processes that never talk to a node;
``__version__`` is read from the package metadata on first use too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import CacheLike
from .cache import Cache
from .config import Settings
from .errors import (
    AuthError,
    ConfigError,
    HypercacheioError,
    InvalidKeyError,
    InvalidValueError,
    LockError,
    LockTimeout,
    NodeUnavailable,
    StorageError,
)
from .lock import Lock

if TYPE_CHECKING:
    from .node.client import RemoteCache

    __version__: str


def _version() -> str:
    """The installed distribution's version: pyproject.toml is the one source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hypercacheio")
    except PackageNotFoundError:  # src/ on sys.path without an install
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """``RemoteCache`` and ``__version__`` on first use (importlib.metadata alone costs
    about as much as the rest of the package)."""
    if name == "RemoteCache":
        from .node.client import RemoteCache

        return RemoteCache
    if name == "__version__":
        value = _version()
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'hypercacheio' has no attribute {name!r}")


__all__ = [
    "AuthError",
    "Cache",
    "CacheLike",
    "ConfigError",
    "HypercacheioError",
    "InvalidKeyError",
    "InvalidValueError",
    "Lock",
    "LockError",
    "LockTimeout",
    "NodeUnavailable",
    "RemoteCache",
    "Settings",
    "StorageError",
    "__version__",
]
