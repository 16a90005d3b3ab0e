"""RemoteCache: the Cache API spoken to a node daemon over HTTP (or a unix socket).

Values are encoded here, in the client, exactly as ``Cache`` encodes them (``codec``), so a
value written through a node reads back the same through a local ``Cache`` on the node's
host and the other way round. Connections are kept alive in a pool (transport.py).

``RemoteCache`` satisfies ``hypercacheio.api.CacheLike`` with ``Cache``'s defaults: a ttl
left out means ``default_ttl``. Reads and writes of many keys travel as one msgpack request
each (node/batch.py). Every failure to reach the node or to get its answer raises
``NodeUnavailable``; a request that must not be applied twice (incr, add, touch, pull, lock
acquire/extend/release) is never resent (see transport.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from .. import codec
from ..api import CacheBase, check_delta
from ..cache import MISSING
from ..codec import UndecodableValue, check_key
from ..config import Settings
from ..errors import AuthError, NodeUnavailable, RequestRejected
from ..lock import DEFAULT_BLOCKING_TIMEOUT, Lock
from . import protocol as p
from .transport import Response, Target, check_header_value, make_transport, tls_context

TYPE_KEY = p.TYPE_HEADER.lower()
DEFAULT_LOCK_TTL = 10.0
T = TypeVar("T")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_~-]+")  # what quote() leaves alone, dots aside


def _quote_key(key: str) -> str:
    # Every reserved character is escaped, dots too, so that no key ('..', 'a/b') can be
    # read as a path segment to normalize.
    if _PLAIN_KEY.fullmatch(key):
        return key
    return quote(key, safe="").replace(".", "%2E")


def _seconds(ttl: Any) -> float | int | None:
    """A ttl as seconds, None for never; TypeError or ValueError as ``Cache`` raises them."""
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        ttl = ttl.total_seconds()
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be seconds (int, float, timedelta) or None, "
                        f"got {type(ttl).__name__}")
    if ttl != ttl:
        raise ValueError("ttl must be a number of seconds, got NaN")
    return ttl


def _ttl_text(seconds: float | int | None) -> str | None:
    """A ttl as sent in a header (seconds as text), None for never."""
    if seconds is None:
        return None
    return repr(float(seconds)) if isinstance(seconds, float) else str(seconds)


def _msgpack() -> ModuleType:
    try:
        import msgpack
    except ImportError:  # pragma: no cover - the client extra installs it
        raise ImportError("RemoteCache's many-key methods need msgpack: "
                          "pip install 'hypercacheio[client]'") from None
    return msgpack


class RemoteCache(CacheBase):
    """A cache served by a hypercacheio node: ``RemoteCache("http://host:8080", token)``.

    ``url`` is the node's base URL; ``/api/hypercacheio`` is appended when it has no path.
    With ``unix_socket`` the requests go over that socket (the URL may be left out; only its
    path is used). ``settings`` (a ``Settings``) supplies what is not given: the URL
    (``node_url``), the token, the timeout and ``default_ttl``. ``verify`` (https): True, a
    CA file path, or False for a self-signed local node. Network failures raise
    ``NodeUnavailable``; a refused token raises ``AuthError``; a refused request
    ``RequestRejected``.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
        unix_socket: str | None = None,
        *,
        default_ttl: float | timedelta | None = MISSING,
        settings: Settings | None = None,
        maxsize: int = 8,
        verify: bool | str = True,
        transport: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if url is None:
            if unix_socket:
                url = "http://localhost"
            elif settings is not None:
                url = settings.node_url
            else:
                raise ValueError("RemoteCache needs the node's url (http://host:port) or "
                                 "unix_socket (the path of the node's socket)")
        if token is None:
            token = settings.api_token if settings is not None else ""
        if timeout is None:
            timeout = settings.timeout if settings is not None else 1.0
        if default_ttl is MISSING:
            default_ttl = settings.default_ttl if settings is not None else None
        seconds = _seconds(default_ttl)
        if seconds is not None and not seconds > 0:
            raise ValueError(f"default_ttl must be > 0 seconds or None, got {default_ttl!r}")
        self.default_ttl: float | None = None if seconds is None else float(seconds)
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
        self.hits = 0
        self.misses = 0
        # No token at all: only the public routes (a bare ping) will answer.
        self._headers = {p.TOKEN_HEADER: check_header_value("token", token)} if token else {}
        tls = tls_context(verify) if parts.scheme == "https" and not unix_socket else None
        target = Target(host, parts.port or (443 if tls else 80), unix_socket, tls)
        self._transport = make_transport(target, timeout, maxsize, transport)

    # ---- transport ---------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 fields: dict[str, str] | None = None, *, idempotent: bool = True) -> Response:
        """One request; ``idempotent=False`` for one that must never be sent twice."""
        target = self.base_path + path
        if fields:
            target += "?" + urlencode(fields)
        try:
            resp = self._transport.request(method, target, headers or self._headers, body,
                                           idempotent)
        except OSError as exc:  # TransportError, timeouts, refused, reset, TLS
            raise NodeUnavailable(f"node at {self._where()} did not answer {method} "
                                  f"{path}: {exc}") from exc
        status = resp.status
        if status < 400:
            return resp
        message, code = self._error_of(resp)
        if status == 404:
            if code == "not_found":  # a miss, as GET /cache/{key} reports one
                return resp
            raise RequestRejected(404, f"no hypercacheio node API at {self._where()} for "
                                  f"{method} {path} (check the URL's path; a node older "
                                  f"than this client lacks its newer routes): {message}",
                                  code)
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

    def _ttl(self, ttl: Any) -> float | int | None:
        """Seconds for a ttl argument: left out (MISSING) means ``default_ttl``."""
        return self.default_ttl if ttl is MISSING else _seconds(ttl)

    def _ttl_headers(self, ttl: Any, tag: int | None = None) -> dict[str, str]:
        headers = dict(self._headers)
        if tag is not None:
            headers[p.TYPE_HEADER] = p.TYPE_NAMES[tag]
        text = _ttl_text(self._ttl(ttl))
        if text is not None:
            headers[p.TTL_HEADER] = text
        return headers

    def _value_of(self, resp: Response, default: Any) -> Any:
        """The value a GET or pull answered with (``default`` for a miss)."""
        if resp.status == 404:
            self.misses += 1
            return default
        tag = p.TYPE_TAGS.get(resp.headers.get(TYPE_KEY, "bytes"), codec.TAG_BYTES)
        try:
            value = codec.decode(tag, p.body_to_payload(tag, resp.body))
        except (UndecodableValue, ValueError):
            self.misses += 1
            return default
        self.hits += 1
        return value

    def _pack(self, doc: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        headers = dict(self._headers)
        headers["Content-Type"] = p.MSGPACK_TYPE
        return _msgpack().packb(doc, use_bin_type=True), headers

    # ---- the cache API: reads ------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing or expired."""
        return self._value_of(self._request("GET", "/cache/" + _quote_key(check_key(key))),
                              default)

    def has(self, key: str) -> bool:
        """True if ``key`` holds a live value."""
        return self.get(key, MISSING) is not MISSING

    __contains__ = has

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """A dict of the keys that hold live values (missing keys are left out)."""
        wanted = [check_key(key) for key in keys]
        found: dict[str, Any] = {}
        msgpack = _msgpack()
        for start in range(0, len(wanted), p.BATCH_MAX_KEYS):
            chunk = wanted[start:start + p.BATCH_MAX_KEYS]
            body, headers = self._pack({"keys": chunk})
            resp = self._request("POST", "/many/get", body, headers)
            try:
                values = msgpack.unpackb(resp.body, raw=False)
                items = values["values"].items()
            except Exception as exc:  # msgpack raises many kinds; none is the caller's fault
                raise NodeUnavailable(f"node at {self._where()} sent an unreadable answer "
                                      f"to POST /many/get: {exc}") from exc
            for key, (name, payload) in items:
                tag = p.TYPE_TAGS.get(name, codec.TAG_BYTES)
                try:
                    found[key] = codec.decode(tag, p.body_to_payload(tag, payload))
                except (UndecodableValue, ValueError):  # as get(): a miss
                    continue
        self.hits += len(found)
        self.misses += len(wanted) - len(found)
        return found

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key``: None if it never expires, 0.0 if missing or expired."""
        resp = self._request("GET", "/ttl/" + _quote_key(check_key(key)))
        if resp.status == 404:
            return 0.0
        seconds = self._json(resp).get("ttl")
        return None if seconds is None else max(0.0, float(seconds))

    # ---- the cache API: writes -----------------------------------------------------------

    def set(self, key: str, value: Any, ttl: Any = MISSING) -> bool:
        """Store ``value``; ``ttl`` seconds (None: forever; <= 0: remove the key; left out:
        ``default_ttl``)."""
        tag, payload = codec.encode(value)
        self._request("POST", "/cache/" + _quote_key(check_key(key)),
                      body=p.payload_to_body(tag, payload),
                      headers=self._ttl_headers(ttl, tag))
        return True

    def forever(self, key: str, value: Any) -> bool:
        """Store ``value`` with no expiry, whatever ``default_ttl`` says."""
        return self.set(key, value, ttl=None)

    def add(self, key: str, value: Any, ttl: Any = MISSING) -> bool:
        """Store only if ``key`` is missing or expired; True if stored."""
        tag, payload = codec.encode(value)
        resp = self._request("POST", "/add/" + _quote_key(check_key(key)),
                             body=p.payload_to_body(tag, payload),
                             headers=self._ttl_headers(ttl, tag), idempotent=False)
        return bool(self._json(resp).get("added"))

    def set_many(self, mapping: Mapping[str, Any], ttl: Any = MISSING) -> list[str]:
        """Store every pair in one transaction on the node; returns the keys that failed
        (none: a refused batch raises and stores nothing)."""
        seconds = self._ttl(ttl)
        items = []
        for key, value in mapping.items():
            tag, payload = codec.encode(value)
            items.append([check_key(key), p.TYPE_NAMES[tag], p.payload_to_body(tag, payload)])
        if not items:
            return []
        body, headers = self._pack({"items": items, "ttl": seconds})
        self._request("POST", "/many/set", body, headers)
        return []

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it held a live value."""
        resp = self._request("DELETE", "/cache/" + _quote_key(check_key(key)))
        return bool(self._json(resp).get("deleted"))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove keys in one transaction on the node; returns how many held live values."""
        wanted = [check_key(key) for key in keys]
        if not wanted:
            return 0
        body, headers = self._pack({"keys": wanted})
        return int(self._json(self._request("POST", "/many/delete", body, headers))
                   .get("deleted", 0))

    def pull(self, key: str, default: Any = None) -> Any:
        """Get and delete ``key`` in one transaction on the node."""
        resp = self._request("POST", "/pull/" + _quote_key(check_key(key)), idempotent=False)
        return self._value_of(resp, default)

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` atomically and return the new value; a missing key starts at 0 (and
        expires after ``default_ttl``, as with ``Cache``)."""
        fields = {"delta": str(check_delta(delta))}
        if self.default_ttl is not None:
            fields["ttl"] = repr(self.default_ttl)
        resp = self._request("POST", "/incr/" + _quote_key(check_key(key)), fields=fields,
                             idempotent=False)
        return int(self._json(resp)["value"])

    def decr(self, key: str, delta: int = 1) -> int:
        """Subtract ``delta`` atomically and return the new value."""
        return self.incr(key, -check_delta(delta))

    def touch(self, key: str, ttl: Any = MISSING) -> bool:
        """Give ``key`` a new ttl from now (None: never expires; left out: ``default_ttl``);
        False if it is missing. ttl <= 0 removes it."""
        resp = self._request("POST", "/touch/" + _quote_key(check_key(key)),
                             headers=self._ttl_headers(ttl), idempotent=False)
        return bool(self._json(resp).get("touched"))

    def clear(self) -> int:
        """Remove every entry on the node (locks stay); returns how many went."""
        return int(self._json(self._request("DELETE", "/cache")).get("cleared", 0))

    # ---- locks -----------------------------------------------------------------------

    def lock(self, name: str, ttl: float | timedelta | None = DEFAULT_LOCK_TTL,
             owner: str | None = None,
             *, blocking_timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> RemoteLock:
        """A lock named ``name`` held on the node for at most ``ttl`` seconds (not acquired)."""
        check_key(name)
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
        if seconds is not None and (isinstance(seconds, bool)
                                    or not isinstance(seconds, (int, float))
                                    or not seconds > 0):
            raise ValueError(f"lock ttl must be > 0 seconds or None, got {ttl!r}")
        return RemoteLock(self, name, None if seconds is None else float(seconds), owner,
                          blocking_timeout=blocking_timeout, monotonic=self._monotonic,
                          sleep=self._sleep)

    def restore_lock(self, name: str, owner: str) -> RemoteLock:
        """A handle on a lock that ``owner`` acquired elsewhere (another process or request)."""
        lock = self.lock(name, ttl=None, owner=owner)
        doc = self._json(self._request("GET", "/lock/" + _quote_key(name),
                                       fields={"owner": owner}))
        if doc.get("owned"):
            fence = doc.get("fence")
            lock.fence = None if fence is None else int(fence)
            expires_at = doc.get("expires_at")
            if expires_at is not None:
                lock.ttl = max(0.001, float(expires_at) - time.time())
        return lock

    # ---- the node --------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """The node's health and figures (role, node id, version, uptime, entries, ...)."""
        return self._json(self._request("GET", "/ping"))

    def stats(self) -> dict[str, Any]:
        """This client's hit and miss counts and the node's store figures (as ``Cache``)."""
        info = self.ping()
        out: dict[str, Any] = {"hits": self.hits, "misses": self.misses, "l1_hits": 0,
                               "l1_items": 0}
        for name in ("entries", "locks", "db_bytes", "wal_bytes"):
            if name in info:
                out[name] = info[name]
        return out

    def close(self) -> None:
        """Close the pooled connections (the client reconnects if used again)."""
        self._transport.close()

    def __repr__(self) -> str:
        return f"<RemoteCache {self._where()}>"

    # ---- the lock backend (lock.LockBackend) used by RemoteLock ------------------------------
    # None of these is ever resent: a second acquire, extend or release could act on a grant
    # the first one already changed.

    def try_lock(self, name: str, owner: str, ttl: float | None) -> int | None:
        fields = {"owner": owner}
        if ttl is not None:
            fields["ttl"] = repr(float(ttl))
        doc = self._json(self._request("POST", "/lock/" + _quote_key(name), fields=fields,
                                       idempotent=False))
        fence = doc.get("fence")
        return int(fence) if doc.get("acquired") and fence is not None else None

    def extend_lock(self, name: str, owner: str, ttl: float | None) -> bool:
        fields = {"owner": owner, "extend": "true"}
        if ttl is not None:
            fields["ttl"] = repr(float(ttl))
        doc = self._json(self._request("POST", "/lock/" + _quote_key(name), fields=fields,
                                       idempotent=False))
        return bool(doc.get("acquired"))

    def unlock(self, name: str, owner: str) -> bool:
        resp = self._request("DELETE", "/lock/" + _quote_key(name), fields={"owner": owner},
                             idempotent=False)
        return bool(self._json(resp).get("released"))

    def force_unlock(self, name: str) -> bool:
        resp = self._request("DELETE", "/lock/" + _quote_key(name), fields={"force": "true"},
                             idempotent=False)
        return bool(self._json(resp).get("released"))

    def lock_state(self, name: str, owner: str) -> tuple[bool, bool]:
        doc = self._json(self._request("GET", "/lock/" + _quote_key(name),
                                       fields={"owner": owner}))
        return bool(doc.get("locked")), bool(doc.get("owned"))


class RemoteLock(Lock):
    """A lock held on a node: the same object as a local Lock, its backend a RemoteCache."""


__all__ = ["RemoteCache", "RemoteLock", "RequestRejected"]
