"""The node's HTTP API: plain aiohttp handler functions over the Store, and their route table.

Every request passes one guard (``guarded`` wraps each route's handler in it, and
fallback routes catch what no route takes): rate limit, token check, and the translation
of every failure into a JSON error with a 4xx status (a 5xx only when the storage itself
fails). The handlers move (tag, payload) pairs and never unpickle.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict

from .. import codec
from ..codec import check_key
from ..config import Settings
from ..errors import InvalidKeyError, StorageError
from ..l1 import ABSENT, entry_deadline, slot_of
from ..store import Store
from . import openapi as openapi_document
from . import protocol as p
from .options import NodeOptions

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StateHandler = Callable[[web.Request, "NodeState"], Awaitable[web.StreamResponse]]
T = TypeVar("T")

JSON_TYPE = "application/json"
STATS_MAX_AGE = 1.0  # seconds a stats() snapshot serves /ping and /metrics
RATE_BUCKETS_MAX = 10_000


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second, bursts of ``rate``."""

    def __init__(self, rate: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._monotonic = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, who: str) -> bool:
        now = self._monotonic()
        level, last = self._buckets.get(who, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        if level < 1.0:
            self._buckets[who] = (level, now)
            return False
        if len(self._buckets) >= RATE_BUCKETS_MAX and who not in self._buckets:
            self._buckets.clear()  # many addresses: forget them all rather than grow
        self._buckets[who] = (level - 1.0, now)
        return True


def _is_busy(exc: BaseException) -> bool:
    """True if SQLite refused because another connection holds the lock (nothing was done)."""
    for e in (exc, exc.__cause__):
        if isinstance(e, sqlite3.OperationalError) and (
                "locked" in str(e) or "busy" in str(e)):
            return True
    return False


async def store_call(state: NodeState, fn: Callable[..., T], *args: Any) -> T:
    """Run a Store method without ever blocking the event loop on SQLite's lock.

    The loop's own connection waits for no lock (busy_timeout 0, set at start-up), so the
    call runs inline when SQLite answers at once, which is nearly always. When another
    process holds the write lock it fails before doing anything, and runs again on a
    worker thread whose connection waits as usual, while the loop serves other requests.
    """
    try:
        return fn(*args)
    except (StorageError, sqlite3.OperationalError) as exc:
        if not _is_busy(exc):
            raise
    state.waited_writes += 1
    return await asyncio.get_running_loop().run_in_executor(state.executor, partial(fn, *args))


class NodeState:
    """What the handlers share: the store, the token, the limits and the counters."""

    def __init__(self, store: Store, settings: Settings, options: NodeOptions, token: str,
                 *, version: str = "", listen: list[str] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.options = options
        self.token = token.encode("utf-8")
        self.version = version
        self.listen = listen or []
        self.started = time.monotonic()
        self.started_at = time.time()
        self.limiter = RateLimiter(options.rate_limit) if options.rate_limit > 0 else None
        self.requests: dict[tuple[str, int], int] = {}
        self.auth_failures = 0
        self.rate_limited = 0
        self.waited_writes = 0  # store calls that had to wait for another process's lock
        self.executor = ThreadPoolExecutor(max_workers=2,
                                           thread_name_prefix="hypercacheio-store")
        self.hits = 0
        self.misses = 0
        self.gc_runs = 0
        self.gc_removed = 0
        self.gc_failures = 0
        self.openapi: bytes | None = None
        # The node's coherent memory layer for GET, as an app process's Cache has.
        self.l1_data: dict[str, Any] | None = {} if settings.l1_max_items else None
        self.tokens = store.tokens.tokens
        self.clock = store.clock
        self._stats: dict[str, Any] = {}
        self._stats_at = -math.inf

    def authorize(self, request: web.Request) -> bool | None:
        """True for the right token, False for a wrong one, None when none was sent."""
        given = request.headers.get(p.TOKEN_HEADER)
        if given is None:
            auth = request.headers.get("Authorization")
            if auth is None:
                return None
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer":
                return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._stats_at > STATS_MAX_AGE:
            self._stats = self.store.stats()
            self._stats_at = now
        return self._stats

    def uptime(self) -> float:
        return time.monotonic() - self.started


STATE = web.AppKey("hypercacheio_state", NodeState)


# ---- helpers --------------------------------------------------------------------------

def error(status: int, code: str, message: str) -> web.Response:
    """The one shape of every error: ``{"error": message, "code": code}``."""
    return web.Response(status=status, content_type=JSON_TYPE,
                        text=json.dumps({"error": message, "code": code}))


def ok(doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(content_type=JSON_TYPE, text=json.dumps(doc), headers=headers)


class BadRequest(Exception):
    """A malformed request: becomes 400 with this message."""


def _key(request: web.Request) -> str:
    return check_key(request.match_info["key"])


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {text[:40]!r}")
    return value


def _ttl(request: web.Request) -> float | None:
    """The TTL in seconds from ``?ttl=`` or ``X-Hypercacheio-TTL``; None: never expires."""
    text = request.query.get("ttl")
    if text is None:
        text = request.headers.get(p.TTL_HEADER)
    if text is None or text.strip() == "" or text.strip().lower() == "none":
        return None
    return _number("ttl", text.strip())


def _expire_at(store: Store, ttl: float | None) -> float | None:
    return None if ttl is None else store.clock() + ttl


def _expires_headers(expire_at: float | None) -> dict[str, str]:
    return {} if expire_at is None else {p.EXPIRES_HEADER: repr(float(expire_at))}


async def _value(request: web.Request, state: NodeState) -> tuple[int, codec.Payload]:
    """The (tag, payload) a write request carries in its body and type header."""
    name = request.headers.get(p.TYPE_HEADER, "bytes").strip().lower()
    tag = p.TYPE_TAGS.get(name)
    if tag is None:
        raise BadRequest(f"{p.TYPE_HEADER} must be one of {sorted(p.TYPE_TAGS)}, "
                         f"got {name[:40]!r}")
    limit = state.options.max_value_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    body = await request.read()
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    try:
        return tag, p.body_to_payload(tag, body)
    except ValueError as exc:
        raise BadRequest(f"body is not a valid {name} value: {exc}") from None


def _flag(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise BadRequest(f"{name} must be true or false, got {text[:40]!r}")


# ---- handlers: values -------------------------------------------------------------------

def _not_found() -> web.Response:
    return error(404, "not_found", "no live value under this key")


async def get_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = request.match_info["key"]
    data = state.l1_data
    if data is not None:
        # The node's own coherent L1 (see l1.py): valid while the key's slot keeps the
        # token read before the row was, and before the row's expiry.
        entry = data.get(key)
        if entry is not None and state.tokens[entry[1]] == entry[2] \
                and (entry[3] is None or entry[3] > state.clock()):
            answer = entry[0]
            if answer is ABSENT:
                state.misses += 1
                return _not_found()
            state.hits += 1
            return web.Response(body=answer[0], headers=answer[1])
    check_key(key)
    if data is not None:
        slot = slot_of(key)
        token = state.tokens[slot]  # the token before the row: a later write changes it
    row = await store_call(state, state.store.get, key)
    if row is None:
        state.misses += 1
        if data is not None:
            _remember(state, data, key, slot, token, ABSENT, None)
        return _not_found()
    state.hits += 1
    tag, payload, expire_at = row
    # A CIMultiDict, which web.Response copies faster than a dict on every L1 hit.
    headers = CIMultiDict({p.TYPE_HEADER: p.TYPE_NAMES[tag],
                           "Content-Type": p.CONTENT_TYPES[tag]})
    if expire_at is not None:
        headers[p.EXPIRES_HEADER] = repr(float(expire_at))
    body = p.payload_to_body(tag, payload)
    if data is not None:
        # (body, headers) is kept as it is: no handler changes either (Response copies).
        _remember(state, data, key, slot, token, (body, headers), expire_at)
    return web.Response(body=body, headers=headers)


def _remember(state: NodeState, data: dict[str, Any], key: str, slot: int, token: int,
              answer: Any, expire_at: float | None) -> None:
    """Keep a GET's answer in the node's L1 (first in, first out past l1_max_items)."""
    if len(data) >= state.settings.l1_max_items and key not in data:
        try:
            del data[next(iter(data))]
        except (StopIteration, KeyError, RuntimeError):
            pass
    deadline = entry_deadline(expire_at, state.store.clock(), state.settings.l1_max_age)
    data[key] = (answer, slot, token, deadline, None)


async def set_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = _key(request)
    ttl = _ttl(request)
    tag, payload = await _value(request, state)
    if ttl is not None and ttl <= 0:  # as Cache.set: a ttl <= 0 removes the key
        await store_call(state, state.store.delete, key)
        return ok({"stored": True, "expires_at": None})
    expire_at = _expire_at(state.store, ttl)
    await store_call(state, state.store.set, key, tag, payload, expire_at)
    return ok({"stored": True, "expires_at": expire_at}, _expires_headers(expire_at))


async def add_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = _key(request)
    ttl = _ttl(request)
    tag, payload = await _value(request, state)
    if ttl is not None and ttl <= 0:
        return ok({"added": False, "expires_at": None})
    expire_at = _expire_at(state.store, ttl)
    added = await store_call(state, state.store.add, key, tag, payload, expire_at)
    expire_at = expire_at if added else None
    return ok({"added": added, "expires_at": expire_at}, _expires_headers(expire_at))


async def delete_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    return ok({"deleted": await store_call(state, state.store.delete, _key(request))})


async def clear_values(request: web.Request, state: NodeState) -> web.StreamResponse:
    count = await store_call(state, state.store.clear)
    log.info("cache cleared through the API (%d rows)", count)
    return ok({"cleared": count})


async def touch_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = _key(request)
    ttl = _ttl(request)
    if ttl is not None and ttl <= 0:
        return ok({"touched": await store_call(state, state.store.delete, key), "expires_at": None})
    expire_at = _expire_at(state.store, ttl)
    touched = await store_call(state, state.store.touch, key, expire_at)
    expire_at = expire_at if touched else None
    return ok({"touched": touched, "expires_at": expire_at}, _expires_headers(expire_at))


async def incr_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = _key(request)
    text = request.query.get("delta", "1").strip()
    try:  # int() also refuses what isdigit() lets through: "+-5", 5,000 digits
        if not text.lstrip("+-").isdigit() or not text.isascii():
            raise ValueError
        delta = int(text)
    except ValueError:
        raise BadRequest(f"delta must be an integer, got {text[:40]!r}") from None
    if not codec.INT64_MIN <= delta <= codec.INT64_MAX:
        raise BadRequest("delta must fit in 64 bits")
    ttl = _ttl(request)
    if ttl is not None and ttl <= 0:
        raise BadRequest("ttl for a new counter must be > 0 seconds")
    try:
        value = await store_call(state, state.store.incr, key, delta, _expire_at(state.store, ttl))
    except TypeError as exc:
        return error(409, "not_integer", str(exc))
    except OverflowError as exc:
        return error(409, "overflow", str(exc))
    return ok({"value": value})


# ---- handlers: locks --------------------------------------------------------------------

def _owner(request: web.Request, required: bool) -> str | None:
    owner = request.query.get("owner")
    if owner is None or owner == "":
        if required:
            raise BadRequest("owner is required (the owner token the lock was acquired with)")
        return None
    if len(owner.encode("utf-8", "surrogatepass")) > 256:
        raise BadRequest("owner must be at most 256 bytes")
    return owner


async def acquire_lock(request: web.Request, state: NodeState) -> web.StreamResponse:
    name = _key(request)
    owner = _owner(request, required=False) or os.urandom(16).hex()
    ttl = _ttl(request)
    if ttl is not None and ttl <= 0:
        raise BadRequest("lock ttl must be > 0 seconds (or absent: held until released)")
    expire_at = _expire_at(state.store, ttl)
    if _flag(request, "extend"):
        extended = await store_call(state, state.store.lock_extend, name, owner, expire_at)
        info = await store_call(state, state.store.lock_info, name) if extended else None
        return ok({"acquired": extended, "owner": owner,
                   "fence": info[2] if info else None,
                   "expires_at": expire_at if extended else None})
    fence = await store_call(state, state.store.lock_acquire, name, owner, expire_at)
    return ok({"acquired": fence is not None, "owner": owner, "fence": fence,
               "expires_at": expire_at if fence is not None else None})


async def release_lock(request: web.Request, state: NodeState) -> web.StreamResponse:
    name = _key(request)
    if _flag(request, "force"):
        return ok({"released": await store_call(state, state.store.lock_force_release, name)})
    owner = _owner(request, required=False)
    if owner is None:
        return ok({"released": False,
                   "reason": "give owner= (the token the lock was acquired with) or force=true"})
    return ok({"released": await store_call(state, state.store.lock_release, name, owner)})


async def lock_status(request: web.Request, state: NodeState) -> web.StreamResponse:
    name = _key(request)
    owner = _owner(request, required=False)
    info = await store_call(state, state.store.lock_info, name)
    if info is None:
        return ok({"locked": False, "owned": False, "fence": None, "expires_at": None})
    held_by, expire_at, fence = info
    owned = owner is not None and hmac.compare_digest(held_by.encode(), owner.encode())
    return ok({"locked": True, "owned": owned, "fence": fence, "expires_at": expire_at})


# ---- handlers: node -------------------------------------------------------------------

async def ping(request: web.Request, state: NodeState) -> web.StreamResponse:
    if state.authorize(request) is not True:  # public: the figures only with the token
        return ok({"ok": True})
    s = state.settings
    stats = state.stats()
    return ok({
        "ok": True,
        "role": s.role,
        "node_id": state.store.node_id,
        "version": state.version,
        "pid": os.getpid(),
        "uptime": round(state.uptime(), 3),
        "started_at": state.started_at,
        "listen": state.listen,
        "directory": s.directory,
        "entries": stats["entries"],
        "locks": stats["locks"],
        "db_bytes": stats["db_bytes"],
        "wal_bytes": stats["wal_bytes"],
        "peers": list(s.peer_addrs),
        "secondaries": list(s.secondary_urls),
    })


async def metrics(request: web.Request, state: NodeState) -> web.StreamResponse:
    stats = state.stats()
    lines = [
        "# HELP hypercacheio_requests_total API requests answered, by operation and status.",
        "# TYPE hypercacheio_requests_total counter",
    ]
    for (op, status), count in sorted(state.requests.items()):
        lines.append(f'hypercacheio_requests_total{{op="{op}",status="{status}"}} {count}')
    counters = [
        ("auth_failures_total", "Requests refused for a wrong token.", state.auth_failures),
        ("rate_limited_total", "Requests refused by the rate limit.", state.rate_limited),
        ("waited_writes_total", "Store calls that waited off the event loop for another "
         "process's write lock.", state.waited_writes),
        ("hits_total", "GETs that found a live value.", state.hits),
        ("misses_total", "GETs that found nothing.", state.misses),
        ("gc_runs_total", "Background collections run.", state.gc_runs),
        ("gc_removed_total", "Expired entries removed by background collection.",
         state.gc_removed),
        ("gc_failures_total", "Background collections that failed.", state.gc_failures),
    ]
    gauges = [
        ("entries", "Live entries in the store.", stats["entries"]),
        ("locks", "Locks held.", stats["locks"]),
        ("db_bytes", "Size of the database file.", stats["db_bytes"]),
        ("wal_bytes", "Size of the write-ahead log.", stats["wal_bytes"]),
        ("uptime_seconds", "Seconds since the node started.", round(state.uptime(), 3)),
    ]
    for kind, rows in (("counter", counters), ("gauge", gauges)):
        for name, help_text, value in rows:
            lines += [f"# HELP hypercacheio_{name} {help_text}",
                      f"# TYPE hypercacheio_{name} {kind}",
                      f"hypercacheio_{name} {value}"]
    return web.Response(text="\n".join(lines) + "\n",
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request, state: NodeState) -> web.StreamResponse:
    if state.openapi is None:
        state.openapi = openapi_document.document_bytes(state.version)
    return web.Response(body=state.openapi, content_type=JSON_TYPE)


# ---- the guard and the route table -------------------------------------------------------

PUBLIC = frozenset({"ping", "openapi", None})  # None: no route matched (404/405)


def guarded(state: NodeState, op: str | None, handler: StateHandler) -> Handler:
    """``handler`` behind the guard: rate limit, token, and every failure as a JSON error;
    counts each answer.

    The guard wraps each route's handler rather than being an aiohttp middleware: the same
    checks in the same order, without the middleware machinery's cost on every request.
    Requests no route takes reach it through the fallback routes (``_no_route``,
    ``_no_method``), so that they too get a JSON error.
    """
    public = op in PUBLIC
    label = op or "unmatched"
    limiter = state.limiter
    requests = state.requests
    authorize = state.authorize

    async def guard(request: web.Request) -> web.StreamResponse:
        try:
            if limiter is not None and not limiter.allow(request.remote or ""):
                state.rate_limited += 1
                response: web.StreamResponse = error(
                    429, "rate_limited", "too many requests from this address; slow down "
                    f"(limit {state.options.rate_limit:g}/s)")
            else:
                auth = authorize(request)
                if auth is True:
                    response = await handler(request, state)
                elif auth is False:
                    state.auth_failures += 1
                    response = error(401, "unauthorized", f"wrong {p.TOKEN_HEADER}"
                                     if public else f"missing or wrong {p.TOKEN_HEADER}")
                elif not public:
                    response = error(401, "unauthorized", f"missing or wrong {p.TOKEN_HEADER}")
                else:
                    response = await handler(request, state)
        except BadRequest as exc:
            response = error(400, "bad_request", str(exc))
        except InvalidKeyError as exc:
            response = error(400, "invalid_key", str(exc))
        except web.HTTPException as exc:
            response = _http_error(state, request, exc)
        except (StorageError, sqlite3.Error) as exc:
            log.error("storage failure on %s: %s", op, exc)
            response = error(503, "storage_unavailable",
                             "the node's storage failed; see its log")
        except ConnectionResetError:  # the client went away mid-request: nobody to answer
            raise
        except Exception:
            log.exception("unexpected failure on %s", op)
            response = error(500, "internal", "unexpected failure; see the node's log")
        key = (label, response.status)
        requests[key] = requests.get(key, 0) + 1
        return response

    return guard


def _http_error(state: NodeState, request: web.Request, exc: web.HTTPException
                ) -> web.Response:
    code = {404: "no_route", 405: "method_not_allowed",
            413: "too_large"}.get(exc.status, "http_error")
    message = exc.reason
    if exc.status == 405:
        response = error(405, code, f"{request.method} is not allowed here")
        response.headers["Allow"] = ", ".join(
            sorted(getattr(exc, "allowed_methods", ()) or ()))
        return response
    if exc.status == 413:
        message = (f"value larger than the node's limit of "
                   f"{state.options.max_value_bytes} bytes")
    return error(exc.status, code, message)


async def _no_route(request: web.Request, state: NodeState) -> web.StreamResponse:
    raise web.HTTPNotFound()


def _no_method(allowed: set[str]) -> StateHandler:
    async def no_method(request: web.Request, state: NodeState) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    return no_method


KEY_PATTERN = "{key:[\\s\\S]+}"


class _KeyResource(web.DynamicResource):
    """``head{key:[\\s\\S]+}`` matched without the regular expression: whatever non-empty
    rest of the path follows ``head`` is the key (kept %-decoded as aiohttp does)."""

    def __init__(self, head: str) -> None:
        super().__init__(head + KEY_PATTERN)
        self._head = head
        self._skip = len(head)

    def _match(self, path: str) -> dict[str, str] | None:
        if len(path) <= self._skip or not path.startswith(self._head):
            return None
        key = path[self._skip:]
        if "%" in key:  # path_safe leaves "/" and "%" encoded in a segment
            key = key.replace("%2F", "/").replace("%25", "%")
        return {"key": key}


class _Unrouted(web.Resource):
    """The last resort of the router: matches every path no other resource takes."""

    def __init__(self) -> None:
        super().__init__(name=None)

    @property
    def canonical(self) -> str:
        return "/"

    def _match(self, path: str) -> dict[str, str] | None:
        return {}

    def raw_match(self, path: str) -> bool:
        return False

    def add_prefix(self, prefix: str) -> None:  # pragma: no cover - never a sub-app
        raise NotImplementedError

    def get_info(self) -> Any:
        return {}

    def url_for(self, **kwargs: str) -> Any:  # pragma: no cover
        raise NotImplementedError


ROUTES: list[tuple[str, str, StateHandler, str]] = [
    ("GET", "/cache/{key:[\\s\\S]+}", get_value, "get"),
    ("POST", "/cache/{key:[\\s\\S]+}", set_value, "set"),
    ("DELETE", "/cache/{key:[\\s\\S]+}", delete_value, "delete"),
    ("DELETE", "/cache", clear_values, "clear"),
    ("POST", "/add/{key:[\\s\\S]+}", add_value, "add"),
    ("POST", "/touch/{key:[\\s\\S]+}", touch_value, "touch"),
    ("POST", "/incr/{key:[\\s\\S]+}", incr_value, "incr"),
    ("GET", "/lock/{key:[\\s\\S]+}", lock_status, "lock_status"),
    ("POST", "/lock/{key:[\\s\\S]+}", acquire_lock, "lock"),
    ("DELETE", "/lock/{key:[\\s\\S]+}", release_lock, "unlock"),
    ("GET", "/ping", ping, "ping"),
    ("GET", "/metrics", metrics, "metrics"),
    ("GET", "/openapi.json", openapi, "openapi"),
]


def build_app(state: NodeState) -> web.Application:
    """The aiohttp application serving the API under ``/api/hypercacheio``."""
    # The body limit leaves room above the value limit so that guard answers 413 itself.
    app = web.Application(client_max_size=state.options.max_value_bytes + 1024)
    app[STATE] = state
    resources: dict[str, tuple[web.Resource, set[str]]] = {}
    for method, path, handler, name in ROUTES:
        if path not in resources:
            resource: web.Resource
            if path.endswith("/" + KEY_PATTERN):
                resource = _KeyResource(p.PREFIX + path[:-len(KEY_PATTERN)])
                app.router.register_resource(resource)
            else:
                resource = app.router.add_resource(p.PREFIX + path)
            resources[path] = (resource, set())
        resource, methods = resources[path]
        resource.add_route(method, guarded(state, name, handler))
        methods.add(method)
    # Another method on a known path: 405 with Allow, as aiohttp's router would say.
    for resource, methods in resources.values():
        resource.add_route("*", guarded(state, None, _no_method(methods)))
    unrouted = _Unrouted()
    app.router.register_resource(unrouted)
    unrouted.add_route("*", guarded(state, None, _no_route))
    app.on_startup.append(_no_waiting_on_the_loop)
    app.on_cleanup.append(_stop_executor)
    return app


async def _no_waiting_on_the_loop(app: web.Application) -> None:
    """The event loop's connection fails at once on a held lock (see ``store_call``)."""
    app[STATE].store.set_thread_busy_timeout(0)


async def _stop_executor(app: web.Application) -> None:
    app[STATE].executor.shutdown(wait=True)
