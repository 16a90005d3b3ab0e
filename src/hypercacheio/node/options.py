"""NodeOptions: the daemon's own settings (limits, GC, TLS, files), beside the shared Settings.

Each option has a keyword, a ``HYPERCACHEIO_NODE_*`` variable and a default, validated once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_TOKEN, Settings, is_loopback, parse_bool, parse_ttl
from ..errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_FILE = "node.token"
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
}


def _seconds(name: str, raw: Any, *, allow_zero: bool) -> float:
    value = parse_ttl(name, raw)
    if value is None or value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ConfigError(f"{name} must be a number of seconds > 0, got {raw!r}")
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

    def __post_init__(self) -> None:
        put = object.__setattr__
        try:
            size = int(str(self.max_value_bytes).strip())
        except ValueError:
            raise ConfigError(f"HYPERCACHEIO_NODE_MAX_VALUE_BYTES must be an integer, "
                              f"got {self.max_value_bytes!r}") from None
        if size < 1:
            raise ConfigError(f"HYPERCACHEIO_NODE_MAX_VALUE_BYTES must be >= 1, got {size}")
        put(self, "max_value_bytes", size)
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> NodeOptions:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {f: env[v] for f, v in OPTION_VARS.items() if v in env}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> NodeOptions:
        return dataclasses.replace(self, **changes)

    def pid_path(self, settings: Settings) -> str:
        return self.pid_file or os.path.join(settings.directory, PID_FILE)


def token_path(settings: Settings) -> str:
    return os.path.join(settings.directory, TOKEN_FILE)


def read_token_file(settings: Settings) -> str | None:
    """The token a node generated for this storage directory, if any."""
    try:
        with open(token_path(settings), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def resolve_token(settings: Settings, explicit: bool) -> tuple[str, bool]:
    """The token the node will require, and whether it was generated just now.

    An explicitly configured token is used as it is, but an empty one or ``changeme`` is
    refused on any non-loopback address. With no token configured, the node uses the one
    it generated for this directory (mode 0600), making one on the first run.
    """
    token = settings.api_token
    hosts = [settings.node_listen_host]
    if explicit:
        if token.strip() in ("", DEFAULT_TOKEN) and not all(is_loopback(h) for h in hosts):
            raise ConfigError(
                f"refusing to listen on {settings.node_listen_host} with "
                f"{'an empty' if not token.strip() else 'the default'} API token: anyone who "
                "can reach the port could read and write the cache; set "
                "HYPERCACHEIO_API_TOKEN to a long random secret (e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if not token:
            raise ConfigError("HYPERCACHEIO_API_TOKEN must not be empty")
        return token, False
    existing = read_token_file(settings)
    if existing:
        return existing, False
    token = secrets.token_urlsafe(32)
    os.makedirs(settings.directory, exist_ok=True)
    path = token_path(settings)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another node start made it a moment ago
        return read_token_file(settings) or token, False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token, True
