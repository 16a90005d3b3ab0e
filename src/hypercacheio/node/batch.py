"""The node's routes for many keys at once, and pull and ttl: what a loop of requests would do
slowly (``RemoteCache.get_many``, ``set_many``, ``delete_many``, ``pull``, ``ttl``).

Request bodies of the ``/many`` routes are msgpack maps; a value travels as ``[type name,
payload]``, its payload exactly the body a single-key request carries (decimal ASCII for an
int, UTF-8 for a str, the raw bytes of bytes and pickle): the node never unpickles. A batch
is all or nothing: every key, type and payload is checked before anything is written, and
``/many/set`` and ``/many/delete`` write in one transaction. Limits: a body of at most the
node's value limit plus ``BATCH_OVERHEAD`` bytes (413), at most ``BATCH_MAX_KEYS`` keys (400).

    POST /many/get     {"keys": [key, ...]}
                       -> msgpack {"values": {key: [type, payload]}} (missing keys left out)
    POST /many/set     {"items": [[key, type, payload], ...], "ttl": seconds or nil}
                       -> JSON {"stored": n, "expires_at": t}
    POST /many/delete  {"keys": [key, ...]} -> JSON {"deleted": n}
    POST /pull/{key}   get and delete: the value as GET answers it, 404 if missing
    GET  /ttl/{key}    JSON {"ttl": seconds or null, "expires_at": t}, 404 if missing
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
from aiohttp import web

from .. import codec
from ..codec import check_key
from ..store import Store
from . import protocol as p
from .guard import BadRequest, StateHandler, error, ok
from .handlers import expires_headers, row_answer, versioned_call
from .state import NodeState, store_call

BATCH_OVERHEAD = 64 * 1024  # bytes of msgpack framing and keys allowed above the value limit


def body_limit(state: NodeState) -> int:
    """The largest body a batch request may have."""
    return state.options.max_value_bytes + BATCH_OVERHEAD


async def read_raw(request: web.Request, state: NodeState) -> bytes | web.Response:
    """The body of a batch request, or the 413 answer to a body over the limit.

    The body is read here, not by ``request.read()``, whose limit (the app's
    ``client_max_size``) is the single-value one.
    """
    limit = body_limit(state)
    length = request.content_length
    too_large = error(413, "too_large", f"batch body larger than the node's limit of {limit} "
                      "bytes (HYPERCACHEIO_NODE_MAX_VALUE_BYTES plus "
                      f"{BATCH_OVERHEAD}); send fewer or smaller values per request")
    if length is not None and length > limit:
        return too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


def decode_doc(raw: bytes) -> dict[str, Any]:
    """The msgpack map of a batch request's body (BadRequest: 400)."""
    try:
        doc = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds (ValueError, FormatError, ...)
        raise BadRequest(f"body is not valid msgpack ({type(exc).__name__}); send a msgpack "
                         f"map, Content-Type {p.MSGPACK_TYPE}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"body must be a msgpack map, got {type(doc).__name__}")
    return doc


async def _read_doc(request: web.Request, state: NodeState) -> dict[str, Any] | web.Response:
    """The msgpack map a batch request carries, or the 413 answer to a body over the limit."""
    raw = await read_raw(request, state)
    return raw if isinstance(raw, web.Response) else decode_doc(raw)


def _list(doc: dict[str, Any], name: str) -> list[Any]:
    items = doc.get(name)
    if not isinstance(items, list):
        raise BadRequest(f"{name!r} must be an array")
    if len(items) > p.BATCH_MAX_KEYS:
        raise BadRequest(f"at most {p.BATCH_MAX_KEYS} keys per batch request, got {len(items)}")
    return items


def keys_of(doc: dict[str, Any]) -> list[str]:
    """Every key of ``{"keys": [...]}``, checked (InvalidKeyError: 400, nothing done)."""
    return [check_key(key) for key in _list(doc, "keys")]


def rows_of(doc: dict[str, Any]) -> list[tuple[str, int, codec.Payload]]:
    """Every (key, tag, payload) of ``{"items": [[key, type, payload], ...]}``, checked."""
    rows = []
    for i, item in enumerate(_list(doc, "items")):
        if not isinstance(item, list) or len(item) != 3:
            raise BadRequest(f"items[{i}] must be [key, type, payload]")
        key, name, body = item
        check_key(key)
        tag = p.TYPE_TAGS.get(name) if isinstance(name, str) else None
        if tag is None:
            raise BadRequest(f"items[{i}]: type must be one of {sorted(p.TYPE_TAGS)}, "
                             f"got {str(name)[:40]!r}")
        if not isinstance(body, bytes):
            raise BadRequest(f"items[{i}]: payload must be msgpack bin (bytes), "
                             f"got {type(body).__name__}")
        try:
            rows.append((key, tag, p.body_to_payload(tag, body)))
        except ValueError as exc:
            raise BadRequest(f"items[{i}]: payload is not a valid {name} value: {exc}") from None
    return rows


def ttl_of_doc(doc: dict[str, Any]) -> float | None:
    ttl = doc.get("ttl")
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise BadRequest(f"ttl must be a finite number of seconds or nil, got {ttl!r:.40}")
    return float(ttl)


def _get_rows(store: Store, keys: list[str]) -> dict[str, tuple[int, Any, float | None]]:
    found = {}
    for key in keys:
        row = store.get(key)
        if row is not None:
            found[key] = row
    return found


def _forget(state: NodeState, keys: list[str]) -> None:
    for key in keys:
        state.forget(key)


def _not_found() -> web.Response:
    return error(404, "not_found", "no live value under this key")


async def get_many(request: web.Request, state: NodeState) -> web.StreamResponse:
    doc = await _read_doc(request, state)
    if isinstance(doc, web.Response):
        return doc
    keys = keys_of(doc)
    rows = await store_call(state, _get_rows, state.store, keys)
    state.hits += len(rows)
    state.misses += len(keys) - len(rows)
    values = {key: [p.TYPE_NAMES[tag], p.payload_to_body(tag, payload)]
              for key, (tag, payload, _) in rows.items()}
    return web.Response(body=msgpack.packb({"values": values}, use_bin_type=True),
                        content_type=p.MSGPACK_TYPE)


async def set_many(request: web.Request, state: NodeState) -> web.StreamResponse:
    doc = await _read_doc(request, state)
    if isinstance(doc, web.Response):
        return doc
    rows = rows_of(doc)
    ttl = ttl_of_doc(doc)
    if ttl is not None and ttl <= 0:  # as Cache.set_many: a ttl <= 0 removes the keys
        _, written = await versioned_call(state, state.store.delete_many,
                                          [row[0] for row in rows])
        _forget(state, [row[0] for row in rows])
        return ok({"stored": 0, "expires_at": None}, written)
    expire_at = None if ttl is None else state.store.clock() + ttl
    _, written = await versioned_call(
        state, state.store.set_many, [(key, tag, payload, expire_at) for key, tag, payload in rows])
    _forget(state, [row[0] for row in rows])
    return ok({"stored": len(rows), "expires_at": expire_at},
              {**expires_headers(expire_at), **written})


async def delete_many(request: web.Request, state: NodeState) -> web.StreamResponse:
    doc = await _read_doc(request, state)
    if isinstance(doc, web.Response):
        return doc
    keys = keys_of(doc)
    deleted, written = await versioned_call(state, state.store.delete_many, keys)
    _forget(state, keys)
    return ok({"deleted": deleted}, written)


async def pull_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    key = check_key(request.match_info["key"])
    row, written = await versioned_call(state, state.store.pull, key)
    state.forget(key)
    if row is None:  # a pull of an expired row still deletes it (then: its version)
        resp = _not_found()
        resp.headers.update(written)
        return resp
    return row_answer(row[0], row[1], row[2], written)


async def ttl_value(request: web.Request, state: NodeState) -> web.StreamResponse:
    row = await store_call(state, state.store.get, check_key(request.match_info["key"]))
    if row is None:
        return _not_found()
    expire_at = row[2]
    left = None if expire_at is None else max(0.0, expire_at - state.store.clock())
    return ok({"ttl": left, "expires_at": expire_at})


KEY = "{key:[\\s\\S]+}"

ROUTES: list[tuple[str, str, StateHandler, str]] = [
    ("POST", "/many/get", get_many, "get_many"),
    ("POST", "/many/set", set_many, "set_many"),
    ("POST", "/many/delete", delete_many, "delete_many"),
    ("POST", "/pull/" + KEY, pull_value, "pull"),
    ("GET", "/ttl/" + KEY, ttl_value, "ttl"),
]
"""(method, path, handler, operation name), as the node's route table lists its routes."""
