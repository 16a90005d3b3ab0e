"""The route table and the aiohttp application built from it.

Why two router specialisations live here:

- ``_KeyResource`` matches ``/cache/{key}`` and the other key routes by prefix, without the
  regular expression aiohttp would run for ``{key:[\\s\\S]+}`` on every request: the key
  routes are the hot ones, and the match is the same (the non-empty rest of the path).
- ``_Unrouted`` is the router's last resource: it takes every path no route takes, so that
  unmatched paths and methods get the node's JSON error (through the guard) instead of
  aiohttp's HTML page.

To add routes, append ``(method, path, handler, operation name)`` tuples to ``ROUTES`` (a
path ending in ``KEY_PATTERN`` gets a ``_KeyResource``); each route's operation must also
be in ``openapi.py`` (a test checks it).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import batch, forward_routes, replica_routes
from . import handlers as h
from . import protocol as p
from .guard import StateHandler, guarded
from .state import STATE, NodeState

KEY_PATTERN = "{key:[\\s\\S]+}"
KEY = "/" + KEY_PATTERN

Route = tuple[str, str, StateHandler, str]

ROUTES: list[Route] = [
    ("GET", "/cache" + KEY, h.get_value, "get"),
    ("POST", "/cache" + KEY, h.set_value, "set"),
    ("DELETE", "/cache" + KEY, h.delete_value, "delete"),
    ("DELETE", "/cache", h.clear_values, "clear"),
    ("POST", "/add" + KEY, h.add_value, "add"),
    ("POST", "/touch" + KEY, h.touch_value, "touch"),
    ("POST", "/incr" + KEY, h.incr_value, "incr"),
    ("GET", "/lock" + KEY, h.lock_status, "lock_status"),
    ("POST", "/lock" + KEY, h.acquire_lock, "lock"),
    ("DELETE", "/lock" + KEY, h.release_lock, "unlock"),
    ("GET", "/ping", h.ping, "ping"),
    ("GET", "/metrics", h.metrics, "metrics"),
    ("GET", "/openapi.json", h.openapi, "openapi"),
    *batch.ROUTES,
    *replica_routes.ROUTES,
]


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


async def _no_route(request: web.Request, state: NodeState) -> web.StreamResponse:
    raise web.HTTPNotFound()


def _no_method(allowed: set[str]) -> StateHandler:
    async def no_method(request: web.Request, state: NodeState) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    return no_method


def build_app(state: NodeState) -> web.Application:
    """The aiohttp application serving ``ROUTES`` under ``/api/hypercacheio``."""
    # The body limit leaves room above the value limit so that guard answers 413 itself.
    app = web.Application(client_max_size=state.options.max_value_bytes + 1024)
    app[STATE] = state
    resources: dict[str, tuple[web.Resource, set[str]]] = {}
    forwarded = forward_routes.install(app, state)  # a secondary's writes: to its primary
    for method, path, handler, name in ROUTES:
        if path not in resources:
            resource: web.Resource
            if path.endswith(KEY):
                resource = _KeyResource(p.PREFIX + path[:-len(KEY_PATTERN)])
                app.router.register_resource(resource)
            else:
                resource = app.router.add_resource(p.PREFIX + path)
            resources[path] = (resource, set())
        resource, methods = resources[path]
        handler = forwarded.get(name, handler)
        if name in replica_routes.WRITE_OPS:  # HYPERCACHEIO_ASYNC=false waits there
            handler = replica_routes.synced(handler)
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
