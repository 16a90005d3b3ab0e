"""The primary's push: its node ships its oplog to every secondary node, nothing dropped.

One asyncio task per secondary URL (``HYPERCACHEIO_SECONDARY_URLS``) in the primary's node,
over one aiohttp ``ClientSession`` (HTTP/1.1 keep-alive, the token in
``X-Hypercacheio-Token``). Each link loops:

- its position is the last oplog ``seq`` the secondary acknowledged, persisted in the
  primary's store (``Store.peer_ack``; the oplog keeps what a registered secondary has not
  acknowledged, up to the tombstone window), so a restart of the primary resumes;
- ``Store.oplog_since(position)`` -> ``POST {url}/replication/batch`` (a msgpack frame of
  ``replication.frames``) -> on 200 the position moves to the batch's last ``seq``;
- when the oplog no longer holds what follows the position (trimmed, or another database's
  count), or the secondary answers 409 ``need_snapshot`` (it is new, was recreated, or holds
  no position in this primary's oplog), it takes a snapshot: ``Store.snapshot_begin``, then
  ``POST {url}/replication/snapshot`` chunk by chunk while writes go on, then the oplog
  from the snapshot's position;
- on any failure (connection refused, timeout, an error answer) it keeps its position and
  tries again, backing off with jitter up to ``MAX_BACKOFF`` seconds: nothing is dropped,
  and no write on the primary ever waits for it (except ``HYPERCACHEIO_ASYNC=false``).

Waking: every write of every process on the primary's host moves the database clock, a
word of the shared clock file (``Store.last_hlc``). A watcher reads it every ``poll``
seconds (an mmap read, nothing on the write path) and wakes the links; it keeps waking them
for ``HOT_SECONDS`` after a change, because a version is taken just before its COMMIT, so
the oplog row may become visible a moment after the word moved. An idle link also reads
the oplog every ``IDLE_RECHECK`` seconds whatever the clock says.

An idle link sends the secondary an empty batch every ``HEARTBEAT_SECONDS`` (and so does
every link after a failure): the answer is the position the secondary holds, so a secondary
that came back empty, or restored from an older copy, is noticed without waiting for a
write, and ``connected`` stays true to the fact.

Acknowledgements are kept in memory at once (``wait_acked`` reads them) and persisted by
a task of their own every ``ACK_PERSIST_SECONDS`` (and at stop): after a crash
the primary sends again at most that much, which the secondary skips (applying is
idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp

from ..codec import payload_size
from ..errors import HypercacheioError
from ..node.protocol import MSGPACK_TYPE, TOKEN_HEADER
from ..store import Store
from . import observe
from .frames import MAX_BATCH_RECORDS, encode_batch, encode_snapshot_chunk
from .records import Record

T = TypeVar("T")
StoreCall = Callable[..., Awaitable[Any]]

BATCH_PATH = "/replication/batch"
SNAPSHOT_PATH = "/replication/snapshot"

BATCH_ROWS = 500  # oplog rows read per batch
FRAME_BYTES = 4 << 20  # a batch or chunk stops growing past this many bytes of values
SNAPSHOT_ROWS = 1000  # rows per snapshot chunk (fewer when their values are large)
POLL_SECONDS = 0.001  # how often the watcher reads the clock word
HOT_SECONDS = 0.02  # links keep reading the oplog this long after the clock moved
IDLE_RECHECK = 0.1  # an idle link reads the oplog at least this often
ACK_PERSIST_SECONDS = 0.05  # acknowledged positions reach the store at least this often
MAX_BACKOFF = 1.0  # seconds between attempts, at most, while a secondary fails
STOP_SECONDS = 5.0  # stop() waits this long for the tasks, at most
HEARTBEAT_SECONDS = 1.0  # an idle link asks the secondary its position this often
READ_TIMEOUT_FACTOR = 5  # a secondary answers within HYPERCACHEIO_TIMEOUT times this

log = logging.getLogger("hypercacheio.replication.push")


class PushError(HypercacheioError):
    """A secondary refused a push (its answer says why); the link tries again."""


class NeedSnapshot(PushError):
    """The secondary holds no position in this primary's oplog that the oplog can continue."""


class Link:
    """One secondary: its position and what the push to it has done."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.acked = 0  # last seq the secondary acknowledged (in memory, at once)
        self.persisted = -1  # last seq written to the store's peers table
        self.connected: bool | None = None  # None: not tried yet (counts as reachable)
        self.need_snapshot = False
        self.handshake = True  # ask the secondary its position before the next batch
        self.contact_at = 0.0  # monotonic time of the last answer from the secondary
        self.snapshotting = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.batches = 0
        self.rows = 0
        self.snapshots = 0
        self.snapshot_rows = 0
        self.errors = 0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


def _record_bytes(record: Record) -> int:
    value = record.value
    return 64 + len(record.key or "") + (0 if value is None else payload_size(value))


def _fit(records: list[Record], budget: int) -> list[Record]:
    """The longest prefix of ``records`` within ``budget`` bytes (at least one record)."""
    total = 0
    for i, record in enumerate(records):
        total += _record_bytes(record)
        if total > budget and i > 0:
            return records[:i]
    return records


class Pusher:
    """The push to every secondary of one primary node (see the module's notes).

    ``call(fn, *args)`` runs a Store method for the event loop (the node's ``store_call``:
    inline, or on a worker thread while another process holds SQLite's lock).
    """

    def __init__(self, store: Store, urls: Sequence[str], *, token: str, timeout: float,
                 call: StoreCall | None = None, batch_rows: int = BATCH_ROWS,
                 frame_bytes: int = FRAME_BYTES, snapshot_rows: int = SNAPSHOT_ROWS,
                 poll: float = POLL_SECONDS) -> None:
        if not urls:
            raise ValueError("a Pusher needs at least one secondary URL")
        self.store = store
        self.links = [Link(url) for url in dict.fromkeys(u.rstrip("/") for u in urls)]
        self.token = token
        self.timeout = timeout
        self.batch_rows = max(1, min(batch_rows, MAX_BATCH_RECORDS))
        self.frame_bytes = frame_bytes
        self.snapshot_rows = max(1, snapshot_rows)
        self.poll = poll
        self._call: StoreCall = call or self._inline
        self._session: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()  # set (and replaced) whenever a position moves
        self._stopping = False
        self.sync_writes = 0  # HYPERCACHEIO_ASYNC=false writes that waited
        self.sync_short = 0  # ... and returned with fewer confirmations than secondaries
        self.last_sync_replicas: int | None = None

    @staticmethod
    async def _inline(fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    # ---- life -----------------------------------------------------------------------

    async def start(self) -> None:
        """Register every secondary (the oplog then keeps what it has not acknowledged),
        load the persisted positions, and start the links and the watcher."""
        store = self.store
        if not store.clustered:
            await self._call(store.mark_clustered, True)
        for link in self.links:
            position = await self._call(store.peer_position, link.url)
            if position is None or position.source != store.node_id:
                # never pushed to, or positions counted in another database's oplog
                position = await self._call(store.peer_ack, link.url, 0, store.node_id)
            link.acked = link.persisted = position.acked
            link.need_snapshot = not await self._call(store.can_resume, link.acked)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                        sock_connect=self.timeout,
                                        sock_read=self.timeout * READ_TIMEOUT_FACTOR)
        self._session = aiohttp.ClientSession(
            timeout=timeout, headers={TOKEN_HEADER: self.token},
            connector=aiohttp.TCPConnector(limit_per_host=2, keepalive_timeout=30))
        for link in self.links:
            link.task = asyncio.create_task(self._run(link), name=f"push {link.url}")
        self._watcher = asyncio.create_task(self._watch(), name="push watcher")
        self._keeper = asyncio.create_task(self._keep(), name="push positions")
        log.info("pushing to %d secondar%s", len(self.links),
                 "y" if len(self.links) == 1 else "ies",
                 extra={"secondaries": [link.url for link in self.links]})

    async def stop(self) -> None:
        """Stop every task, persist the positions, close the connections."""
        self._stopping = True
        tasks = [t for t in [self._watcher, self._keeper, *(link.task for link in self.links)]
                 if t]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_SECONDS)
        for link in self.links:
            with contextlib.suppress(Exception):
                await self._persist(link)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        """Have every link read the oplog now (a write of this node just committed)."""
        for link in self.links:
            link.wake.set()

    # ---- the watcher ----------------------------------------------------------------

    async def _watch(self) -> None:
        last_hlc = self.store.last_hlc
        seen = last_hlc()
        hot_until = 0.0
        while not self._stopping:
            await asyncio.sleep(self.poll)
            now = last_hlc()
            if now != seen:
                seen = now
                hot_until = time.monotonic() + HOT_SECONDS
                self.wake()
            elif hot_until and time.monotonic() < hot_until:
                self.wake()
            else:
                hot_until = 0.0

    async def _keep(self) -> None:
        """Persist the acknowledged positions every ``ACK_PERSIST_SECONDS`` (off the
        links' path: a push never waits for the primary's write lock)."""
        while not self._stopping:
            await asyncio.sleep(ACK_PERSIST_SECONDS)
            for link in self.links:
                try:
                    await self._persist(link)
                except Exception as exc:  # the store is busy or failing: next time
                    log.warning("could not persist the position of %s: %s", link.url, exc)

    # ---- one link -------------------------------------------------------------------

    async def _run(self, link: Link) -> None:
        failures = 0
        while not self._stopping:
            link.wake.clear()
            try:
                sent = await self._step(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._failed(link, exc)
                delay = min(MAX_BACKOFF, 0.02 * (2 ** min(failures, 10)))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if failures or link.connected is not True:
                if failures:
                    log.info("push to %s works again", link.url)
                failures = 0
                self._set_connected(link, True)
            if sent:
                continue
            if time.monotonic() - link.contact_at >= HEARTBEAT_SECONDS:
                link.handshake = True  # idle: is it still there, with what it had?
                continue
            await _wait(link.wake, IDLE_RECHECK)

    def _failed(self, link: Link, exc: BaseException) -> None:
        link.errors += 1
        text = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            text = f"no answer within the timeout (HYPERCACHEIO_TIMEOUT={self.timeout:g} s)"
        if link.connected is not False or text != link.last_error:
            log.warning("push to %s failed (will retry, position %d kept): %s",
                        link.url, link.acked, text)
        link.last_error = text
        link.last_error_at = time.time()
        link.handshake = True  # it may have restarted, or be another store now
        self._set_connected(link, False)

    def _set_connected(self, link: Link, connected: bool) -> None:
        if link.connected != connected:
            link.connected = connected
            self._moved()

    def _moved(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def _step(self, link: Link) -> bool:
        """Send what follows the link's position; False if there was nothing to send."""
        if link.handshake:
            await self._handshake(link)
        if link.need_snapshot:
            await self._snapshot(link)
            return True
        records = await self._call(self.store.oplog_since, link.acked, self.batch_rows)
        if not records:
            return False
        if records[0].seq != link.acked + 1 and not await self._call(
                self.store.can_resume, link.acked):
            link.need_snapshot = True  # the rows after the position were trimmed
            return True
        records = _fit(records, self.frame_bytes)
        try:
            await self._post(link, BATCH_PATH, encode_batch(self.store.node_id, records))
        except NeedSnapshot:
            link.need_snapshot = True
            return True
        link.batches += 1
        link.rows += len(records)
        await self._acked(link, records[-1].seq)
        return True

    async def _handshake(self, link: Link) -> None:
        """Ask the secondary the position it holds in this oplog (an empty batch): it is
        what the secondary has, whatever this primary persisted. None, or one the oplog
        cannot continue from: a snapshot."""
        try:
            doc = await self._post(link, BATCH_PATH, encode_batch(self.store.node_id, []))
        except NeedSnapshot:
            link.need_snapshot = True
        else:
            held = doc.get("acked")
            if type(held) is not int or held < 0:
                raise PushError(f"{link.url} answered the handshake without a position")
            if held != link.acked:
                if await self._call(self.store.can_resume, held):
                    log.info("%s holds position %d (this primary had %d): continuing from "
                             "there", link.url, held, link.acked)
                    if held < link.acked:  # it lost writes: positions only move forward
                        await self._call(self.store.peer_forget, link.url)
                    link.acked = held
                    link.persisted = -1
                    await self._persist(link)
                    self._moved()
                else:
                    link.need_snapshot = True
        link.handshake = False

    async def _snapshot(self, link: Link) -> None:
        store = self.store
        link.snapshotting = True
        try:
            start = await self._call(store.snapshot_begin)
            log.info("sending a snapshot to %s (from oplog position %d)", link.url,
                     start.position)
            after: str | None = None
            limit = self.snapshot_rows
            while True:
                chunk = await self._call(store.snapshot_chunk, start, after, limit)
                if len(chunk.rows) > 1 and sum(
                        64 + len(r.key) + (0 if r.value is None else payload_size(r.value))
                        for r in chunk.rows) > self.frame_bytes:
                    limit = max(1, len(chunk.rows) // 2)  # large values: smaller chunks
                    continue
                await self._post(link, SNAPSHOT_PATH, encode_snapshot_chunk(chunk))
                link.snapshot_rows += len(chunk.rows)
                if chunk.done:
                    break
                after = chunk.rows[-1].key
            link.need_snapshot = False
            link.snapshots += 1
            link.acked = start.position
            await self._persist(link)
            self._moved()
            log.info("snapshot sent to %s; continuing from oplog position %d", link.url,
                     start.position)
        finally:
            link.snapshotting = False

    async def _post(self, link: Link, path: str, body: bytes) -> dict[str, Any]:
        session = self._session
        if session is None:
            raise PushError("the pusher is stopped")
        async with session.post(link.url + path, data=body,
                                headers={"Content-Type": MSGPACK_TYPE}) as resp:
            raw = await resp.read()
            status = resp.status
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        link.contact_at = time.monotonic()
        if status == 200:
            return doc
        code = str(doc.get("code", "http_error"))
        message = str(doc.get("error", raw[:200].decode("utf-8", "replace")))
        if status == 409 and code == "need_snapshot":
            raise NeedSnapshot(f"{link.url} needs a snapshot: {message}")
        if status == 401:
            raise PushError(f"{link.url} refused the token (401): give the primary and its "
                            "secondaries the same HYPERCACHEIO_API_TOKEN")
        raise PushError(f"{link.url} answered {status} {code}: {message}")

    async def _acked(self, link: Link, seq: int) -> None:
        if seq > link.acked:
            link.acked = seq
            self._moved()

    async def _persist(self, link: Link) -> None:
        """Write the link's position to the store if it moved."""
        if link.acked == link.persisted:
            return
        position = await self._call(self.store.peer_ack, link.url, link.acked,
                                    self.store.node_id)
        link.persisted = position.acked

    # ---- HYPERCACHEIO_ASYNC=false ---------------------------------------------------

    async def wait_acked(self, position: int, timeout: float) -> int:
        """Wait until every reachable secondary acknowledged ``position`` (or ``timeout``
        seconds passed); the number of secondaries that did."""
        self.wake()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            confirmed = sum(link.acked >= position for link in self.links)
            waiting = any(link.acked < position and link.connected is not False
                          for link in self.links)
            remaining = deadline - loop.time()
            if not waiting or remaining <= 0:
                break
            await _wait(self._progress, remaining)
        self.sync_writes += 1
        self.sync_short += confirmed < len(self.links)
        self.last_sync_replicas = confirmed
        return confirmed

    # ---- what it looks like ---------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Per secondary: connected, acknowledged position, backlog (rows and seconds of
        the oldest record not acknowledged), last error, what was sent."""
        return observe.push_status(self)

    def metric_lines(self) -> list[str]:
        """The Prometheus text of ``status`` (label ``secondary="url"``)."""
        return observe.push_metric_lines(self)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds. Not ``asyncio.wait_for``: before
    Python 3.12 it can swallow a cancellation that arrives as the event is set, and the
    task then never stops."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        waiter.cancel()


__all__ = ["Link", "NeedSnapshot", "PushError", "Pusher"]
