"""The guard every request passes: rate limit, token (constant-time), and one error shape.

``guarded`` wraps each route's handler (and the fallback routes, so that unmatched paths
too) in the same checks, and translates every failure into ``{"error": ..., "code": ...}``
with a 4xx status; a 5xx only when the storage itself fails: 507 ``storage_full`` when its
file system is full, 503 ``storage_unavailable`` otherwise. Both clear by themselves once
the cause is gone (nothing is cached about the failure).

It also counts: each answer per (operation, status) in ``state.requests``, and the time of
each request per operation in a ``Latency`` histogram of fixed buckets (a ``perf_counter``
pair and a ``bisect`` per request), which ``metrics_text.py`` renders for ``/metrics``.
"""

from __future__ import annotations

import hmac
import json
import logging
import sqlite3
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web

from ..errors import InvalidKeyError, StorageError, StorageFullError
from . import protocol as p
from .state import NodeState

log = logging.getLogger("hypercacheio.node.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StateHandler = Callable[[web.Request, NodeState], Awaitable[web.StreamResponse]]

JSON_TYPE = "application/json"
PUBLIC = frozenset({"ping", "openapi", None})  # None: no route matched (404/405)


LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the latency histogram's buckets; one more bucket holds the rest
(Prometheus' ``le="+Inf"``)."""


class Latency:
    """One operation's request times: a count per bucket of ``LATENCY_BOUNDS`` (not
    cumulative; the last one is above every bound) and their sum in seconds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds


_LATENCIES: weakref.WeakKeyDictionary[NodeState, dict[str, Latency]] = (
    weakref.WeakKeyDictionary())


def latencies(state: NodeState) -> dict[str, Latency]:
    """The latency histograms of ``state``'s requests, by operation (``unmatched`` for paths
    and methods no route takes)."""
    found = _LATENCIES.get(state)
    if found is None:
        found = _LATENCIES[state] = {}
    return found


class BadRequest(Exception):
    """A malformed request: becomes 400 with this message."""


def error(status: int, code: str, message: str) -> web.Response:
    """The one shape of every error: ``{"error": message, "code": code}``."""
    return web.Response(status=status, content_type=JSON_TYPE,
                        text=json.dumps({"error": message, "code": code}))


def ok(doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer of 200."""
    return web.Response(content_type=JSON_TYPE, text=json.dumps(doc), headers=headers)


def authorize(state: NodeState, request: web.Request) -> bool | None:
    """True for the right token, False for a wrong one, None when none was sent.

    The token comes in ``X-Hypercacheio-Token`` or as ``Authorization: Bearer``; it is
    compared in constant time.
    """
    given = request.headers.get(p.TOKEN_HEADER)
    if given is None:
        auth = request.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer":
            return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), state.token)


def storage_failure(op: str | None, exc: BaseException) -> web.Response:
    """The answer to a failure of the store: 507 when its disk is full, else 503."""
    if isinstance(exc, StorageFullError):
        log.error("storage full on %s: %s", op, exc)
        return error(507, "storage_full", "the node's storage is full; writes fail until "
                     "space is freed on its file system (reads go on)")
    log.error("storage failure on %s: %s", op, exc)
    return error(503, "storage_unavailable", "the node's storage failed; see its log")


def guarded(state: NodeState, op: str | None, handler: StateHandler) -> Handler:
    """``handler`` behind the guard: rate limit, token, and every failure as a JSON error;
    counts each answer and times it.

    The guard wraps each route's handler rather than being an aiohttp middleware: the same
    checks in the same order, without the middleware machinery's cost on every request.
    """
    public = op in PUBLIC
    label = op or "unmatched"
    limiter = state.limiter
    requests = state.requests
    latency = latencies(state).setdefault(label, Latency())
    buckets = latency.counts

    async def guard(request: web.Request) -> web.StreamResponse:
        began = perf_counter()
        try:
            if limiter is not None and not limiter.allow(request.remote or ""):
                state.rate_limited += 1
                response: web.StreamResponse = error(
                    429, "rate_limited", "too many requests from this address; slow down "
                    f"(limit {state.options.rate_limit:g}/s)")
            else:
                auth = authorize(state, request)
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
            response = storage_failure(op, exc)
        except (ConnectionResetError, web.RequestPayloadError) as exc:
            # The client went away mid-request (mid-body): one line, no traceback. The
            # answer goes nowhere if it is gone; it is right if it only stopped sending.
            log.info("client %s dropped the connection during %s (%s)",
                     request.remote or "?", label, exc or type(exc).__name__)
            response = error(400, "incomplete_request", "the request ended before its body "
                             "did (Content-Length not reached)")
        except Exception:
            log.exception("unexpected failure on %s", op)
            response = error(500, "internal", "unexpected failure; see the node's log")
        key = (label, response.status)
        requests[key] = requests.get(key, 0) + 1
        elapsed = perf_counter() - began
        buckets[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
        latency.total += elapsed
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
