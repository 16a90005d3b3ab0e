"""The node's active-active mesh: every node streams its own writes to every peer.

A node with ``HYPERCACHEIO_HA_ENABLED`` and ``HYPERCACHEIO_PEER_ADDRS`` runs one
:class:`Mesh`, on a thread of its own with its own event loop (a peer's batch waiting on
another process's SQLite lock never stalls the HTTP API, and the other way round):

- **Listening**: a :class:`~.link_server.LinkServer` on ``HYPERCACHEIO_REPL_PORT`` (HMAC
  handshake, optional TLS): peers' batches are applied with ``Store.apply`` (never logged
  again: no echo; the version vector makes a duplicate, replayed or reordered record a
  no-op) and acknowledged with the highest oplog position of the batch.
- **Shipping**: a :class:`~.link.PeerLink` to every configured peer (reconnect with
  backoff). On each connection the sender asks the peer how much of this node's writes it
  holds (its version vector entry for this origin) and streams this node's own oplog records
  (every process's writes: the oplog is in the store) from there, in batches, from the
  oplog position the peer last acknowledged (persisted with ``Store.peer_ack`` as
  ``mesh:<address>``, registered at start before any link, which holds back the oplog and
  tombstones the peer has not seen, even one that has never connected yet). The sender is
  woken by the count of local versions in the store's clock file (``Store.local_stamps``,
  one word of a shared mmap that every local write bumps and a record applied from a peer
  does not, so a node that only receives does not look for writes to ship): polled every
  millisecond, then polled on for a few milliseconds after each change (a write is stamped
  before it commits).
- **Catching up**: a node that starts with an empty store takes a snapshot from the first
  peer it reaches; a sender that finds the records a peer lacks already trimmed from its
  oplog tells the peer to resync, and the peer takes a snapshot from it. A snapshot carries
  the source's version vector, so the streams then resume after it.
- **Anti-entropy**: every ``HYPERCACHEIO_ANTI_ENTROPY_INTERVAL`` seconds (default 60; 0:
  never) and on demand (:meth:`Mesh.anti_entropy`), the node compares bucket digests with each
  peer and pulls the rows of the buckets that differ (``replication/antientropy.py``); the
  peer does the same in its own pass, so both directions repair.
- **Requests**: small questions between nodes (``have``, ``digest``, ``rows``, ``resync`` and
  the quorum's ``grant``/``fence``/``release``/``extend``/``put``) travel as a one-chunk
  snapshot request over the same authenticated link.

Membership is static: every node lists every other one. A node is added by starting it
(empty: it bootstraps) with the full list and adding its address to the others'.

What the mesh shows (``/ping``, ``/metrics``) is in ``observe.py``. The rest stays one module
of about 700 lines because shipping, bootstrap, inbound frames and anti-entropy share one
event loop, one ``PeerState`` per peer and the acknowledged positions, which a split would
pass back and forth between modules.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Settings, parse_host_port
from ..errors import NodeUnavailable, ReplicationError
from ..store.mesh import Digest
from . import observe
from .antientropy import differing
from .frames import decode_batch, decode_snapshot_chunk, encode_batch, encode_snapshot_chunk
from .link import LinkOptions, PeerLink
from .link_server import LinkServer
from .records import Record, SnapshotChunk, SnapshotRow, SnapshotStart
from .wire import Frame, FrameType, Identity, TlsFiles, WireCounters

if TYPE_CHECKING:
    from ..store import Store
    from .quorum import Quorum

log = logging.getLogger("hypercacheio.replication.mesh")

T = TypeVar("T")

POLL_SECONDS = 0.001  # the count of local versions is read this often while idle
GRACE_SECONDS = 0.005  # after a change, the oplog is read again for this long
BATCH_RECORDS = 2000
GATHER_BELOW = 50  # a batch smaller than this: wait a poll before the next (fewer, fuller)
SNAPSHOT_ROWS = 2000
CHECKPOINT_SECONDS = 0.05  # applies are checkpointed this often, off the loop
ACK_PERSIST_SECONDS = 0.05  # an acknowledged position is written at most this often
RESYNC_WAIT_SECONDS = 60.0  # a peer asked to resync is given this long to take its snapshot
AE_PULL_SECONDS = 300.0  # anti-entropy: the rows of the differing buckets arrive within this


def _next_encoded(chunks: Iterator[SnapshotChunk]) -> bytes | None:
    chunk = next(chunks, None)
    return None if chunk is None else encode_snapshot_chunk(chunk)


def _close(chunks: Iterator[SnapshotChunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _peer_key(address: str) -> str:
    """The name of a configured peer's position in the store's ``peers`` table: by its
    address, known before it is first reached (so the oplog and tombstones wait for it
    from the start). A peer recreated at the same address is found out by its version
    vector (``have``), not by this position, which only tells where to start reading."""
    return f"mesh:{address}"


def _hlc_seconds(hlc: int) -> float:
    return (hlc >> 16) / 1000.0


@dataclasses.dataclass
class PeerState:
    """What the mesh knows of one configured peer (``status`` shows it)."""

    address: str
    link: PeerLink
    peer_id: str | None = None
    handshake: str = "connecting"
    acked: int = 0  # our oplog position it acknowledged
    sent: int = 0  # our oplog position shipped to it
    acked_written: int = 0  # the position last persisted
    records_sent: int = 0
    batches_sent: int = 0
    records_received: int = 0
    applied: int = 0
    conflicts: int = 0  # received records that lost to a newer version (or duplicates)
    last_lag_ms: float | None = None
    last_received: float | None = None
    snapshots: int = 0
    want_snapshot: bool = False
    resyncs_asked: int = 0
    anti_entropy_repairs: int = 0
    sender: asyncio.Task[None] | None = None
    rate_mark: tuple[float, int, int, int, int] = (0.0, 0, 0, 0, 0)


class Mesh:
    """The mesh service of one node (see the module docstring)."""

    def __init__(self, store: Store, settings: Settings, token: str, *,
                 listen_host: str | None = None,
                 link_options: LinkOptions | None = None,
                 request_timeout: float | None = None) -> None:
        self.store = store
        self.settings = settings
        self.own = store.node_id
        self.identity = Identity(settings.cluster_id, store.node_id, token)
        self.tls = TlsFiles.from_settings(settings)
        self.listen_host = listen_host or settings.node_listen_host
        self.options = link_options or LinkOptions()
        self.request_timeout = request_timeout or max(settings.timeout, 0.5)
        self.anti_entropy_interval = float(getattr(settings, "anti_entropy_interval", 60.0))
        self.counters = WireCounters()
        self.addresses = [parse_host_port("HYPERCACHEIO_PEER_ADDRS", a)
                          for a in settings.peer_addrs]
        self.peers: list[PeerState] = []
        self.by_id: dict[str, PeerState] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: LinkServer | None = None
        self.quorum: Quorum | None = None
        self.applied_total = 0
        self.conflicts_total = 0
        self._batches: dict[tuple[int, int], tuple[int, list[Record], bytes]] = {}
        self.anti_entropy_passes = 0  # passes finished (with every connected peer)
        self.anti_entropy_running = 0  # passes under way
        self.bootstrapped = False
        self.last_snapshot: tuple[int, float] | None = None  # (rows, seconds) taken here
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._generation = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bootstrap_lock: asyncio.Lock | None = None
        self._needs_bootstrap = False
        # ms from a received write's version (its origin's clock) to its apply here
        self.lag_samples: collections.deque[float] = collections.deque(maxlen=10_000)

    # ---- life cycle (called from any thread) --------------------------------------------

    @property
    def size(self) -> int:
        """The configured nodes: the peers and this one."""
        return len(self.addresses) + 1

    def start(self, timeout: float = 10.0) -> None:
        """Mark the store clustered multi-writer, start the thread, listen; raises if the
        replication port cannot be bound."""
        from .quorum import Quorum

        self.store.mark_clustered(True, multi_writer=True)
        self._needs_bootstrap = self._empty()
        for host, port in self.addresses:  # before any link: the oplog waits for each peer
            key = _peer_key(f"{host}:{port}")
            if self.store.peer_position(key) is None:
                self.store.peer_ack(key, 0)
        self.quorum = Quorum(self)
        self._thread = threading.Thread(target=self._run, name="hypercacheio-mesh", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise NodeUnavailable(f"the replication mesh did not start within {timeout:g}s")
        if self._failure is not None:
            raise self._failure

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the mesh's loop (from another thread or loop)."""
        if self.loop is None:
            coro.close()
            raise NodeUnavailable("the replication mesh is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await, from another event loop, a coroutine run on the mesh's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def _run(self) -> None:
        try:  # uvloop when installed, as the HTTP API's loop: less per wake-up
            import uvloop
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start(); logged otherwise
            if not self._ready.is_set():
                self._failure = exc
            else:
                log.exception("replication mesh stopped on an error")
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._bootstrap_lock = asyncio.Lock()
        self.server = LinkServer(self.identity, self._on_frame, host=self.listen_host,
                                 port=self.settings.repl_port, tls=self.tls,
                                 options=self.options, counters=self.counters)
        await self.server.start()
        for host, port in self.addresses:
            peer = PeerState(f"{host}:{port}", None)  # type: ignore[arg-type]
            peer.link = PeerLink(host, port, self.identity, tls=self.tls, options=self.options,
                                 on_up=self._up_callback(peer),
                                 on_down=self._down_callback(peer),
                                 on_ack=self._ack_callback(peer), counters=WireCounters())
            self.peers.append(peer)
            peer.link.start()
        self._spawn(self._watch_clock())
        self._spawn(self._flush_acks())
        self._spawn(self._checkpoints())
        if self.anti_entropy_interval > 0:
            self._spawn(self._anti_entropy_loop())
        self._ready.set()
        log.info("replication mesh listening on %s:%d, %d peer(s)", self.listen_host,
                 self.server.port, len(self.peers))
        try:
            await self._stop.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for peer in self.peers:
                if peer.sender is not None:
                    peer.sender.cancel()
                await peer.link.stop()
            await self.server.close()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._persist_acks()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _empty(self) -> bool:
        vector = self.store.version_vector()
        return (self.store.stats()["entries"] == 0
                and all(seq == 0 for origin, seq in vector.items() if origin != self.own))

    # ---- waking on writes ---------------------------------------------------------------

    async def _watch_clock(self) -> None:
        """Count a generation whenever a local write takes a version (any process's)
        and wake whoever waits for it."""
        last = self.store.local_stamps()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            now = self.store.local_stamps()
            if now != last:
                last = now
                self._generation += 1
                changed, self._changed = self._changed, asyncio.Event()
                if changed is not None:
                    changed.set()

    async def _wait_for_writes(self, generation: int, timeout: float) -> None:
        """Return once the clock moved after ``generation`` was read (or on timeout)."""
        changed = self._changed
        if self._generation != generation or changed is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    # ---- outbound: links and senders ------------------------------------------------------

    def _up_callback(self, peer: PeerState) -> Any:
        def on_up(peer_id: str) -> None:
            peer.peer_id = peer_id
            peer.handshake = "authenticated"
            self.by_id[peer_id] = peer
            if peer.sender is not None:
                peer.sender.cancel()
            peer.sender = asyncio.ensure_future(self._sender(peer))
        return on_up

    def _down_callback(self, peer: PeerState) -> Any:
        def on_down(peer_id: str, reason: str) -> None:
            peer.handshake = f"down: {reason}"
            if peer.sender is not None:
                peer.sender.cancel()
                peer.sender = None
        return on_down

    def _ack_callback(self, peer: PeerState) -> Any:
        def on_ack(seq: int, pos: Any) -> None:
            if isinstance(pos, int) and pos > peer.acked:
                peer.acked = pos
        return on_ack

    async def _checkpoints(self) -> None:
        """Copy the WAL back into the database on a worker thread, not in the COMMIT of an
        apply: SQLite checkpoints in the commit that takes the WAL past
        ``wal_autocheckpoint`` pages (1,000), which held this loop for up to 10-17 ms at
        10,000 records/s. The loop's own connection no longer checkpoints; this task runs a
        PASSIVE checkpoint (it waits for no reader or writer) after every
        ``CHECKPOINT_SECONDS`` in which records were applied."""
        self.store.defer_checkpoints()  # this thread's: the one applies use
        applied = self.applied_total
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            if self.applied_total == applied:
                continue
            applied = self.applied_total
            try:
                await asyncio.to_thread(self.store.checkpoint, "PASSIVE")
            except Exception as exc:  # the next round tries again
                log.warning("replication: WAL checkpoint failed: %s", exc)

    async def _flush_acks(self) -> None:
        """Persist the acknowledged positions every ``ACK_PERSIST_SECONDS``, on a worker
        thread: the write waits for SQLite's write lock, which a busy writer of the host
        holds often, and SQLite's busy handler sleeps (1, 2, 5, 10 ms ...) while it waits;
        on the mesh's loop that sleep stalled every sender (p99 lag 15-35 ms at 10,000
        writes/s). A position persisted late only means records sent again after a
        restart, which the version vector makes no-ops."""
        while True:
            await asyncio.sleep(ACK_PERSIST_SECONDS)
            await asyncio.to_thread(self._persist_acks)

    def _persist_acks(self) -> None:
        for peer in self.peers:
            acked = peer.acked  # read once: the loop may raise it meanwhile
            if peer.peer_id is None or acked <= 0 or acked <= peer.acked_written:
                continue
            try:
                self.store.peer_ack(_peer_key(peer.address), acked)
                peer.acked_written = acked
            except Exception as exc:  # the next pass tries again
                log.warning("replication: cannot record %s's position: %s",
                            peer.peer_id, exc)

    async def request(self, peer: PeerState, req: dict[str, Any],
                      timeout: float | None = None) -> Any:
        """Ask ``peer`` a question over its link; its answer (one chunk)."""
        async def ask() -> Any:
            answer = None
            async for data in peer.link.request_snapshot(req):
                answer = data
            return answer
        return await asyncio.wait_for(ask(), timeout or self.request_timeout)

    async def _sender(self, peer: PeerState) -> None:
        """Ship this node's own oplog to ``peer`` for as long as the link is up."""
        assert peer.peer_id is not None
        try:
            position = self.store.peer_position(_peer_key(peer.address))
            if position is not None and position.source == self.own:
                peer.acked = max(peer.acked, position.acked)
            if self._needs_bootstrap:
                await self.bootstrap(peer)
            while not await self._ship(peer):
                pass  # the peer was resynced: start again from what it holds now
        except (NodeUnavailable, ConnectionError, asyncio.TimeoutError) as exc:
            log.info("replication: shipping to %s paused: %s", peer.address, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("replication: shipping to %s failed; retrying on reconnect",
                          peer.address)

    async def _ship(self, peer: PeerState) -> bool:
        """Stream to ``peer`` from what it holds of this node's writes; returns False when
        the peer had to be resynced first (then it holds more: start again)."""
        store, own, link = self.store, self.own, peer.link
        answer = await self.request(peer, {"k": "have", "origin": own})
        have = int(answer["seq"])
        pos = peer.acked
        first = True
        while True:
            generation = self._generation
            seen = store.local_stamps()
            batch = self._read_batch(pos, have)
            if batch is not None:
                pos, mine, encoded = batch
                if first and mine and mine[0].origin_seq != have + 1:
                    await self._ask_resync(peer, have, mine[0].origin_seq)
                    return False
                if mine:
                    first = False
                    await link.send([encoded])
                    have = mine[-1].origin_seq
                    peer.sent = pos
                    peer.records_sent += len(mine)
                    peer.batches_sent += 1
                    if len(mine) < GATHER_BELOW:
                        # a trickle: let a millisecond of writes gather rather than send
                        # each as it commits (half the batches at 10,000 writes/s, each a
                        # transaction and an acknowledgement on every peer; p99 lag lower)
                        await asyncio.sleep(POLL_SECONDS)
                elif peer.sent <= peer.acked:
                    # Nothing of this node's for it up to ``pos`` (it holds them: a snapshot
                    # brought them) and nothing in flight: that is acknowledged too, or the
                    # oplog would be held for it until this node's next write.
                    peer.acked = max(peer.acked, pos)
                continue
            if first:
                own_seq = store.version_vector().get(own, 0)
                if own_seq > have:  # the peer lacks writes no longer in the oplog
                    await self._ask_resync(peer, have, None)
                    return False
                first = False
            if store.local_stamps() != seen:  # a write in flight: look again shortly
                await asyncio.sleep(POLL_SECONDS)
                continue
            # a write is stamped before it commits: look again for a few milliseconds
            grace_until = time.monotonic() + GRACE_SECONDS
            found = False
            while time.monotonic() < grace_until:
                await asyncio.sleep(POLL_SECONDS)
                if store.oplog_position() > pos:
                    found = True
                    break
            if not found:
                await self._wait_for_writes(generation, 0.1)

    def _read_batch(self, pos: int, have: int) -> tuple[int, list[Record], bytes] | None:
        """The next batch after oplog position ``pos`` for a peer that holds this node's
        writes up to ``have``: (the position it reaches, its records of this node, the
        encoded batch), or None at the end of the oplog. Every peer usually asks for the
        same batch: the last few are kept, so the oplog is read and the batch encoded once
        for all of them."""
        kept = self._batches.get((pos, have))
        if kept is not None:
            return kept
        records = self.store.oplog_since(pos, BATCH_RECORDS)
        if not records:
            return None
        mine = [r for r in records if r.node == self.own and r.origin_seq > have]
        batch = (records[-1].seq, mine, encode_batch(self.own, mine) if mine else b"")
        if len(self._batches) >= 4 * max(1, len(self.peers)):
            self._batches.clear()
        self._batches[(pos, have)] = batch
        return batch

    async def _ask_resync(self, peer: PeerState, have: int, oldest: int | None) -> None:
        peer.resyncs_asked += 1
        log.warning("replication: peer %s holds our writes up to %d, but the oplog no "
                    "longer has %d..%s: asking it to take a snapshot", peer.peer_id, have,
                    have + 1, oldest or "now")
        await self.request(peer, {"k": "resync"})
        deadline = time.monotonic() + RESYNC_WAIT_SECONDS
        while time.monotonic() < deadline:  # until its snapshot is applied
            await asyncio.sleep(0.1)
            answer = await self.request(peer, {"k": "have", "origin": self.own})
            if int(answer["seq"]) > have:
                return

    # ---- bootstrap ------------------------------------------------------------------------

    async def bootstrap(self, peer: PeerState) -> int:
        """Take a snapshot of ``peer``'s store and apply it; the rows applied."""
        assert self._bootstrap_lock is not None
        async with self._bootstrap_lock:
            if not self._needs_bootstrap and not peer.want_snapshot:
                return 0
            began = time.perf_counter()
            rows = 0
            async for data in peer.link.request_snapshot({"k": "snap"}):
                chunk = decode_snapshot_chunk(data)
                rows += (await asyncio.to_thread(self.store.apply_snapshot, chunk)).applied
            self._needs_bootstrap = False
            self.bootstrapped = True
            self.last_snapshot = (rows, time.perf_counter() - began)
            peer.snapshots += 1
            peer.want_snapshot = False
            restored = await asyncio.to_thread(self._restore_own)
            log.info("replication: took a snapshot of %d rows from %s in %.3fs (%d rows of "
                     "this node's own kept)", rows, peer.peer_id, time.perf_counter() - began,
                     restored)
            self._spawn(self._anti_entropy_soon())
            return rows

    def _restore_own(self) -> int:
        """A snapshot replaces the key ranges it covers, so a write made here that the
        source had not received when its snapshot began is gone: put this node's own rows
        back from its oplog (last writer wins: only where they are still the newest)."""
        rows: list[SnapshotRow] = []
        pos = 0
        while True:
            records = self.store.oplog_since(pos, 10_000)
            if not records:
                break
            pos = records[-1].seq
            for r in records:
                if r.node != self.own or r.key is None:
                    continue
                if r.op == "delete":
                    rows.append(SnapshotRow(r.key, -1, None, r.expire_at, r.hlc, r.node))
                elif r.op == "set" or (r.op == "incr" and r.total is None):
                    assert r.tag is not None
                    rows.append(SnapshotRow(r.key, r.tag, r.value, r.expire_at, r.hlc, r.node))
        if not rows:
            return 0
        return self.store.apply_rows(rows, []).applied

    async def _anti_entropy_soon(self, delay: float = 1.0) -> None:
        """After a snapshot: rows of third nodes that reached here before the source lost
        their place too; one pass with every peer brings them back."""
        await asyncio.sleep(delay)
        try:
            await self.anti_entropy()
        except Exception as exc:
            log.warning("replication: anti-entropy after a snapshot failed: %s", exc)

    async def _snapshot_chunks(self) -> AsyncIterator[bytes]:
        """This store's snapshot, each chunk read and encoded on a worker thread."""
        start = await asyncio.to_thread(self.store.snapshot_begin)
        chunks = self.store.snapshot_chunks(start, SNAPSHOT_ROWS)
        try:
            while True:
                data = await asyncio.to_thread(_next_encoded, chunks)
                if data is None:
                    return
                yield data
        finally:
            await asyncio.to_thread(_close, chunks)

    async def _bucket_chunks(self, buckets: list[int]) -> AsyncIterator[bytes]:
        """The rows and contributions of ``buckets`` (one read), in chunks of at most
        ``SNAPSHOT_ROWS`` of each; the last chunk is marked done."""
        rows, found = await asyncio.to_thread(self.store.bucket_rows, buckets)
        rows.sort(key=lambda r: r.key)
        start = SnapshotStart(0, 0, self.own, 0, "")
        parts = max(1, -(-len(rows) // SNAPSHOT_ROWS), -(-len(found) // SNAPSHOT_ROWS))
        for n in range(parts):
            piece = slice(n * SNAPSHOT_ROWS, (n + 1) * SNAPSHOT_ROWS)
            yield encode_snapshot_chunk(SnapshotChunk(start, None, rows[piece], n == parts - 1,
                                                      tuple(found[piece])))

    # ---- inbound --------------------------------------------------------------------------

    async def _on_frame(self, peer_id: str, frame: Frame) -> Any:
        if frame.type is FrameType.BATCH:
            # on the loop: a hop to a worker thread costs up to a GIL switch interval (5 ms)
            # whenever the loop is busy, which is most of the time under load
            return self._apply_batch(peer_id, frame)
        if frame.type is FrameType.SNAPSHOT_REQUEST:
            req = frame.get("req")
            if not isinstance(req, dict) or not isinstance(req.get("k"), str):
                raise ReplicationError("a request needs a map with a kind 'k'")
            return await self._answer(peer_id, req)
        return None

    def _apply_batch(self, peer_id: str, frame: Frame) -> int:
        items = frame["records"]
        if len(items) != 1 or not isinstance(items[0], bytes):
            raise ReplicationError("a mesh batch carries one encoded batch")
        batch = decode_batch(items[0])
        records: list[Record] = batch.records
        if any(r.node != batch.source or r.node != peer_id for r in records):
            raise ReplicationError(f"peer {peer_id} sent records of another origin")
        result = self.store.apply(records)
        now = time.time()
        peer = self.by_id.get(peer_id)
        lag = (now - _hlc_seconds(records[-1].hlc)) * 1000 if records else 0.0
        self.lag_samples.extend((now - _hlc_seconds(r.hlc)) * 1000 for r in records)
        self.applied_total += result.applied
        self.conflicts_total += result.skipped_older
        if peer is not None:
            peer.records_received += len(records)
            peer.applied += result.applied
            peer.conflicts += result.skipped_older
            peer.last_lag_ms = lag
            peer.last_received = now
        return max((r.seq for r in records), default=0)

    async def _answer(self, peer_id: str, req: dict[str, Any]) -> Any:
        kind = req["k"]
        if kind == "snap":
            return self._snapshot_chunks()
        if kind == "have":
            origin = str(req.get("origin", ""))
            vector = await asyncio.to_thread(self.store.version_vector)
            return [{"seq": vector.get(origin, 0)}]
        if kind == "resync":
            peer = self.by_id.get(peer_id)
            if peer is not None:
                self._spawn(self._resync_from(peer))
            return [{"ok": True}]
        if kind == "digest":
            digest = await asyncio.to_thread(self.store.bucket_digests)
            return [{"b": digest.buckets, "v": [list(p) for p in digest.vector],
                     "c": list(digest.cleared)}]
        if kind == "rows":
            return self._bucket_chunks([int(b) for b in req.get("b", [])])
        if self.quorum is not None and kind in self.quorum.KINDS:
            # a grant waits for SQLite's write lock (and its busy handler sleeps): not on
            # the loop that carries every peer's stream
            return [await asyncio.to_thread(self.quorum.handle, req)]
        raise ReplicationError(f"unknown request kind {kind!r}")

    async def _resync_from(self, peer: PeerState) -> None:
        peer.want_snapshot = True
        try:
            await self.bootstrap(peer)
        except Exception as exc:
            log.warning("replication: resync from %s failed: %s", peer.peer_id, exc)

    # ---- anti-entropy ---------------------------------------------------------------------

    async def _anti_entropy_loop(self) -> None:
        while True:
            await asyncio.sleep(self.anti_entropy_interval)
            with contextlib.suppress(Exception):
                await self.anti_entropy()

    async def anti_entropy(self) -> dict[str, int]:
        """One pass with every connected peer: pull the rows of the buckets that differ;
        per peer, the number of buckets repaired."""
        self.anti_entropy_running += 1
        try:
            return await self._anti_entropy_pass()
        finally:
            self.anti_entropy_running -= 1
            self.anti_entropy_passes += 1

    async def _anti_entropy_pass(self) -> dict[str, int]:
        done: dict[str, int] = {}
        for peer in self.peers:
            if not peer.link.connected or peer.peer_id is None:
                continue
            answer = await self.request(peer, {"k": "digest"}, 30.0)
            theirs = Digest([int(x) for x in answer["b"]],
                            tuple((str(o), int(s)) for o, s in answer["v"]),
                            (int(answer["c"][0]), str(answer["c"][1])))
            buckets = differing(await asyncio.to_thread(self.store.bucket_digests), theirs)
            if buckets:
                # one read of every differing bucket there, streamed in chunks; their clear
                # and vector apply with the last chunk, once every differing bucket is here
                await asyncio.wait_for(self._pull_buckets(peer, buckets, theirs),
                                       AE_PULL_SECONDS)
            peer.anti_entropy_repairs += len(buckets)
            done[peer.peer_id] = len(buckets)
        return done

    async def _pull_buckets(self, peer: PeerState, buckets: list[int], theirs: Digest) -> None:
        async for data in peer.link.request_snapshot({"k": "rows", "b": buckets}):
            chunk = decode_snapshot_chunk(data)
            await asyncio.to_thread(self.store.apply_rows, chunk.rows, chunk.counters,
                                    theirs if chunk.done else None)

    # ---- observability --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per peer: connected, handshake, lag, backlog, last contact, rates, conflicts."""
        return observe.mesh_status(self)

    def metric_lines(self) -> list[str]:
        """Prometheus lines for ``/metrics``."""
        return observe.mesh_metric_lines(self)


__all__ = ["Mesh", "PeerState", "SnapshotRow"]
