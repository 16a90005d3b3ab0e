"""The routes a primary pushes to (on every node), and the wait of ``HYPERCACHEIO_ASYNC=false``.

    POST /replication/batch     a msgpack batch frame (``replication.frames``)
                                -> JSON {"acked": seq, "applied": n, "skipped": n}
    POST /replication/snapshot  a msgpack snapshot chunk
                                -> JSON {"acked": seq or null, "applied": n, "skipped": n}

Both need the token (401, nothing applied). A frame is validated whole before anything is
applied (400 ``malformed_frame``); a body over the frame limit is refused (413). A batch
applies in one transaction that also records the position applied from its source
(``Store.apply(ack=...)``), so a secondary killed at any moment resumes from exactly what it
holds. A batch whose first record does not follow the position this node holds for its
source (a new or recreated secondary, a recreated primary) is answered 409
``need_snapshot`` and the primary sends a snapshot; the last chunk of a snapshot records its
start position. An empty batch is the primary's handshake (on connecting, and after any
failure): the answer is this node's position in that source's oplog, or 409
``need_snapshot`` if it holds none. Values move as stored, with their codec tag: nothing
is unpickled here.

Applying runs through ``store_call`` like every write, and each changed key gets a new L1
token in the same transaction, so the node's GET memory and every app's L1 on this host see
the new rows; the node's copies of the changed keys are also dropped at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from ..errors import MalformedFrame
from ..replication.frames import MAX_FRAME_BYTES, Batch, decode_batch, decode_snapshot_chunk
from ..replication.records import ApplyResult, SnapshotChunk
from . import protocol as p
from .guard import JSON_TYPE, StateHandler, error, ok
from .state import NodeState, store_call

F = TypeVar("F", Batch, SnapshotChunk)  # a decoded frame

PEER_PREFIX = "primary:"  # + the source's node id: the position applied from that primary

# The routes that write (their answer waits for the secondaries with HYPERCACHEIO_ASYNC=false)
WRITE_OPS = frozenset({"set", "add", "delete", "clear", "touch", "incr", "set_many",
                       "delete_many", "pull"})


def frame_limit(state: NodeState) -> int:
    """The largest replication frame this node reads: room for at least two of the largest
    values, never less than ``MAX_FRAME_BYTES``."""
    return max(MAX_FRAME_BYTES, 2 * state.options.max_value_bytes + (1 << 20))


async def _read_frame(request: web.Request, state: NodeState) -> bytes | web.Response:
    limit = frame_limit(state)
    too_large = error(413, "too_large", f"replication frame larger than this node's limit "
                      f"of {limit} bytes; the primary sends smaller batches")
    length = request.content_length
    if length is not None and length > limit:
        return too_large
    chunks: list[bytes] = []
    size = 0

    async def read_all() -> bool:
        nonlocal size
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return True
            size += len(chunk)
            if size > limit:
                return False
            chunks.append(chunk)

    try:
        complete = await asyncio.wait_for(read_all(), state.options.read_timeout)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout() from None
    return b"".join(chunks) if complete else too_large


def _forget(state: NodeState, keys: list[str | None]) -> None:
    if state.l1 is not None:
        for key in keys:
            if key is not None:
                state.l1.discard(key)


async def _read_decoded(request: web.Request, state: NodeState,
                        decode: Callable[..., F]) -> F | web.Response:
    """The request's frame read and decoded whole, or the answer refusing it (too large,
    malformed, or sent by this node's own database)."""
    body = await _read_frame(request, state)
    if isinstance(body, web.Response):
        return body
    try:
        frame = decode(body, max_bytes=frame_limit(state))
    except MalformedFrame as exc:
        return error(400, "malformed_frame", str(exc))
    source = frame.source if isinstance(frame, Batch) else frame.start.source
    if source == state.store.node_id:
        return error(409, "same_store", "this frame comes from this node's own database: a "
                     "primary lists itself in HYPERCACHEIO_SECONDARY_URLS; remove it")
    return frame


async def receive_batch(request: web.Request, state: NodeState) -> web.StreamResponse:
    batch = await _read_decoded(request, state, decode_batch)
    if isinstance(batch, web.Response):
        return batch
    store = state.store
    peer = PEER_PREFIX + batch.source
    position = await store_call(state, store.peer_position, peer)
    held = position.acked if position is not None and position.source == batch.source else None
    result = ApplyResult(0, 0)
    first = min((record.seq for record in batch.records), default=None)
    if held is None or (first is not None and first > held + 1):
        # an empty batch asks for the position (the primary's handshake)
        state.replica_refused += first is not None
        return web.Response(status=409, content_type=JSON_TYPE, text=json.dumps({
            "error": "this node holds no position in the source's oplog that this batch "
                     "continues; send a snapshot first",
            "code": "need_snapshot", "acked": held}))
    if batch.records:
        result = await store_call(state, partial(store.apply, ack=(peer, batch.source)),
                                  batch.records)
        _forget(state, [record.key for record in batch.records])
        if any(record.key is None for record in batch.records) and state.l1 is not None:
            state.l1.clear()  # a clear: the tokens moved already; this frees the memory
        held = max(held, max(record.seq for record in batch.records))
        state.replica_batches += 1
        state.replica_rows += len(batch.records)
    return ok({"acked": held, "applied": result.applied, "skipped": result.skipped_older})


async def receive_snapshot(request: web.Request, state: NodeState) -> web.StreamResponse:
    chunk = await _read_decoded(request, state, decode_snapshot_chunk)
    if isinstance(chunk, web.Response):
        return chunk
    store = state.store
    peer = PEER_PREFIX + chunk.start.source
    result = await store_call(state, partial(store.apply_snapshot, ack=peer), chunk)
    _forget(state, [row.key for row in chunk.rows])
    state.replica_snapshot_chunks += 1
    state.replica_rows += len(chunk.rows)
    return ok({"acked": chunk.start.position if chunk.done else None,
               "applied": result.applied, "skipped": result.skipped_older})


ROUTES: list[tuple[str, str, StateHandler, str]] = [
    ("POST", "/replication/batch", receive_batch, "replication_batch"),
    ("POST", "/replication/snapshot", receive_snapshot, "replication_snapshot"),
]


# ---- HYPERCACHEIO_ASYNC=false ---------------------------------------------------------------

def synced(handler: StateHandler) -> StateHandler:
    """``handler`` of a write route, answering (on a primary with ``HYPERCACHEIO_ASYNC=false``)
    once every reachable secondary acknowledged the oplog position read right after the
    write, or after ``HYPERCACHEIO_TIMEOUT``; the number that did is in the answer's
    ``X-Hypercacheio-Replicas`` header."""
    async def wait_for_secondaries(request: web.Request, state: NodeState
                                   ) -> web.StreamResponse:
        response = await handler(request, state)
        pusher = state.replication
        if pusher is None or state.settings.async_requests or response.status >= 300:
            return response
        position = await store_call(state, state.store.oplog_position)
        count = await pusher.wait_acked(position, state.settings.timeout)
        response.headers[p.REPLICAS_HEADER] = str(count)
        return response
    return wait_for_secondaries


# ---- what /ping and /metrics show ----------------------------------------------------------

def ping_doc(state: NodeState) -> dict[str, Any]:
    """The ``replication`` part of ``/ping`` (with the token)."""
    doc: dict[str, Any] = {
        "received_batches": state.replica_batches,
        "received_snapshot_chunks": state.replica_snapshot_chunks,
        "received_rows": state.replica_rows,
        "refused_batches": state.replica_refused,
        "sources": [{"source": pos.peer[len(PEER_PREFIX):], "applied": pos.acked,
                     "updated_at": pos.updated_at}
                    for pos in state.store.peer_positions() if pos.peer.startswith(PEER_PREFIX)],
    }
    if state.replication is not None:
        doc["async"] = state.settings.async_requests
        doc["secondaries"] = state.replication.status()
    return doc


def metric_lines(state: NodeState) -> list[str]:
    """The replication figures of ``/metrics`` (Prometheus text)."""
    lines: list[str] = []
    for name, text, value in (
            ("replication_received_batches_total", "Oplog batches applied from a primary.",
             state.replica_batches),
            ("replication_received_snapshot_chunks_total", "Snapshot chunks applied from a "
             "primary.", state.replica_snapshot_chunks),
            ("replication_received_rows_total", "Rows received from a primary (batches and "
             "snapshots).", state.replica_rows),
            ("replication_refused_batches_total", "Batches answered need_snapshot.",
             state.replica_refused)):
        lines += [f"# HELP hypercacheio_{name} {text}", f"# TYPE hypercacheio_{name} counter",
                  f"hypercacheio_{name} {value}"]
    if state.replication is not None:
        lines += state.replication.metric_lines()
    return lines
