"""A secondary node's write and lock routes: sent on to the primary, applied here with its
version (the node's side of ``hypercacheio.replication.forward``).

On a node whose role is ``secondary`` (``HYPERCACHEIO_SERVER_ROLE``), ``install`` gives the
route table a handler for every write route (set, add, delete, clear, touch, incr,
many/set, many/delete, pull) and every lock route. Each one checks the request as the
node's own handler would (a malformed request gets its 400 here and never reaches the
primary), sends it to ``HYPERCACHEIO_PRIMARY_URL`` over one keep-alive aiohttp session with
the node's token, applies the primary's answer to this node's store at the primary's
version (``Store.apply``: every app's L1 on this host and the node's GET memory see it), and
answers what the primary answered, its version headers included.

The primary unreachable within ``HYPERCACHEIO_TIMEOUT``: 503 ``primary_unavailable`` and
nothing written here (reads go on). The primary refusing this node's token: 502
``primary_refused`` (the client's own token was right). Other refusals (400, 404, 409, 413,
507) pass through as the primary gave them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from .. import codec
from ..replication.records import CLEAR, DELETE, INCR, SET, Record
from . import batch
from . import protocol as p
from .guard import JSON_TYPE, StateHandler, error
from .handlers import key_of, ttl_of, value_of
from .state import NodeState, store_call

log = logging.getLogger("hypercacheio.node.forward")

# The headers of a primary's answer that a client of this node gets too.
ANSWER_HEADERS = (p.TYPE_HEADER, p.EXPIRES_HEADER, p.VERSION_HEADER, p.ORIGIN_HEADER,
                  p.REPLICAS_HEADER)
# The headers of a client's request that the primary needs.
REQUEST_HEADERS = (p.TYPE_HEADER, p.TTL_HEADER, "Content-Type")


class Primary:
    """The connection of a secondary node to its primary's API."""

    def __init__(self, state: NodeState) -> None:
        self.url = URL(state.settings.primary_url)
        self.token = state.token.decode("utf-8")
        self.timeout = aiohttp.ClientTimeout(total=state.settings.timeout)
        self.session: aiohttp.ClientSession | None = None
        self.forwarded = 0
        self.failures = 0

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:  # made in the loop, on first use
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self.session

    async def send(self, request: web.Request, body: bytes | None,
                   extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """The request as the client sent it (path, query, value headers, ``body``), to the
        primary: (status, headers, body). Raises ``_PrimaryFailed`` when it cannot answer."""
        tail = request.rel_url.raw_path[len(p.PREFIX):]  # as sent: %-escapes kept
        query = request.rel_url.raw_query_string
        target = URL(str(self.url).rstrip("/") + tail + ("?" + query if query else ""),
                     encoded=True)
        headers = {name: request.headers[name] for name in REQUEST_HEADERS
                   if name in request.headers}
        headers[p.TOKEN_HEADER] = self.token
        headers.update(extra or {})
        try:
            async with self._session().request(request.method, target, data=body,
                                               headers=headers) as resp:
                answer = await resp.read()
                status, got = resp.status, resp.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.failures += 1
            raise _PrimaryFailed(error(
                503, "primary_unavailable",
                f"the primary node at {self.url} did not answer within "
                f"{self.timeout.total} s (HYPERCACHEIO_TIMEOUT): "
                f"{type(exc).__name__} {exc}; writes need the primary, reads go on")) from exc
        if status == 401:
            self.failures += 1
            raise _PrimaryFailed(error(
                502, "primary_refused", f"the primary node at {self.url} refused this "
                "node's token; give every host the same HYPERCACHEIO_API_TOKEN"))
        if status >= 500 or status == 429:
            self.failures += 1
            raise _PrimaryFailed(error(503, "primary_unavailable",
                                       f"the primary node at {self.url} answered {status}"))
        self.forwarded += 1
        return status, {k: got[k] for k in ANSWER_HEADERS if k in got}, answer

    async def close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()


class _PrimaryFailed(Exception):
    def __init__(self, answer: web.Response) -> None:
        super().__init__(answer.text)
        self.answer = answer


def _version(headers: dict[str, str]) -> tuple[int, str] | None:
    """The version and origin of the primary's answer, or None (it wrote nothing)."""
    try:
        version = int(headers.get(p.VERSION_HEADER) or 0)
    except ValueError:
        return None
    origin = headers.get(p.ORIGIN_HEADER, "")
    return (version, origin) if version > 0 and origin else None


def _expires(headers: dict[str, str]) -> float | None:
    text = headers.get(p.EXPIRES_HEADER)
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _answer(status: int, headers: dict[str, str], body: bytes) -> web.Response:
    resp = web.Response(status=status, body=body, headers=headers)
    if p.TYPE_HEADER not in headers or status != 200:
        resp.content_type = JSON_TYPE
    else:
        resp.content_type = p.CONTENT_TYPES[p.TYPE_TAGS.get(headers[p.TYPE_HEADER],
                                                            codec.TAG_BYTES)].split(";")[0]
    return resp


async def _apply(state: NodeState, headers: dict[str, str],
                 make: Callable[[int, str], list[Record]], keys: list[str]) -> None:
    """The primary's write, in this node's store at its version (nothing if it took none)."""
    version = _version(headers)
    if version is not None:
        records = make(*version)
        if records:
            await store_call(state, state.store.apply, records)
    for key in keys:
        state.forget(key)


def _set(key: str, tag: int, payload: codec.Payload, expire_at: float | None,
         op: str = SET, delta: int | None = None) -> Callable[[int, str], list[Record]]:
    return lambda hlc, node: [Record(0, op, key, tag, payload, expire_at, hlc, node, delta)]


def _deletes(keys: list[str]) -> Callable[[int, str], list[Record]]:
    return lambda hlc, node: [Record(0, DELETE, k, None, None, None, hlc, node) for k in keys]


def _doc(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


# ---- the handlers ------------------------------------------------------------------------------

def handlers(primary: Primary) -> dict[str, StateHandler]:
    """The secondary's handler of each forwarded operation (by route operation name)."""

    async def set_value(request: web.Request, state: NodeState) -> web.StreamResponse:
        key = key_of(request)
        ttl = ttl_of(request)
        tag, payload = await value_of(request, state)
        status, headers, body = await primary.send(request, await request.read())
        if status == 200:
            if ttl is not None and ttl <= 0:
                await _apply(state, headers, _deletes([key]), [key])
            else:
                await _apply(state, headers, _set(key, tag, payload, _expires(headers)), [key])
        return _answer(status, headers, body)

    async def add_value(request: web.Request, state: NodeState) -> web.StreamResponse:
        key = key_of(request)
        tag, payload = await value_of(request, state)
        status, headers, body = await primary.send(request, await request.read())
        if status == 200 and _doc(body).get("added"):
            await _apply(state, headers, _set(key, tag, payload, _expires(headers)), [key])
        return _answer(status, headers, body)

    async def delete_value(request: web.Request, state: NodeState) -> web.StreamResponse:
        key = key_of(request)
        status, headers, body = await primary.send(request, None)
        if status == 200:
            await _apply(state, headers, _deletes([key]), [key])
        return _answer(status, headers, body)

    async def clear_values(request: web.Request, state: NodeState) -> web.StreamResponse:
        status, headers, body = await primary.send(request, None)
        if status == 200:
            await _apply(state, headers, lambda hlc, node: [
                Record(0, CLEAR, None, None, None, None, hlc, node)], [])
            if state.l1 is not None:
                state.l1.clear()
        return _answer(status, headers, body)

    async def touch_value(request: web.Request, state: NodeState) -> web.StreamResponse:
        key = key_of(request)
        ttl = ttl_of(request)
        if ttl is not None and ttl <= 0:  # the primary deletes the key
            status, headers, body = await primary.send(request, None)
            if status == 200:
                await _apply(state, headers, _deletes([key]), [key])
            return _answer(status, headers, body)
        # Always the whole touched row (a touch alone could land on an older copy here).
        status, headers, body = await primary.send(request, None, {p.RETURN_HEADER: "row"})
        touched = status == 200
        if touched:
            tag = p.TYPE_TAGS.get(headers.get(p.TYPE_HEADER, "bytes"), codec.TAG_BYTES)
            try:
                payload = p.body_to_payload(tag, body)
            except ValueError:
                return error(502, "primary_answer", "the primary sent an unreadable value")
            await _apply(state, headers, _set(key, tag, payload, _expires(headers)), [key])
        if request.headers.get(p.RETURN_HEADER, "").strip().lower() == "row" or (
                status not in (200, 404)):
            return _answer(status, headers, body)
        expire_at = _expires(headers) if touched else None
        return web.json_response({"touched": touched, "expires_at": expire_at},
                                 headers={k: v for k, v in headers.items()
                                          if k != p.TYPE_HEADER})

    async def incr_value(request: web.Request, state: NodeState) -> web.StreamResponse:
        key = key_of(request)
        status, headers, body = await primary.send(request, None)
        doc = _doc(body)
        value = doc.get("value")
        if status == 200 and type(value) is int:
            delta = int(request.query.get("delta", "1"))  # the primary accepted it
            await _apply(state, headers,
                         _set(key, codec.TAG_INT, value, _expires(headers), INCR, delta), [key])
        return _answer(status, headers, body)

    async def set_many(request: web.Request, state: NodeState) -> web.StreamResponse:
        raw = await batch.read_raw(request, state)
        if isinstance(raw, web.Response):
            return raw
        doc = batch.decode_doc(raw)
        rows = batch.rows_of(doc)
        ttl = batch.ttl_of_doc(doc)
        status, headers, body = await primary.send(request, raw)
        if status == 200:
            keys = [row[0] for row in rows]
            if ttl is not None and ttl <= 0:
                await _apply(state, headers, _deletes(keys), keys)
            else:
                expire_at = _expires(headers)
                last = {key: (tag, payload) for key, tag, payload in rows}  # as the store
                await _apply(state, headers, lambda hlc, node: [
                    Record(0, SET, key, tag, payload, expire_at, hlc, node)
                    for key, (tag, payload) in last.items()], keys)
        return _answer(status, headers, body)

    async def delete_many(request: web.Request, state: NodeState) -> web.StreamResponse:
        raw = await batch.read_raw(request, state)
        if isinstance(raw, web.Response):
            return raw
        keys = batch.keys_of(batch.decode_doc(raw))
        status, headers, body = await primary.send(request, raw)
        if status == 200:
            await _apply(state, headers, _deletes(keys), keys)
        return _answer(status, headers, body)

    async def pull_value(request: web.Request, state: NodeState) -> web.StreamResponse:
        key = key_of(request)
        status, headers, body = await primary.send(request, None)
        if status in (200, 404):
            await _apply(state, headers, _deletes([key]), [key])
        return _answer(status, headers, body)

    async def lock_call(request: web.Request, state: NodeState) -> web.StreamResponse:
        key_of(request)  # a bad name is refused here
        status, headers, body = await primary.send(request, None)
        return _answer(status, headers, body)

    def caught(handler: StateHandler) -> StateHandler:
        async def forwarded(request: web.Request, state: NodeState) -> web.StreamResponse:
            try:
                return await handler(request, state)
            except _PrimaryFailed as failed:
                return failed.answer
        return forwarded

    table: dict[str, StateHandler] = {
        "set": set_value, "add": add_value, "delete": delete_value, "clear": clear_values,
        "touch": touch_value, "incr": incr_value, "set_many": set_many,
        "delete_many": delete_many, "pull": pull_value,
        "lock": lock_call, "unlock": lock_call, "lock_status": lock_call,
    }
    return {name: caught(handler) for name, handler in table.items()}


def install(app: web.Application, state: NodeState) -> dict[str, StateHandler]:
    """On a secondary node: the forwarding handlers by operation name (the session closes
    with the app); on any other node: none."""
    if state.settings.role != "secondary":
        return {}
    primary = state.primary = Primary(state)
    app.on_cleanup.append(primary.close)
    log.info("writes and locks go to the primary node at %s", primary.url)
    return handlers(primary)


__all__ = ["ANSWER_HEADERS", "Primary", "handlers", "install"]
