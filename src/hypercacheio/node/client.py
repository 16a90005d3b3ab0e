"""RemoteCache: the Cache API spoken to a node daemon over HTTP (or a unix socket).

Values are encoded here, in the client, exactly as ``Cache`` encodes them (``codec``), so a
value written through a node reads back the same through a local ``Cache`` on the node's
host and the other way round. Connections are kept alive in a pool (transport.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .. import codec
from ..codec import UndecodableValue, check_key
from ..errors import AuthError, HypercacheioError, NodeUnavailable
from ..lock import DEFAULT_BLOCKING_TIMEOUT, Lock
from . import protocol as p
from .transport import Response, Target, check_header_value, make_transport, tls_context

TYPE_KEY = p.TYPE_HEADER.lower()
DEFAULT_LOCK_TTL = 10.0


class RequestRejected(HypercacheioError, ValueError):
    """The node refused a request as malformed or too large (a 4xx other than 401)."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(f"node answered {status}: {message}")
        self.status = status
        self.code = code


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_~-]+")  # what quote() leaves alone, dots aside


def _quote_key(key: str) -> str:
    # Every reserved character is escaped, dots too, so that no key ('..', 'a/b') can be
    # read as a path segment to normalize.
    if _PLAIN_KEY.fullmatch(key):
        return key
    return quote(key, safe="").replace(".", "%2E")


def _ttl_value(ttl: Any) -> str | None:
    """The TTL as sent (seconds as text), None for never; TypeError for other types."""
    if ttl is None:
        return None
    if hasattr(ttl, "total_seconds"):
        ttl = ttl.total_seconds()
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be seconds (int, float, timedelta) or None, "
                        f"got {type(ttl).__name__}")
    if ttl != ttl:
        raise ValueError("ttl must be a number of seconds, got NaN")
    return repr(float(ttl)) if isinstance(ttl, float) else str(ttl)


class RemoteCache:
    """A cache served by a hypercacheio node: ``RemoteCache("http://host:8080", token)``.

    ``url`` is the node's base URL; ``/api/hypercacheio`` is appended when it has no path.
    With ``unix_socket`` the requests go over that socket and only the URL's path is used.
    ``verify`` (https): True, a CA file path, or False for a self-signed local node.
    Network failures raise ``NodeUnavailable``; a refused token raises ``AuthError``.
    """

    def __init__(
        self,
        url: str,
        token: str,
        timeout: float = 1.0,
        unix_socket: str | None = None,
        *,
        maxsize: int = 8,
        verify: bool | str = True,
        transport: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or (not parts.hostname and not unix_socket):
            raise ValueError(f"node url must look like http(s)://host:port, got {url!r}")
        host = parts.hostname or "localhost"
        path = parts.path.rstrip("/")
        self.base_path = path if path else p.PREFIX
        self.url = f"{parts.scheme}://{parts.netloc}{self.base_path}"
        self.unix_socket = unix_socket
        self.timeout = timeout
        self._monotonic = monotonic
        self._sleep = sleep
        # No token at all: only the public routes (a bare ping) will answer.
        self._headers = {p.TOKEN_HEADER: check_header_value("token", token)} if token else {}
        tls = tls_context(verify) if parts.scheme == "https" and not unix_socket else None
        target = Target(host, parts.port or (443 if tls else 80), unix_socket, tls)
        self._transport = make_transport(target, timeout, maxsize, transport)

    # ---- transport ---------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 fields: dict[str, str] | None = None) -> Response:
        target = self.base_path + path
        if fields:
            target += "?" + urlencode(fields)
        try:
            resp = self._transport.request(method, target, headers or self._headers, body)
        except OSError as exc:
            raise NodeUnavailable(f"node at {self._where()} did not answer {method} "
                                  f"{path}: {exc}") from exc
        status = resp.status
        if status < 400:
            return resp
        message, code = self._error_of(resp)
        if status == 404:
            if code == "not_found":  # a miss, as GET /cache/{key} reports one
                return resp
            raise RequestRejected(404, f"no hypercacheio node API at {self._where()} "
                                  f"(check the URL's path): {message}", code)
        if status == 401:
            raise AuthError(f"node at {self._where()} refused the API token ({message}); "
                            "check HYPERCACHEIO_API_TOKEN")
        if status == 409 and code == "not_integer":
            raise TypeError(message)
        if status == 409 and code == "overflow":
            raise OverflowError(message)
        if status >= 500 or status == 429:
            raise NodeUnavailable(f"node at {self._where()} answered {status}: {message}")
        raise RequestRejected(status, message, code)

    def _where(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else self.url

    @staticmethod
    def _error_of(resp: Response) -> tuple[str, str]:
        try:
            doc = json.loads(resp.body)
            return str(doc.get("error", "")), str(doc.get("code", ""))
        except (ValueError, AttributeError):
            return resp.body[:200].decode("utf-8", "replace"), ""

    def _json(self, resp: Response) -> dict[str, Any]:
        try:
            doc = json.loads(resp.body)
        except ValueError as exc:
            raise NodeUnavailable(f"node at {self._where()} sent a body that is not JSON") \
                from exc
        if not isinstance(doc, dict):
            raise NodeUnavailable(f"node at {self._where()} sent unexpected JSON")
        return doc

    def _value_headers(self, tag: int, ttl: Any) -> dict[str, str]:
        headers = dict(self._headers)
        headers[p.TYPE_HEADER] = p.TYPE_NAMES[tag]
        seconds = _ttl_value(ttl)
        if seconds is not None:
            headers[p.TTL_HEADER] = seconds
        return headers

    # ---- the cache API ---------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing or expired."""
        resp = self._request("GET", "/cache/" + _quote_key(check_key(key)))
        if resp.status == 404:
            return default
        tag = p.TYPE_TAGS.get(resp.headers.get(TYPE_KEY, "bytes"), codec.TAG_BYTES)
        try:
            return codec.decode(tag, p.body_to_payload(tag, resp.body))
        except (UndecodableValue, ValueError):
            return default

    def has(self, key: str) -> bool:
        """True if ``key`` holds a live value."""
        marker = object()
        return self.get(key, marker) is not marker

    def set(self, key: str, value: Any, ttl: Any = None) -> bool:
        """Store ``value``; ``ttl`` seconds (None: forever; <= 0: remove the key)."""
        tag, payload = codec.encode(value)
        self._request("POST", "/cache/" + _quote_key(check_key(key)),
                      body=p.payload_to_body(tag, payload),
                      headers=self._value_headers(tag, ttl))
        return True

    def add(self, key: str, value: Any, ttl: Any = None) -> bool:
        """Store only if ``key`` is missing or expired; True if stored."""
        tag, payload = codec.encode(value)
        resp = self._request("POST", "/add/" + _quote_key(check_key(key)),
                             body=p.payload_to_body(tag, payload),
                             headers=self._value_headers(tag, ttl))
        return bool(self._json(resp).get("added"))

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it held a live value."""
        resp = self._request("DELETE", "/cache/" + _quote_key(check_key(key)))
        return bool(self._json(resp).get("deleted"))

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` atomically and return the new value; a missing key starts at 0."""
        if type(delta) is not int:
            raise TypeError(f"delta must be an int, got {type(delta).__name__}")
        resp = self._request("POST", "/incr/" + _quote_key(check_key(key)),
                             fields={"delta": str(delta)})
        return int(self._json(resp)["value"])

    def decr(self, key: str, delta: int = 1) -> int:
        """Subtract ``delta`` atomically and return the new value."""
        if type(delta) is not int:
            raise TypeError(f"delta must be an int, got {type(delta).__name__}")
        return self.incr(key, -delta)

    def touch(self, key: str, ttl: Any = None) -> bool:
        """Give ``key`` a new ttl from now (None: never expires); False if it is missing."""
        headers = dict(self._headers)
        seconds = _ttl_value(ttl)
        if seconds is not None:
            headers[p.TTL_HEADER] = seconds
        resp = self._request("POST", "/touch/" + _quote_key(check_key(key)), headers=headers)
        return bool(self._json(resp).get("touched"))

    def clear(self) -> int:
        """Remove every entry on the node (locks stay); returns how many went."""
        return int(self._json(self._request("DELETE", "/cache")).get("cleared", 0))

    def lock(self, name: str, ttl: float | None = DEFAULT_LOCK_TTL, owner: str | None = None,
             *, blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> RemoteLock:
        """A lock named ``name`` held on the node for at most ``ttl`` seconds (not acquired)."""
        check_key(name)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                                or not ttl > 0):
            raise ValueError(f"lock ttl must be > 0 seconds or None, got {ttl!r}")
        return RemoteLock(self, name, ttl, owner, blocking_timeout=blocking_timeout,
                          monotonic=self._monotonic, sleep=self._sleep)

    def ping(self) -> dict[str, Any]:
        """The node's health and figures (role, node id, version, uptime, entries, ...)."""
        return self._json(self._request("GET", "/ping"))

    def close(self) -> None:
        """Close the pooled connections (the client reconnects if used again)."""
        self._transport.close()

    def __enter__(self) -> RemoteCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteCache {self._where()}>"

    # ---- the lock backend (lock.LockBackend) used by RemoteLock ------------------------------

    def try_lock(self, name: str, owner: str, ttl: float | None) -> int | None:
        fields = {"owner": owner}
        if ttl is not None:
            fields["ttl"] = repr(float(ttl))
        doc = self._json(self._request("POST", "/lock/" + _quote_key(name), fields=fields))
        fence = doc.get("fence")
        return int(fence) if doc.get("acquired") and fence is not None else None

    def extend_lock(self, name: str, owner: str, ttl: float | None) -> bool:
        fields = {"owner": owner, "extend": "true"}
        if ttl is not None:
            fields["ttl"] = repr(float(ttl))
        doc = self._json(self._request("POST", "/lock/" + _quote_key(name), fields=fields))
        return bool(doc.get("acquired"))

    def unlock(self, name: str, owner: str) -> bool:
        resp = self._request("DELETE", "/lock/" + _quote_key(name), fields={"owner": owner})
        return bool(self._json(resp).get("released"))

    def force_unlock(self, name: str) -> bool:
        resp = self._request("DELETE", "/lock/" + _quote_key(name), fields={"force": "true"})
        return bool(self._json(resp).get("released"))

    def lock_state(self, name: str, owner: str) -> tuple[bool, bool]:
        doc = self._json(self._request("GET", "/lock/" + _quote_key(name),
                                       fields={"owner": owner}))
        return bool(doc.get("locked")), bool(doc.get("owned"))


class RemoteLock(Lock):
    """A lock held on a node: the same object as a local Lock, its backend a RemoteCache."""


__all__ = ["RemoteCache", "RemoteLock", "RequestRejected"]
