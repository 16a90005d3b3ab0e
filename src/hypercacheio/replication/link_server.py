"""The inbound side of active-active replication: the replication port.

:class:`LinkServer` accepts peers, refuses any that fail the handshake, hands each
authenticated frame to ``on_frame(peer_id, frame)`` and answers: a BATCH with an ACK carrying
what ``on_frame`` returned (the application's position), a SNAPSHOT_REQUEST by streaming the
(async) iterable ``on_frame`` returned as SNAPSHOT_CHUNK frames. Each connection runs on a
:class:`~.link.Channel` (heartbeats, liveness), as the outbound :class:`~.link.PeerLink` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any

from ..errors import HandshakeError
from .link import Channel, LinkOptions, OnFrame, log
from .wire import Frame, FrameStream, FrameType, Identity, TlsFiles, WireCounters, handshake

REFUSAL_LOG_INTERVAL = 60.0  # seconds between two logged refusals of one host


class LinkServer:
    """The replication port: accepts peers, authenticates them, serves their frames."""

    def __init__(self, identity: Identity, on_frame: OnFrame, *, host: str = "127.0.0.1",
                 port: int = 0, tls: TlsFiles | None = None, options: LinkOptions | None = None,
                 counters: WireCounters | None = None) -> None:
        self.identity = identity
        self.on_frame = on_frame
        self.host, self._port = host, port
        self.tls = tls
        self.options = options or LinkOptions()
        self.counters = counters if counters is not None else WireCounters()
        self.channels: dict[str, Channel] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ssl: ssl.SSLContext | None = None
        self._warned: dict[str, float] = {}  # host -> when we last logged a refusal

    @property
    def port(self) -> int:
        if self._listener is None:
            return self._port
        return int(self._listener.getsockname()[1])

    async def start(self) -> None:
        """Listen. Connections are accepted here and handed to the event loop only then
        (``connect_accepted_socket``), so that a refused TLS handshake reaches our code, to
        be logged and counted, on every event loop (asyncio's ``start_server(ssl=...)``
        drops it silently)."""
        self._ssl = self.tls.server_context() if self.tls else None
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self._port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        listener = socket.create_server(address[:2], family=family, backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = loop.create_task(self._accept_loop(listener))

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for channel in list(self.channels.values()):
            channel.close("server stopped")
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, ...: do not spin
                log.warning("replication: accepting on port %d failed: %s", self.port, exc)
                await asyncio.sleep(0.5)
                continue
            task = loop.create_task(self._accept(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _accept(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            peer = conn.getpeername()
        except OSError:
            conn.close()
            return
        label = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        extra: dict[str, Any] = {}
        if self._ssl is not None:
            extra = {"ssl": self._ssl, "ssl_handshake_timeout": self.options.handshake_timeout}
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn, **extra)
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            self.counters.handshakes_refused += 1
            if self._ssl is not None:
                self.counters.tls_failures += 1
            self._refused(peer, label, f"TLS handshake failed ({exc})" if self._ssl
                          else f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._serve(FrameStream(reader, writer, max_frame=self.options.max_frame,
                                          counters=self.counters, label=label))
        except asyncio.CancelledError:
            transport.abort()

    def _refused(self, peer: Any, label: str, reason: str) -> None:
        """Log a refusal at WARNING, at most once per ``REFUSAL_LOG_INTERVAL`` per host
        (the rest at DEBUG; ``handshakes_refused`` counts them all)."""
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        now = time.monotonic()
        last = self._warned.get(host)
        quiet = last is not None and now - last < REFUSAL_LOG_INTERVAL
        if not quiet:
            if len(self._warned) > 1024:
                self._warned.clear()
            self._warned[host] = now
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "replication: refused a connection from %s: %s", label, reason)

    async def _serve(self, stream: FrameStream) -> None:
        try:
            peer_id = await handshake(stream, self.identity, initiator=False,
                                      timeout=self.options.handshake_timeout)
        except HandshakeError as exc:
            self.counters.handshakes_refused += 1
            self._refused(stream.writer.get_extra_info("peername"), stream.label, str(exc))
            await stream.close()  # graceful: the peer reads our proof, then learns its own
            return
        self.counters.handshakes_ok += 1
        old = self.channels.get(peer_id)
        if old is not None:
            old.close("replaced by a newer connection from the same node")
        channel = Channel(stream, peer_id, self.options, self._dispatch)
        self.channels[peer_id] = channel
        log.info("replication: peer %s connected from %s", peer_id, stream.label)
        try:
            reason = await channel.run()
        finally:
            if self.channels.get(peer_id) is channel:
                del self.channels[peer_id]
        log.info("replication: peer %s (%s) disconnected: %s", peer_id, stream.label, reason)

    async def _dispatch(self, channel: Channel, frame: Frame) -> None:
        result = await self.on_frame(channel.peer_id, frame)
        if frame.type is FrameType.BATCH:
            channel.stream.write_frame(FrameType.ACK, {"seq": frame["seq"], "pos": result})
            await channel.stream.wait_writable()
        elif frame.type is FrameType.SNAPSHOT_REQUEST:
            channel.spawn(self._stream_snapshot(channel, frame["id"], result))

    async def _stream_snapshot(self, channel: Channel, sid: int, chunks: Any) -> None:
        stream = channel.stream
        try:
            if isinstance(chunks, AsyncIterable):
                async for data in chunks:
                    stream.write_frame(FrameType.SNAPSHOT_CHUNK,
                                       {"id": sid, "done": False, "data": data})
                    await stream.drain()
            elif isinstance(chunks, Iterable):
                for data in chunks:
                    stream.write_frame(FrameType.SNAPSHOT_CHUNK,
                                       {"id": sid, "done": False, "data": data})
                    await stream.drain()
            stream.write_frame(FrameType.SNAPSHOT_CHUNK, {"id": sid, "done": True})
        except (OSError, asyncio.IncompleteReadError):
            return
        except Exception as exc:
            log.exception("replication: producing snapshot %d for %s failed", sid,
                          channel.peer_id)
            with contextlib.suppress(Exception):
                stream.write_frame(FrameType.SNAPSHOT_CHUNK,
                                   {"id": sid, "done": True, "error": type(exc).__name__})
        with contextlib.suppress(OSError):
            await stream.drain()


__all__ = ["LinkServer"]
