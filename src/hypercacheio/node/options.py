"""NodeOptions: the daemon's own settings (limits, GC, TLS, files), beside the shared Settings.

The token rules are in ``hypercacheio.auth``.

Each option has a keyword, a ``HYPERCACHEIO_NODE_*`` variable and a default, validated once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Settings, env_text, parse_bool, parse_ttl
from ..errors import ConfigError

log = logging.getLogger(__name__)

PID_FILE = "node.pid"
LOG_FILE = "node.log"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

OPTION_VARS: dict[str, str] = {
    "max_value_bytes": "HYPERCACHEIO_NODE_MAX_VALUE_BYTES",
    "rate_limit": "HYPERCACHEIO_NODE_RATE_LIMIT",
    "gc_interval": "HYPERCACHEIO_NODE_GC_INTERVAL",
    "tls_cert": "HYPERCACHEIO_NODE_TLS_CERT",
    "tls_key": "HYPERCACHEIO_NODE_TLS_KEY",
    "log_file": "HYPERCACHEIO_NODE_LOG_FILE",
    "log_level": "HYPERCACHEIO_NODE_LOG_LEVEL",
    "pid_file": "HYPERCACHEIO_NODE_PID_FILE",
    "access_log": "HYPERCACHEIO_NODE_ACCESS_LOG",
    "shutdown_timeout": "HYPERCACHEIO_NODE_SHUTDOWN_TIMEOUT",
    "max_connections": "HYPERCACHEIO_NODE_MAX_CONNECTIONS",
    "idle_timeout": "HYPERCACHEIO_NODE_IDLE_TIMEOUT",
    "read_timeout": "HYPERCACHEIO_NODE_READ_TIMEOUT",
}


def _seconds(name: str, raw: Any, *, allow_zero: bool) -> float:
    value = parse_ttl(name, raw)
    if value is None or value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ConfigError(f"{name} must be a number of seconds > 0, got {raw!r}")
    return value


def _count(name: str, raw: Any) -> int:
    """A setting that is an integer >= 1."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class NodeOptions:
    """How the daemon runs: limits, collection, TLS and its files."""

    max_value_bytes: int = 16 * 1024 * 1024
    rate_limit: float = 0.0  # requests per second per client address; 0: no limit
    gc_interval: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    log_file: str | None = None  # None: stderr
    log_level: str = "INFO"
    pid_file: str | None = None  # None: <directory>/node.pid
    access_log: bool = False
    shutdown_timeout: float = 10.0
    # Connection floods: at most this many client connections at once (fewer if the open
    # file limit is lower); the newest one over it is closed at once.
    max_connections: int = 4096
    idle_timeout: float = 30.0  # a keep-alive connection with no request for this long closes
    read_timeout: float = 10.0  # for a request's head (from connect) and for its body

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "max_value_bytes", _count("HYPERCACHEIO_NODE_MAX_VALUE_BYTES",
                                            self.max_value_bytes))
        try:
            rate = float(str(self.rate_limit).strip() or 0)
        except ValueError:
            raise ConfigError(f"HYPERCACHEIO_NODE_RATE_LIMIT must be a number of requests "
                              f"per second (0: no limit), got {self.rate_limit!r}") from None
        if rate < 0 or rate != rate:
            raise ConfigError(f"HYPERCACHEIO_NODE_RATE_LIMIT must be >= 0, got {rate}")
        put(self, "rate_limit", rate)
        put(self, "gc_interval", _seconds("HYPERCACHEIO_NODE_GC_INTERVAL", self.gc_interval,
                                          allow_zero=False))
        put(self, "shutdown_timeout", _seconds("HYPERCACHEIO_NODE_SHUTDOWN_TIMEOUT",
                                               self.shutdown_timeout, allow_zero=True))
        for name in ("tls_cert", "tls_key", "log_file", "pid_file"):
            value = getattr(self, name)
            put(self, name, str(value) if value not in (None, "") else None)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both HYPERCACHEIO_NODE_TLS_CERT and "
                              "HYPERCACHEIO_NODE_TLS_KEY (or neither)")
        level = str(self.log_level).strip().upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"HYPERCACHEIO_NODE_LOG_LEVEL must be one of {LOG_LEVELS}, "
                              f"got {self.log_level!r}")
        put(self, "log_level", level)
        put(self, "access_log", parse_bool("HYPERCACHEIO_NODE_ACCESS_LOG", self.access_log))
        put(self, "max_connections", _count("HYPERCACHEIO_NODE_MAX_CONNECTIONS",
                                            self.max_connections))
        put(self, "idle_timeout", _seconds("HYPERCACHEIO_NODE_IDLE_TIMEOUT", self.idle_timeout,
                                           allow_zero=False))
        put(self, "read_timeout", _seconds("HYPERCACHEIO_NODE_READ_TIMEOUT", self.read_timeout,
                                           allow_zero=False))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> NodeOptions:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {f: env[v] for f, v in OPTION_VARS.items() if v in env}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> NodeOptions:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """Every option that is set, as its ``HYPERCACHEIO_NODE_*`` variable."""
        return {name: env_text(getattr(self, fname)) for fname, name in OPTION_VARS.items()
                if getattr(self, fname) is not None}

    def pid_path(self, settings: Settings) -> str:
        return self.pid_file or os.path.join(settings.directory, PID_FILE)
