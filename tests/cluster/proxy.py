"""An asyncio TCP fault proxy per link, controlled from the test's thread.

Every proxy of a cluster runs on one event loop in a background thread (``ProxyHub``). Each
direction of a link (``c2s``: from the connecting side to the listening node, ``s2c``: the
answers) is in one of these modes, changed at any moment:

- ``pass``: bytes go through;
- ``delay``: each chunk goes through ``delay`` seconds after it was read (order kept);
- ``drop``: bytes are read and thrown away (the connection stays open: a request that
  arrived but whose answer never comes is the classic *unknown outcome*).

``blackhole()`` drops both directions (new connections are accepted and never answered);
``cut()`` aborts every open connection and refuses new ones until ``heal()``; ``heal()``
passes again and aborts the connections that were dropping (their byte streams lost bytes,
so neither side may read them again).

``intercept``: an optional function of one HTTP request (head, body) that returns a whole
HTTP response to answer in the node's place (the request is then not forwarded), or None to
forward it; ``rewrite``: an optional function (head, body) -> body applied to each forwarded
request (its Content-Length is fixed). Tests use them to inject defects without any hook in
the production code.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Intercept = Callable[[bytes, bytes], "bytes | None"]
Rewrite = Callable[[bytes, bytes], bytes]

PASS, DELAY, DROP = "pass", "delay", "drop"


@dataclass
class Direction:
    mode: str = PASS
    delay: float = 0.0


@dataclass
class Proxy:
    """One link: listens on ``port`` (127.0.0.1) and connects to ``target_port``."""

    name: str
    target_port: int
    hub: ProxyHub
    port: int = 0
    c2s: Direction = field(default_factory=Direction)
    s2c: Direction = field(default_factory=Direction)
    refusing: bool = False
    intercept: Intercept | None = None
    rewrite: Rewrite | None = None
    connections: int = 0
    intercepted: int = 0
    _open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    _server: asyncio.AbstractServer | None = None

    # ---- control (any thread) -----------------------------------------------------------

    def set(self, c2s: str | None = None, s2c: str | None = None, delay: float = 0.0) -> None:
        """Put one or both directions in a mode (``delay`` seconds for ``delay``)."""
        def apply() -> None:
            if c2s is not None:
                self.c2s = Direction(c2s, delay)
            if s2c is not None:
                self.s2c = Direction(s2c, delay)
        self.hub.call(apply)

    def filter(self, intercept: Intercept | None = None,
               rewrite: Rewrite | None = None) -> None:
        """Set ``intercept`` and ``rewrite`` (see the module's notes); open connections are
        aborted so that every request from now on goes through them."""
        def apply() -> None:
            self.intercept, self.rewrite = intercept, rewrite
            self._abort_all()
        self.hub.call(apply)

    def slow(self, delay: float) -> None:
        self.set(DELAY, DELAY, delay)

    def blackhole(self) -> None:
        self.set(DROP, DROP)

    def cut(self) -> None:
        def apply() -> None:
            self.refusing = True
            self._abort_all()
        self.hub.call(apply)

    def heal(self) -> None:
        def apply() -> None:
            dirty = self.refusing or DROP in (self.c2s.mode, self.s2c.mode)
            self.c2s, self.s2c, self.refusing = Direction(), Direction(), False
            if dirty:
                self._abort_all()
        self.hub.call(apply)

    @property
    def faulty(self) -> bool:
        return self.refusing or self.c2s.mode != PASS or self.s2c.mode != PASS

    # ---- the loop's side ----------------------------------------------------------------

    def _abort_all(self) -> None:
        for client, upstream in list(self._open):
            for writer in (client, upstream):
                writer.transport.abort()
        self._open.clear()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port or 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._abort_all()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._open.add(pair)
        http = self.intercept is not None or self.rewrite is not None
        c2s = (self._pump_http(reader, up_writer, writer) if http
               else self._pump(reader, up_writer, "c2s"))
        tasks = [asyncio.ensure_future(c2s),
                 asyncio.ensure_future(self._pump(up_reader, writer, "s2c"))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._open.discard(pair)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _send(self, data: bytes, out: asyncio.StreamWriter, side: str) -> None:
        direction: Direction = getattr(self, side)
        if direction.mode == DROP:
            return
        if direction.mode == DELAY and direction.delay > 0:
            await asyncio.sleep(direction.delay)
            if getattr(self, side).mode == DROP:
                return
        out.write(data)
        await out.drain()

    async def _pump(self, src: asyncio.StreamReader, out: asyncio.StreamWriter,
                    side: str) -> None:
        while True:
            data = await src.read(65536)
            if not data:
                return
            await self._send(data, out, side)

    async def _pump_http(self, src: asyncio.StreamReader, out: asyncio.StreamWriter,
                         client: asyncio.StreamWriter) -> None:
        """c2s with ``intercept`` or ``rewrite``: whole requests (Content-Length bodies), one
        at a time."""
        while True:
            try:
                head = await src.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            try:
                body = await src.readexactly(length) if length else b""
            except asyncio.IncompleteReadError:
                return
            answer = self.intercept(head, body) if self.intercept is not None else None
            if answer is not None:
                self.intercepted += 1
                client.write(answer)
                await client.drain()
                continue
            if self.rewrite is not None:
                new_body = self.rewrite(head, body)
                if new_body != body:
                    self.intercepted += 1
                    lines = [line for line in head.split(b"\r\n") if line and not
                             line.lower().startswith(b"content-length:")]
                    lines.append(b"Content-Length: %d" % len(new_body))
                    head, body = b"\r\n".join(lines) + b"\r\n\r\n", new_body
            await self._send(head + body, out, "c2s")


class ProxyHub:
    """The event loop (in a daemon thread) that runs every proxy of one cluster."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: dict[str, Proxy] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault-proxies",
                                        daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop and wait for it."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def proxy(self, name: str, target_port: int) -> Proxy:
        proxy = Proxy(name, target_port, self)
        asyncio.run_coroutine_threadsafe(proxy._start(), self.loop).result(10)
        self.proxies[name] = proxy
        return proxy

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def close(self) -> None:
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(proxy._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
