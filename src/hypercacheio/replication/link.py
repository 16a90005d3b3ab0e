"""Peer links of active-active replication, over the binary transport of ``wire``.

- :class:`PeerLink` is the outbound side: it connects to one peer, runs the handshake,
  reconnects with capped exponential backoff and jitter, ships batches (:meth:`send`,
  acknowledged through ``on_ack(seq, pos)``), and asks for snapshots
  (:meth:`request_snapshot`, an async iterator of the chunks the peer streams back).
- :class:`~.link_server.LinkServer` (``link_server.py``) is the inbound side; it serves each
  peer over the same :class:`Channel`.
- Both sides ping every ``heartbeat_interval`` and declare a peer down (closing the
  connection) after ``liveness_timeout`` without any frame from it.

Delivery is per connection: batch sequence numbers start at 1 on each connection and the
batches in flight when a connection drops are neither resent nor acknowledged. The user of
a link resumes from the last position it had acknowledged (``on_up`` says when to).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..errors import HandshakeError, MalformedFrame, NodeUnavailable, ReplicationError
from .wire import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_TIMEOUT,
    Frame,
    FrameStream,
    FrameType,
    Identity,
    TlsFiles,
    WireCounters,
    handshake,
)

log = logging.getLogger("hypercacheio.replication")

OnFrame = Callable[[str, Frame], Awaitable[Any]]
OnAck = Callable[[int, Any], None]
OnUp = Callable[[str], None]
OnDown = Callable[[str, str], None]
Sleep = Callable[[float], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class LinkOptions:
    """Limits and periods of a link or server (seconds, bytes)."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    connect_timeout: float = 3.0
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 5.0
    max_frame: int = DEFAULT_MAX_FRAME


@dataclasses.dataclass
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): ``base * factor**n`` capped at
    ``cap``, then scaled by a random factor in [0.5, 1] so peers do not retry in step."""

    base: float = 0.05
    cap: float = 5.0
    factor: float = 2.0
    rng: random.Random = dataclasses.field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.base * self.factor ** min(attempt, 64))
        return ceiling * self.rng.uniform(0.5, 1.0)


class Channel:
    """One authenticated connection, on either side: reads frames, answers pings, watches
    liveness, and hands every other frame to ``dispatch``."""

    def __init__(self, stream: FrameStream, peer_id: str, options: LinkOptions,
                 dispatch: Callable[[Channel, Frame], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.peer_id = peer_id
        self.options = options
        self._dispatch = dispatch
        self._clock = clock
        self.last_contact = clock()
        self.tasks: set[asyncio.Task[None]] = set()
        self._reason = ""

    def close(self, reason: str) -> None:
        """Close at once; :meth:`run` returns ``reason``."""
        if not self._reason:
            self._reason = reason
        self.stream.abort()

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> str:
        """Serve the connection until it closes; why it closed."""
        beat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                frame = await self.stream.read_frame()
                self.last_contact = self._clock()
                if frame.type is FrameType.PING:
                    self.stream.write_frame(FrameType.PONG, {"n": frame["n"]})
                elif frame.type is FrameType.PONG:
                    pass
                elif frame.type in (FrameType.HELLO, FrameType.AUTH):
                    raise MalformedFrame(f"{frame.type.name} frame after the handshake")
                else:
                    await self._dispatch(self, frame)
        except MalformedFrame as exc:
            self._reason = self._reason or f"closed: {exc}"
            log.warning("replication: closing the connection with %s (%s): %s",
                        self.peer_id, self.stream.label, exc)
        except (asyncio.IncompleteReadError, OSError):
            self._reason = self._reason or "connection closed"
        except Exception as exc:  # the application's callback failed: drop, peer resends
            self._reason = self._reason or f"frame handler failed: {type(exc).__name__}"
            log.exception("replication: handling a frame from %s failed; closing the "
                          "connection (the peer resumes from its last acknowledged "
                          "position)", self.peer_id)
        finally:
            beat.cancel()
            for task in list(self.tasks):
                task.cancel()
            self.stream.abort()
        return self._reason

    async def _heartbeat(self) -> None:
        count = 0
        while True:
            await asyncio.sleep(self.options.heartbeat_interval)
            silent = self._clock() - self.last_contact
            if silent > self.options.liveness_timeout:
                self.stream.counters.peers_declared_down += 1
                log.warning("replication: peer %s (%s) silent for %.1fs (liveness timeout "
                            "%gs): declared down", self.peer_id, self.stream.label, silent,
                            self.options.liveness_timeout)
                self.close(f"peer silent for {silent:.1f}s")
                return
            count += 1
            self.stream.write_frame(FrameType.PING, {"n": count})


@dataclasses.dataclass
class _Session:
    channel: Channel
    next_seq: int = 1
    next_snapshot: int = 1
    in_flight: dict[int, float] = dataclasses.field(default_factory=dict)
    window: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    snapshots: dict[int, asyncio.Queue[Frame | None]] = dataclasses.field(
        default_factory=dict)


class PeerLink:
    """The outbound link to one peer (see the module docstring)."""

    def __init__(self, host: str, port: int, identity: Identity, *,
                 tls: TlsFiles | None = None, options: LinkOptions | None = None,
                 backoff: Backoff | None = None, on_ack: OnAck | None = None,
                 on_up: OnUp | None = None, on_down: OnDown | None = None,
                 on_frame: OnFrame | None = None, max_in_flight: int = 64,
                 expect_peer: str | None = None, sleep: Sleep = asyncio.sleep,
                 counters: WireCounters | None = None) -> None:
        self.host, self.port = host, port
        self.identity = identity
        self.options = options or LinkOptions()
        self.backoff = backoff or Backoff()
        self.on_ack, self.on_up, self.on_down, self.on_frame = on_ack, on_up, on_down, on_frame
        self.max_in_flight = max_in_flight
        self.expect_peer = expect_peer
        self.counters = counters if counters is not None else WireCounters()
        self._ssl = tls.client_context() if tls else None
        self._sleep = sleep
        self._session: _Session | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error = ""
        self.last_ack_rtt: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def peer_id(self) -> str | None:
        return self._session.channel.peer_id if self._session else None

    @property
    def in_flight(self) -> int:
        return len(self._session.in_flight) if self._session else 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_up(self, timeout: float) -> str:
        """Wait until connected and authenticated; the peer's node id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await asyncio.wait_for(self._up.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise NodeUnavailable(f"replication peer {self.address} not connected within "
                                      f"{timeout:g}s (last error: {self.last_error or 'none'})"
                                      ) from None
            session = self._session
            if session is not None:  # else it went down again before we woke up
                return session.channel.peer_id

    async def send(self, records: list[Any]) -> int:
        """Ship one batch; its sequence number on this connection (``on_ack`` gets it).

        Waits while ``max_in_flight`` batches are unacknowledged or the socket's buffer is
        full. Raises :class:`NodeUnavailable` when the peer is not connected.
        """
        while True:
            session = self._session
            if session is None:
                raise NodeUnavailable(f"replication peer {self.address} is not connected")
            if len(session.in_flight) < self.max_in_flight:
                break
            session.window.clear()
            await session.window.wait()
        seq = session.next_seq
        session.channel.stream.write_frame(FrameType.BATCH, {"seq": seq, "records": records})
        session.next_seq += 1
        session.in_flight[seq] = time.monotonic()
        try:
            await session.channel.stream.wait_writable()
        except OSError:
            raise NodeUnavailable(f"replication peer {self.address} went away") from None
        return seq

    async def request_snapshot(self, request: Any = None) -> AsyncIterator[Any]:
        """Ask the peer for a snapshot; yields the ``data`` of each chunk it streams."""
        session = self._session
        if session is None:
            raise NodeUnavailable(f"replication peer {self.address} is not connected")
        sid = session.next_snapshot
        session.next_snapshot += 1
        queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        session.snapshots[sid] = queue
        session.channel.stream.write_frame(FrameType.SNAPSHOT_REQUEST,
                                           {"id": sid, "req": request})
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    raise NodeUnavailable(f"replication peer {self.address} went away "
                                          f"during snapshot {sid}")
                if chunk.get("error"):
                    raise ReplicationError(f"peer {self.address} failed to produce the "
                                           f"snapshot ({chunk['error']}): see its log")
                if chunk["done"]:
                    return
                yield chunk.get("data")
        finally:
            session.snapshots.pop(sid, None)

    async def _connect(self) -> _Session:
        extra: dict[str, Any] = {}
        if self._ssl is not None:
            extra["ssl_handshake_timeout"] = self.options.handshake_timeout
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self._ssl, **extra),
            self.options.connect_timeout + (self.options.handshake_timeout if self._ssl else 0))
        stream = FrameStream(reader, writer, max_frame=self.options.max_frame,
                             counters=self.counters, label=self.address)
        try:
            peer_id = await handshake(stream, self.identity, initiator=True,
                                      timeout=self.options.handshake_timeout)
            if self.expect_peer is not None and peer_id != self.expect_peer:
                raise HandshakeError(f"{self.address} is node {peer_id!r}, expected "
                                     f"{self.expect_peer!r} (check HYPERCACHEIO_PEER_ADDRS)")
        except BaseException:
            stream.abort()
            raise
        return _Session(Channel(stream, peer_id, self.options, self._dispatch))

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                session = await self._connect()
            except HandshakeError as exc:
                self.counters.handshakes_refused += 1
                self._failed(str(exc))
            except (OSError, asyncio.TimeoutError) as exc:
                if isinstance(exc, ssl.SSLError):
                    self.counters.tls_failures += 1
                self._failed(f"{type(exc).__name__}: {exc}")
            else:
                attempt = 0
                await self._serve(session)
                self.counters.reconnects += 1
            await self._sleep(self.backoff.delay(attempt))
            attempt += 1

    def _failed(self, error: str) -> None:
        """Log a failed attempt: at WARNING when the reason changes, then quietly."""
        level = logging.DEBUG if error == self.last_error else logging.WARNING
        log.log(level, "replication: cannot link to peer %s: %s", self.address, error)
        self.last_error = error

    def _notify(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("replication: the %s callback of the link to %s failed",
                          getattr(callback, "__name__", "link"), self.address)

    async def _serve(self, session: _Session) -> None:
        peer_id = session.channel.peer_id
        self.counters.handshakes_ok += 1
        self._session = session
        self.last_error = ""
        self._up.set()
        log.info("replication: connected to peer %s at %s", peer_id, self.address)
        self._notify(self.on_up, peer_id)
        try:
            reason = await session.channel.run()
        finally:
            self._session = None
            self._up.clear()
            session.window.set()
            for queue in session.snapshots.values():
                queue.put_nowait(None)
        self.last_error = reason
        log.info("replication: link to peer %s at %s down: %s", peer_id, self.address, reason)
        self._notify(self.on_down, peer_id, reason)

    def status(self) -> dict[str, Any]:
        """The link's state for ``/metrics`` and ``stats``."""
        session = self._session
        return {
            "address": self.address,
            "connected": session is not None,
            "peer_id": session.channel.peer_id if session else None,
            "in_flight": len(session.in_flight) if session else 0,
            "last_contact_age": (time.monotonic() - session.channel.last_contact
                                 if session else None),
            "last_ack_rtt": self.last_ack_rtt,
            "last_error": self.last_error,
            **self.counters.as_dict(),
        }

    async def _dispatch(self, channel: Channel, frame: Frame) -> None:
        session = self._session
        if session is None:
            return
        if frame.type is FrameType.ACK:
            sent = session.in_flight.pop(frame["seq"], None)
            if sent is None:
                raise MalformedFrame(f"ACK for batch {frame['seq']}, which is not in flight")
            self.last_ack_rtt = time.monotonic() - sent
            session.window.set()
            if self.on_ack is not None:
                self.on_ack(frame["seq"], frame.get("pos"))
        elif frame.type is FrameType.SNAPSHOT_CHUNK:
            queue = session.snapshots.get(frame["id"])
            if queue is not None:
                queue.put_nowait(frame)
        elif self.on_frame is not None:
            await self.on_frame(channel.peer_id, frame)
