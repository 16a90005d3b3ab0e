"""The API token: where it comes from, where a node keeps it, and when it is refused.

One rule for every side. A client on this host (the CLI, ``check``, ``node status``) uses
``HYPERCACHEIO_API_TOKEN`` when it is set, else the token the local node generated in its
storage directory (``DIRECTORY/node.token``), else the configured default. A node uses an
explicitly set token as it is, except that an empty one or ``changeme`` is refused on any
non-loopback address; with none set, it generates one for its directory on the first run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

from .config import DEFAULT_TOKEN, ENV_VARS, Settings, is_loopback
from .errors import ConfigError

TOKEN_VAR = ENV_VARS["api_token"][0]
TOKEN_FILE = "node.token"

FROM_ENV, FROM_FILE, FROM_DEFAULT = "environment", "file", "default"

NOT_SET_TEXT = "(default changeme: not set, so a node generates its own in DIRECTORY/node.token)"


def token_display(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """How a settings listing shows the token: never its value."""
    configured = token_explicit(environ) or settings.api_token != DEFAULT_TOKEN
    return "(set, hidden)" if configured else NOT_SET_TEXT


def token_path(settings: Settings) -> str:
    """Where a node keeps the token it generated for ``settings.directory``."""
    return os.path.join(settings.directory, TOKEN_FILE)


def read_token_file(settings: Settings) -> str | None:
    """The token a node generated for this storage directory, if any."""
    try:
        with open(token_path(settings), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def token_explicit(environ: Mapping[str, str] | None = None) -> bool:
    """True when the token is configured (``HYPERCACHEIO_API_TOKEN`` is set)."""
    env = os.environ if environ is None else environ
    return TOKEN_VAR in env


def is_weak(token: str) -> bool:
    """An empty token or the documented default."""
    return token.strip() in ("", DEFAULT_TOKEN)


def weak_token_refused(settings: Settings) -> bool:
    """True when a node with ``settings`` must refuse its (weak) token: not on loopback."""
    return is_weak(settings.api_token) and not is_loopback(settings.node_listen_host)


def client_token(settings: Settings,
                 environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The token a client on this host sends, and where it came from (``FROM_*``)."""
    if token_explicit(environ):
        return settings.api_token, FROM_ENV
    saved = read_token_file(settings)
    if saved:
        return saved, FROM_FILE
    return settings.api_token, FROM_DEFAULT


def resolve_token(settings: Settings, explicit: bool) -> tuple[str, bool]:
    """The token the node will require, and whether it was generated just now.

    Raises ConfigError for a weak explicit token on a non-loopback address (or an empty one
    anywhere); OSError when the directory cannot hold a generated token.
    """
    token = settings.api_token
    if explicit:
        if weak_token_refused(settings):
            raise ConfigError(
                f"refusing to listen on {settings.node_listen_host} with "
                f"{'an empty' if not token.strip() else 'the default'} API token: anyone who "
                f"can reach the port could read and write the cache; set {TOKEN_VAR} to a "
                "long random secret (e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if not token:
            raise ConfigError(f"{TOKEN_VAR} must not be empty")
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
