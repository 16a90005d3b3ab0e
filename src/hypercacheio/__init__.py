"""hypercacheio: a cache every worker process of a host and every server of a cluster share."""

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
from .node.client import RemoteCache

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Cache",
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
