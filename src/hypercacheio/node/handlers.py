"""The node's handler functions: plain ``async def handler(request, state)`` over the Store.

They move (tag, payload) pairs and never unpickle. Request parsing helpers (key, ttl, the
value in a body, flags, lock owners) are here too, for every route module to share.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict

from .. import codec
from ..codec import check_key
from ..errors import QuorumUnavailable
from ..l1 import ABSENT, MISS
from ..store import Store
from . import metrics_text, replica_routes
from . import openapi as openapi_document
from . import protocol as p
from .guard import JSON_TYPE, BadRequest, authorize, error, ok
from .state import NodeState, store_call

log = logging.getLogger("hypercacheio.node.api")

OWNER_MAX_BYTES = 256
T = TypeVar("T")


# ---- request parsing --------------------------------------------------------------------

def key_of(request: web.Request) -> str:
    """The checked key (or lock name) of a ``.../{key}`` route."""
    return check_key(request.match_info["key"])


def number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {text[:40]!r}")
    return value


def ttl_of(request: web.Request) -> float | None:
    """The TTL in seconds from ``?ttl=`` or ``X-Hypercacheio-TTL``; None: never expires."""
    text = request.query.get("ttl")
    if text is None:
        text = request.headers.get(p.TTL_HEADER)
    if text is None or text.strip() == "" or text.strip().lower() == "none":
        return None
    return number("ttl", text.strip())


def expire_at_of(store: Store, ttl: float | None) -> float | None:
    return None if ttl is None else store.clock() + ttl


def expires_headers(expire_at: float | None) -> dict[str, str]:
    return {} if expire_at is None else {p.EXPIRES_HEADER: repr(float(expire_at))}


def _run_versioned(store: Store, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """``fn(*args)`` and the version it committed in this thread (0: it wrote nothing)."""
    before = store.last_version()
    result = fn(*args)
    after = store.last_version()
    return result, (after if after != before else 0)


async def versioned_call(state: NodeState, fn: Callable[..., T], *args: Any
                         ) -> tuple[T, dict[str, str]]:
    """A store write through ``store_call``, with the headers that tell a secondary the
    version the write took (none when it wrote nothing): ``VERSION_HEADER`` and
    ``ORIGIN_HEADER`` (see ``hypercacheio.replication.forward``)."""
    result, version = await store_call(state, _run_versioned, state.store, fn, *args)
    if not version:
        return result, {}
    return result, {p.VERSION_HEADER: str(version), p.ORIGIN_HEADER: state.store.node_id}


def row_answer(tag: int, payload: codec.Payload, expire_at: float | None,
               extra: dict[str, str] | None = None) -> web.Response:
    """A stored value as GET answers it: the body, its type and expiry headers."""
    headers = CIMultiDict({p.TYPE_HEADER: p.TYPE_NAMES[tag],
                           "Content-Type": p.CONTENT_TYPES[tag]})
    if expire_at is not None:
        headers[p.EXPIRES_HEADER] = repr(float(expire_at))
    if extra:
        headers.update(extra)
    return web.Response(body=p.payload_to_body(tag, payload), headers=headers)


async def read_body(request: web.Request, state: NodeState, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes (else 413), sent within the read timeout
    (else 408: a client that stalls mid-body does not hold the request forever)."""
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    try:
        body = await asyncio.wait_for(request.read(), state.options.read_timeout)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout() from None
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return body


async def value_of(request: web.Request, state: NodeState) -> tuple[int, codec.Payload]:
    """The (tag, payload) a write request carries in its body and type header."""
    name = request.headers.get(p.TYPE_HEADER, "bytes").strip().lower()
    tag = p.TYPE_TAGS.get(name)
    if tag is None:
        raise BadRequest(f"{p.TYPE_HEADER} must be one of {sorted(p.TYPE_TAGS)}, "
                         f"got {name[:40]!r}")
    body = await read_body(request, state, state.options.max_value_bytes)
    try:
        return tag, p.body_to_payload(tag, body)
    except ValueError as exc:
        raise BadRequest(f"body is not a valid {name} value: {exc}") from None


def flag(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise BadRequest(f"{name} must be true or false, got {text[:40]!r}")


def owner_of(request: web.Request) -> str | None:
    """The ``?owner=`` of a lock call (None when absent or empty).

    It must be valid UTF-8 once %-decoded: aiohttp turns undecodable bytes into U+FFFD, so
    two different raw owners would compare equal (one could release the other's lock).
    """
    raw = request.rel_url.raw_query_string
    if "owner=" not in raw:
        return None
    owners = [v for k, v in (part.partition("=")[::2] for part in raw.split("&"))
              if k == "owner"]
    text = owners[-1] if owners else ""
    if text == "":
        return None
    try:
        owner = _percent_decode_strict(text)
    except UnicodeDecodeError:
        raise BadRequest("owner must be valid UTF-8 text (once %-decoded)") from None
    if len(owner.encode("utf-8")) > OWNER_MAX_BYTES:
        raise BadRequest(f"owner must be at most {OWNER_MAX_BYTES} bytes")
    return owner


def _percent_decode_strict(text: str) -> str:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "strict")


# ---- values -------------------------------------------------------------------------------

def _not_found() -> web.Response:
    return error(404, "not_found", "no live value under this key")


async def get_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = request.match_info["key"]
    l1 = state.l1
    if l1 is not None:
        state.store.tokens.check(writing=False)  # one fstat: never touch a shrunk map
        answer = l1.get(key, ABSENT)  # the one L1 lookup (l1.py); MISS: ask the store
        if answer is not MISS:
            if answer is ABSENT:
                state.misses += 1
                return _not_found()
            state.hits += 1
            return web.Response(body=answer[0], headers=answer[1])
        check_key(key)
        slot, token = l1.token_of(key)  # the token before the row: a later write changes it
    else:
        check_key(key)
    row = await store_call(state, state.store.get, key)
    if row is None:
        state.misses += 1
        if l1 is not None:
            l1.put_answer(key, slot, token, ABSENT, 8, None)
        return _not_found()
    state.hits += 1
    tag, payload, expire_at = row
    # A CIMultiDict, which web.Response copies faster than a dict on every L1 hit.
    headers = CIMultiDict({p.TYPE_HEADER: p.TYPE_NAMES[tag],
                           "Content-Type": p.CONTENT_TYPES[tag]})
    if expire_at is not None:
        headers[p.EXPIRES_HEADER] = repr(float(expire_at))
    body = p.payload_to_body(tag, payload)
    if l1 is not None:
        # (body, headers) is kept as it is: no handler changes either (Response copies).
        l1.put_answer(key, slot, token, (body, headers), len(body), expire_at)
    return web.Response(body=body, headers=headers)


async def set_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = key_of(request)
    ttl = ttl_of(request)
    tag, payload = await value_of(request, state)
    state.forget(key)
    if ttl is not None and ttl <= 0:  # as Cache.set: a ttl <= 0 removes the key
        _, written = await versioned_call(state, state.store.delete, key)
        return ok({"stored": True, "expires_at": None}, written)
    expire_at = expire_at_of(state.store, ttl)
    _, written = await versioned_call(state, state.store.set, key, tag, payload, expire_at)
    return ok({"stored": True, "expires_at": expire_at}, {**expires_headers(expire_at), **written})


async def add_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = key_of(request)
    ttl = ttl_of(request)
    tag, payload = await value_of(request, state)
    if ttl is not None and ttl <= 0:
        return ok({"added": False, "expires_at": None})
    expire_at = expire_at_of(state.store, ttl)
    mesh = state.mesh
    if mesh is not None and mesh.quorum is not None and not state.settings.ha_local_add:
        try:  # active-active: one winner cluster-wide (replication/quorum.py)
            added = await mesh.run(mesh.quorum.add(key, tag, payload, expire_at))
        except QuorumUnavailable as exc:
            return error(503, "quorum_unavailable", str(exc))
        if added:
            state.forget(key)
        expire_at = expire_at if added else None
        return ok({"added": added, "expires_at": expire_at}, expires_headers(expire_at))
    added, written = await versioned_call(state, state.store.add, key, tag, payload, expire_at)
    if added:
        state.forget(key)
    expire_at = expire_at if added else None
    return ok({"added": added, "expires_at": expire_at}, {**expires_headers(expire_at), **written})


async def delete_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = key_of(request)
    state.forget(key)
    deleted, written = await versioned_call(state, state.store.delete, key)
    return ok({"deleted": deleted}, written)


async def clear_values(request: web.Request, state: NodeState) -> web.StreamResponse:
    count, written = await versioned_call(state, state.store.clear)
    if state.l1 is not None:
        state.l1.clear()  # the tokens moved already; this frees the memory
    log.info("cache cleared through the API (%d rows)", count)
    return ok({"cleared": count}, written)


async def touch_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = key_of(request)
    ttl = ttl_of(request)
    state.forget(key)
    if ttl is not None and ttl <= 0:
        deleted, written = await versioned_call(state, state.store.delete, key)
        return ok({"touched": deleted, "expires_at": None}, written)
    expire_at = expire_at_of(state.store, ttl)
    if request.headers.get(p.RETURN_HEADER, "").strip().lower() == "row":
        # A secondary's touch: the touched row, which it applies whole (see protocol.py).
        row, written = await versioned_call(state, state.store.touch_row, key, expire_at)
        if row is None:
            return _not_found()
        return row_answer(row[0], row[1], row[2], written)
    touched, written = await versioned_call(state, state.store.touch, key, expire_at)
    expire_at = expire_at if touched else None
    return ok({"touched": touched, "expires_at": expire_at},
              {**expires_headers(expire_at), **written})


async def incr_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = key_of(request)
    text = request.query.get("delta", "1").strip()
    try:  # int() also refuses what isdigit() lets through: "+-5", 5,000 digits
        if not text.lstrip("+-").isdigit() or not text.isascii():
            raise ValueError
        delta = int(text)
    except ValueError:
        raise BadRequest(f"delta must be an integer, got {text[:40]!r}") from None
    if not codec.INT64_MIN <= delta <= codec.INT64_MAX:
        raise BadRequest("delta must fit in 64 bits")
    ttl = ttl_of(request)
    if ttl is not None and ttl <= 0:
        raise BadRequest("ttl for a new counter must be > 0 seconds")
    create = flag(request, "create") if "create" in request.query else True
    state.forget(key)
    try:
        (value, expire_at), written = await versioned_call(
            state, partial(state.store.incr_row, create=create), key, delta,
            expire_at_of(state.store, ttl))
    except KeyError:
        return error(404, "not_found", "no live counter under this key (create=false)")
    except TypeError as exc:
        return error(409, "not_integer", str(exc))
    except OverflowError as exc:
        return error(409, "overflow", str(exc))
    return ok({"value": value}, {**expires_headers(expire_at), **written})


# ---- locks --------------------------------------------------------------------------------

async def acquire_lock(request: web.Request, state: NodeState) -> web.StreamResponse:
    name = key_of(request)
    owner = owner_of(request) or os.urandom(16).hex()
    ttl = ttl_of(request)
    if ttl is not None and ttl <= 0:
        raise BadRequest("lock ttl must be > 0 seconds (or absent: held until released)")
    expire_at = expire_at_of(state.store, ttl)
    mesh = state.mesh
    if mesh is not None and mesh.quorum is not None:  # active-active: by majority
        quorum = mesh.quorum
        try:
            if flag(request, "extend"):
                extended = await mesh.run(quorum.extend(name, owner, expire_at))
                info = await store_call(state, state.store.lock_info, name) if extended else None
                return ok({"acquired": extended, "owner": owner,
                           "fence": info[2] if info else None,
                           "expires_at": expire_at if extended else None})
            fence = await mesh.run(quorum.acquire(name, owner, expire_at))
        except QuorumUnavailable as exc:
            return error(503, "quorum_unavailable", str(exc))
        return ok({"acquired": fence is not None, "owner": owner, "fence": fence,
                   "expires_at": expire_at if fence is not None else None})
    if flag(request, "extend"):
        extended = await store_call(state, state.store.lock_extend, name, owner, expire_at)
        info = await store_call(state, state.store.lock_info, name) if extended else None
        return ok({"acquired": extended, "owner": owner,
                   "fence": info[2] if info else None,
                   "expires_at": expire_at if extended else None})
    fence = await store_call(state, state.store.lock_acquire, name, owner, expire_at)
    return ok({"acquired": fence is not None, "owner": owner, "fence": fence,
               "expires_at": expire_at if fence is not None else None})


async def release_lock(request: web.Request, state: NodeState) -> web.StreamResponse:
    name = key_of(request)
    mesh = state.mesh
    force = flag(request, "force")
    owner = owner_of(request)
    if mesh is not None and mesh.quorum is not None and (force or owner is not None):
        return ok({"released": await mesh.run(mesh.quorum.release(name, owner or "", force))})
    if force:
        return ok({"released": await store_call(state, state.store.lock_force_release, name)})
    if owner is None:
        return ok({"released": False,
                   "reason": "give owner= (the token the lock was acquired with) or force=true"})
    return ok({"released": await store_call(state, state.store.lock_release, name, owner)})


async def lock_status(request: web.Request, state: NodeState) -> web.StreamResponse:
    name = key_of(request)
    owner = owner_of(request)
    mesh = state.mesh
    if mesh is not None and mesh.quorum is not None:  # active-active: what a majority holds
        try:
            info = await mesh.run(mesh.quorum.info(name))
        except QuorumUnavailable as exc:
            return error(503, "quorum_unavailable", str(exc))
    else:
        info = await store_call(state, state.store.lock_info, name)
    if info is None:
        return ok({"locked": False, "owned": False, "fence": None, "expires_at": None})
    held_by, expire_at, fence = info
    owned = owner is not None and hmac.compare_digest(held_by.encode(), owner.encode())
    return ok({"locked": True, "owned": owned, "fence": fence, "expires_at": expire_at})


# ---- the node -----------------------------------------------------------------------------

async def ping(request: web.Request, state: NodeState) -> web.StreamResponse:
    if authorize(state, request) is not True:  # public: the figures only with the token
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
        "replication": replica_routes.ping_doc(state),
        **({"mesh": state.mesh.status()} if state.mesh is not None else {}),
    })


async def metrics(request: web.Request, state: NodeState) -> web.StreamResponse:
    stats = state.stats()
    lines = [
        "# HELP hypercacheio_requests_total API requests answered, by operation and status.",
        "# TYPE hypercacheio_requests_total counter",
    ]
    for (op, status), count in sorted(state.requests.items()):
        lines.append(f'hypercacheio_requests_total{{op="{op}",status="{status}"}} {count}')
    l1 = state.l1
    gc = state.collector
    counters = [
        ("auth_failures_total", "Requests refused for a wrong token.", state.auth_failures),
        ("rate_limited_total", "Requests refused by the rate limit.", state.rate_limited),
        ("waited_writes_total", "Store calls that waited off the event loop for another "
         "process's write lock.", state.waited_writes),
        ("refused_connections_total", "Connections closed at once because the node held "
         "HYPERCACHEIO_NODE_MAX_CONNECTIONS already.", state.refused_connections),
        ("timed_out_connections_total", "Connections closed because no complete request "
         "head arrived within HYPERCACHEIO_NODE_READ_TIMEOUT.", state.timed_out_connections),
        ("hits_total", "GETs that found a live value.", state.hits),
        ("misses_total", "GETs that found nothing.", state.misses),
        ("gc_runs_total", "Background collections run.", gc.runs if gc else 0),
        ("gc_removed_total", "Expired entries removed by background collection.",
         gc.removed if gc else 0),
        ("gc_failures_total", "Background collections that failed.", gc.failures if gc else 0),
        ("l1_repairs_total", "Times the L1 token file was found truncated or replaced and "
         "mapped again.", state.store.tokens.repairs),
    ]
    if state.primary is not None:  # a secondary: its writes go to the primary
        counters += [
            ("forwarded_total", "Writes and lock calls this secondary sent to its primary "
             "and got an answer to.", state.primary.forwarded),
            ("forward_failures_total", "Writes and lock calls the primary did not answer "
             "(or refused this node's token); answered 503 or 502.", state.primary.failures),
        ]
    gauges = [
        ("entries", "Live entries in the store.", stats["entries"]),
        ("locks", "Locks held.", stats["locks"]),
        ("db_bytes", "Size of the database file.", stats["db_bytes"]),
        ("wal_bytes", "Size of the write-ahead log.", stats["wal_bytes"]),
        ("connections", "Client connections open now.", state.open_connections()),
        ("l1_items", "Answers kept in the node's GET memory.", len(l1.data) if l1 else 0),
        ("l1_bytes", "Bytes of the answers kept in the node's GET memory (bounded by "
         "HYPERCACHEIO_L1_MAX_BYTES).", l1.bytes if l1 else 0),
        ("uptime_seconds", "Seconds since the node started.", round(state.uptime(), 3)),
    ]
    for kind, rows in (("counter", counters), ("gauge", gauges)):
        for name, help_text, value in rows:
            lines += [f"# HELP hypercacheio_{name} {help_text}",
                      f"# TYPE hypercacheio_{name} {kind}",
                      f"hypercacheio_{name} {value}"]
    lines += metrics_text.latency_lines(state)
    lines += replica_routes.metric_lines(state)
    if state.mesh is not None:
        lines += state.mesh.metric_lines()
    return web.Response(text="\n".join(lines) + "\n",
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request, state: NodeState) -> web.StreamResponse:
    if state.openapi is None:
        state.openapi = openapi_document.document_bytes(state.version)
    return web.Response(body=state.openapi, content_type=JSON_TYPE)
