"""Settings: keyword arguments and ``HYPERCACHEIO_*`` variables, validated once at start-up.

Every setting has one field here, one environment variable (plus the PHP package's old
names as aliases), one default and one validator. ``Settings.from_env`` reads the
environment; ``Settings(...)`` takes keyword arguments; both validate the same way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "changeme"
API_PATH = "/api/hypercacheio"
"""Where a node serves its HTTP API (server, client, check and the default URLs use it)."""
ROLES = ("primary", "secondary")
# The PHP package's SERVER_TYPE values are accepted as aliases of ours.
SERVER_TYPES = {"embedded": "embedded", "node": "node", "laravel": "embedded", "go": "node"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def default_directory() -> str:
    """The storage directory used when none is given.

    The one rule, everywhere (library, CLI, node, check, Django, Flask): the directory given
    (``directory=``, ``--directory``, LOCATION), else ``HYPERCACHEIO_SQLITE_PATH``, else
    ``$XDG_CACHE_HOME/hypercacheio``. So ``Cache()`` and ``Settings()`` read the variable too.
    """
    configured = os.environ.get("HYPERCACHEIO_SQLITE_PATH", "").strip()
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hypercacheio")


def env_text(value: object) -> str:
    """A setting's value as an environment variable carries it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_bool(name: str, raw: str | bool) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of true/false/1/0/yes/no/on/off, got {raw!r}")


def parse_ttl(name: str, raw: Any) -> float | None:
    """A TTL in seconds: int, float, timedelta, numeric string, or None/'' for never."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    if isinstance(raw, timedelta):
        return raw.total_seconds()
    if isinstance(raw, bool):
        raise ConfigError(f"{name} must be a number of seconds or None, got {raw!r}")
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds or None, got {raw!r}") from None
    if seconds != seconds:  # NaN compares false with every bound below
        raise ConfigError(f"{name} must be a number of seconds or None, got {raw!r}")
    return seconds


def _int(name: str, raw: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    try:
        value = int(str(raw).strip()) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def _optional_int(name: str, raw: Any, *, minimum: int) -> int | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    return _int(name, raw, minimum=minimum)


def is_valid_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_url_list(name: str, raw: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated URLs: whitespace trimmed, invalid ones dropped with a warning."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    good: list[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if is_valid_url(item):
            good.append(item.rstrip("/"))
        else:
            log.warning("%s: dropping invalid URL %r (expected http(s)://host[:port][/path])",
                        name, item)
    return tuple(good)


def parse_host_port(name: str, item: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(f"{name}: {item!r} is not host:port")
    return host, _int(f"{name} port in {item!r}", port, minimum=1, maximum=65535)


def parse_peer_list(name: str, raw: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    peers = []
    for item in (str(i).strip() for i in items):
        if item:
            host, port = parse_host_port(name, item)
            peers.append(f"{host}:{port}")
    return tuple(peers)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """Every setting of hypercacheio, validated. Build with keywords or ``from_env()``."""

    directory: str = field(default_factory=default_directory)
    prefix: str = ""
    default_ttl: float | None = None
    l1_max_items: int = 10_000
    l1_max_age: float | None = None
    l1_max_bytes: int = 32 * 1024 * 1024
    max_bytes: int | None = None
    max_entries: int | None = None
    cull_frequency: int = 3
    busy_timeout: float = 60.0
    allow_network_fs: bool = False
    # cluster and node settings (used by the node daemon and the replication layers)
    role: str = "primary"
    primary_url: str = f"http://127.0.0.1:8080{API_PATH}"
    secondary_urls: tuple[str, ...] = ()
    api_token: str = DEFAULT_TOKEN
    async_requests: bool = True
    timeout: float = 1.0
    server_type: str = "embedded"
    node_host: str = "127.0.0.1"
    node_listen_host: str = "127.0.0.1"
    node_port: int = 8080
    node_socket: str | None = None
    ha_enabled: bool = True
    peer_addrs: tuple[str, ...] = ()
    repl_port: int = 7400
    cluster_id: str = "hypercacheio"
    repl_tls_cert: str | None = None
    repl_tls_key: str | None = None
    repl_tls_ca: str | None = None
    anti_entropy_interval: float = 60.0
    ha_local_add: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "directory", str(Path(os.path.expanduser(str(self.directory)))))
        if not isinstance(self.prefix, str):
            raise ConfigError(f"prefix must be a str, got {type(self.prefix).__name__}")
        if "\0" in self.prefix:  # prefix + key is the stored key: codec.check_key's rule
            raise ConfigError("prefix (HYPERCACHEIO_PREFIX) must not contain the NUL "
                              "character (\\x00; reserved for internal names)")
        ttl = parse_ttl("default_ttl", self.default_ttl)
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"default_ttl must be > 0 seconds or None, got {ttl}")
        put(self, "default_ttl", ttl)
        put(self, "l1_max_items", _int("l1_max_items", self.l1_max_items, minimum=0))
        age = parse_ttl("l1_max_age", self.l1_max_age)
        if age is not None and age <= 0:
            raise ConfigError(f"l1_max_age must be > 0 seconds or None, "
                              f"got {self.l1_max_age!r}")
        put(self, "l1_max_age", age)
        put(self, "l1_max_bytes", _int("l1_max_bytes", self.l1_max_bytes, minimum=0))
        put(self, "max_bytes", _optional_int("max_bytes", self.max_bytes, minimum=4096))
        put(self, "max_entries", _optional_int("max_entries", self.max_entries, minimum=1))
        put(self, "cull_frequency", _int("cull_frequency", self.cull_frequency, minimum=0))
        busy = parse_ttl("busy_timeout", self.busy_timeout)
        if busy is None or busy <= 0:
            raise ConfigError(f"busy_timeout must be > 0 seconds, got {self.busy_timeout!r}")
        put(self, "busy_timeout", busy)
        put(self, "allow_network_fs", parse_bool("allow_network_fs", self.allow_network_fs))
        role = str(self.role).strip().lower()
        if role not in ROLES:
            raise ConfigError(f"HYPERCACHEIO_SERVER_ROLE must be one of {ROLES}, got {self.role!r}")
        put(self, "role", role)
        if not is_valid_url(self.primary_url):
            raise ConfigError(f"HYPERCACHEIO_PRIMARY_URL must be an http(s) URL, "
                              f"got {self.primary_url!r}")
        put(self, "primary_url", self.primary_url.rstrip("/"))
        put(self, "secondary_urls", parse_url_list("HYPERCACHEIO_SECONDARY_URLS",
                                                   self.secondary_urls))
        if not isinstance(self.api_token, str):
            raise ConfigError("HYPERCACHEIO_API_TOKEN must be a string")
        put(self, "async_requests", parse_bool("HYPERCACHEIO_ASYNC", self.async_requests))
        timeout = parse_ttl("timeout", self.timeout)
        if timeout is None or timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        put(self, "timeout", timeout)
        stype = SERVER_TYPES.get(str(self.server_type).strip().lower())
        if stype is None:
            raise ConfigError(f"HYPERCACHEIO_SERVER_TYPE must be one of {sorted(SERVER_TYPES)}, "
                              f"got {self.server_type!r}")
        put(self, "server_type", stype)
        for name in ("node_host", "node_listen_host"):
            value = str(getattr(self, name)).strip()
            if not value:
                raise ConfigError(f"{name} must not be empty")
            put(self, name, value)
        put(self, "node_port", _int("HYPERCACHEIO_NODE_PORT", self.node_port,
                                    minimum=0, maximum=65535))
        put(self, "repl_port", _int("HYPERCACHEIO_REPL_PORT", self.repl_port,
                                    minimum=1, maximum=65535))
        put(self, "ha_enabled", parse_bool("HYPERCACHEIO_HA_ENABLED", self.ha_enabled))
        put(self, "peer_addrs", parse_peer_list("HYPERCACHEIO_PEER_ADDRS", self.peer_addrs))
        cluster_id = str(self.cluster_id).strip()
        if not cluster_id:
            raise ConfigError("HYPERCACHEIO_CLUSTER_ID must not be empty (every node of a "
                              "cluster sets the same one)")
        put(self, "cluster_id", cluster_id)
        for name in ("repl_tls_cert", "repl_tls_key", "repl_tls_ca"):
            path = getattr(self, name)
            put(self, name, str(path).strip() or None if path is not None else None)
        if bool(self.repl_tls_cert) != bool(self.repl_tls_key):
            raise ConfigError("HYPERCACHEIO_REPL_TLS_CERT and HYPERCACHEIO_REPL_TLS_KEY must be "
                              "set together")
        interval = parse_ttl("HYPERCACHEIO_ANTI_ENTROPY_INTERVAL", self.anti_entropy_interval)
        if interval is None or interval < 0:
            raise ConfigError("HYPERCACHEIO_ANTI_ENTROPY_INTERVAL must be >= 0 seconds (0: "
                              f"never), got {self.anti_entropy_interval!r}")
        put(self, "anti_entropy_interval", interval)
        put(self, "ha_local_add", parse_bool("HYPERCACHEIO_HA_LOCAL_ADD", self.ha_local_add))

    @property
    def active_active(self) -> bool:
        """True when this host's node runs the active-active mesh (HA enabled with peers,
        and not a secondary): the node starts it, ``Cache`` sends add and locks to it,
        ``stats`` shows it."""
        return self.ha_enabled and bool(self.peer_addrs) and self.role != "secondary"

    @property
    def clustered(self) -> bool:
        """True when writes must be kept for replication (tombstones, oplog)."""
        return bool(self.secondary_urls) or (self.ha_enabled and bool(self.peer_addrs))

    @property
    def node_url(self) -> str:
        return f"http://{self.node_host}:{self.node_port}{API_PATH}"

    def to_env(self, *, token: bool = True,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every setting as its ``HYPERCACHEIO_*`` variable (the one writer of such dicts:
        ``install --write-env``, service files, Django's command, ``node start``'s child).

        Unset optional settings are left out (absent means None), and so is the token when
        ``token`` is false, or when it is the default and ``environ`` (default: the process
        environment) does not set it, so that a node keeps the token it generated.
        """
        env = os.environ if environ is None else environ
        out: dict[str, str] = {}
        for fname, names in ENV_VARS.items():
            value = getattr(self, fname)
            if value is None:
                continue
            if fname == "api_token" and (not token or (
                    value == DEFAULT_TOKEN and not any(n in env for n in names))):
                continue
            out[names[0]] = env_text(value)
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``HYPERCACHEIO_*`` variables; keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for fname, names in ENV_VARS.items():
            for name in names:
                if name in env:
                    values[fname] = env[name]
                    break
        values.update(overrides)
        return cls(**values)


# field -> environment variable names (first is ours, the rest are the PHP package's aliases)
ENV_VARS: dict[str, tuple[str, ...]] = {
    "directory": ("HYPERCACHEIO_SQLITE_PATH",),
    "prefix": ("HYPERCACHEIO_PREFIX",),
    "default_ttl": ("HYPERCACHEIO_DEFAULT_TTL",),
    "l1_max_items": ("HYPERCACHEIO_L1_MAX_ITEMS",),
    "l1_max_age": ("HYPERCACHEIO_L1_MAX_AGE",),
    "l1_max_bytes": ("HYPERCACHEIO_L1_MAX_BYTES",),
    "max_bytes": ("HYPERCACHEIO_MAX_BYTES",),
    "max_entries": ("HYPERCACHEIO_MAX_ENTRIES",),
    "cull_frequency": ("HYPERCACHEIO_CULL_FREQUENCY",),
    "busy_timeout": ("HYPERCACHEIO_BUSY_TIMEOUT",),
    "allow_network_fs": ("HYPERCACHEIO_ALLOW_NETWORK_FS",),
    "role": ("HYPERCACHEIO_SERVER_ROLE",),
    "primary_url": ("HYPERCACHEIO_PRIMARY_URL",),
    "secondary_urls": ("HYPERCACHEIO_SECONDARY_URLS",),
    "api_token": ("HYPERCACHEIO_API_TOKEN",),
    "async_requests": ("HYPERCACHEIO_ASYNC",),
    "timeout": ("HYPERCACHEIO_TIMEOUT",),
    "server_type": ("HYPERCACHEIO_SERVER_TYPE",),
    "node_host": ("HYPERCACHEIO_NODE_HOST", "HYPERCACHEIO_GO_HOST"),
    "node_listen_host": ("HYPERCACHEIO_NODE_LISTEN_HOST", "HYPERCACHEIO_GO_LISTEN_HOST"),
    "node_port": ("HYPERCACHEIO_NODE_PORT", "HYPERCACHEIO_GO_PORT"),
    "node_socket": ("HYPERCACHEIO_NODE_SOCKET",),
    "ha_enabled": ("HYPERCACHEIO_HA_ENABLED",),
    "peer_addrs": ("HYPERCACHEIO_PEER_ADDRS",),
    "repl_port": ("HYPERCACHEIO_REPL_PORT",),
    "cluster_id": ("HYPERCACHEIO_CLUSTER_ID",),
    "repl_tls_cert": ("HYPERCACHEIO_REPL_TLS_CERT",),
    "repl_tls_key": ("HYPERCACHEIO_REPL_TLS_KEY",),
    "repl_tls_ca": ("HYPERCACHEIO_REPL_TLS_CA",),
    "anti_entropy_interval": ("HYPERCACHEIO_ANTI_ENTROPY_INTERVAL",),
    "ha_local_add": ("HYPERCACHEIO_HA_LOCAL_ADD",),
}

SettingParser = Callable[[str, Any], Any]
