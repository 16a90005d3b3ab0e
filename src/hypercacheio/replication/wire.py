"""The binary transport of active-active replication: frames, handshake, TLS.

A frame on the wire is a 4-byte big-endian length, then that many bytes::

    length | msgpack map {"t": FrameType, ...fields}            (during the handshake)
    length | msgpack map {"t": FrameType, ...fields} | tag[32]  (after it)

After the handshake every frame carries an HMAC-SHA256 tag, keyed per direction by a key
derived from the token and both nonces, over a per-direction frame counter and the body: a
frame that was altered, replayed, reordered or injected by someone relaying the handshake
closes the connection. TLS (optional, :class:`TlsFiles`) adds confidentiality.

Handshake, before anything else and in both directions at once::

    -> HELLO {v, cluster, node, nonce}     <- HELLO {v, cluster, node, nonce}
    -> AUTH {mac}                          <- AUTH {mac}

``mac = HMAC-SHA256(token, role | transcript)`` where the transcript holds the protocol
version, the cluster id, both node ids and both 32-byte random nonces, and ``role`` is
``initiator`` or ``acceptor``: a side's proof can be neither reflected back nor replayed
on another connection (the other side's nonce is fresh each time). The token never
travels. A mismatched version or cluster id, a node id equal to ours, a wrong proof, or
silence beyond the handshake timeout raise :class:`HandshakeError`.

Every field of every frame type is checked (:data:`FIELDS`) before the frame reaches
anyone: a frame that does not decode, lacks a field, has one of the wrong type, or has an
unknown type raises :class:`MalformedFrame`; one over the size limit raises
:class:`FrameTooLarge` before its body is read. Counts go to :class:`WireCounters`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import os
import ssl
import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from ..errors import ConfigError, FrameTooLarge, HandshakeError, MalformedFrame

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
HANDSHAKE_MAX_FRAME = 4096  # HELLO and AUTH are small: an unauthenticated peer gets no more
NONCE_BYTES = 32
TAG_BYTES = 32
_HEADER = struct.Struct(">I")
_COUNTER = struct.Struct(">Q")
_MAC_LABEL = b"hypercacheio-repl-auth"
_KEY_LABEL = b"hypercacheio-repl-key"
INITIATOR = "initiator"
ACCEPTOR = "acceptor"


class FrameType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    BATCH = 3
    ACK = 4
    SNAPSHOT_REQUEST = 5
    SNAPSHOT_CHUNK = 6
    PING = 7
    PONG = 8


# The fields each frame type must carry, with their exact msgpack types (bool is not an
# int here). Other fields are allowed and passed on: "pos" of ACK, "req" of
# SNAPSHOT_REQUEST and "data" of SNAPSHOT_CHUNK are the application's, of any type.
FIELDS: dict[FrameType, dict[str, type]] = {
    FrameType.HELLO: {"v": int, "cluster": str, "node": str, "nonce": bytes},
    FrameType.AUTH: {"mac": bytes},
    FrameType.BATCH: {"seq": int, "records": list},
    FrameType.ACK: {"seq": int},
    FrameType.SNAPSHOT_REQUEST: {"id": int},
    FrameType.SNAPSHOT_CHUNK: {"id": int, "done": bool},
    FrameType.PING: {"n": int},
    FrameType.PONG: {"n": int},
}


@dataclasses.dataclass(frozen=True)
class Frame:
    """One decoded, validated frame: its type and its fields (without ``t``)."""

    type: FrameType
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


@dataclasses.dataclass
class WireCounters:
    """What the transport saw, for the node's metrics (one object per server or link)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    handshakes_ok: int = 0
    handshakes_refused: int = 0
    handshake_timeouts: int = 0
    tls_failures: int = 0
    malformed_frames: int = 0
    oversize_frames: int = 0
    bad_tags: int = 0
    peers_declared_down: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who we are in the cluster, and the shared token (never printed, never sent)."""

    cluster_id: str
    node_id: str
    token: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ConfigError("the replication node id must not be empty")
        if not self.token:
            raise ConfigError("HYPERCACHEIO_API_TOKEN must be set for replication "
                              "(the handshake proves knowledge of it)")


def encode_frame(ftype: FrameType, fields: Mapping[str, Any]) -> bytes:
    """The msgpack body of a frame (no length prefix, no tag)."""
    body = dict(fields)
    body["t"] = int(ftype)
    return msgpack.packb(body, use_bin_type=True)


def decode_frame(body: bytes) -> Frame:
    """Decode and validate a frame body; :class:`MalformedFrame` if anything is off."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, ...
        raise MalformedFrame(f"frame is not valid msgpack ({type(exc).__name__})") from None
    if type(raw) is not dict:
        raise MalformedFrame(f"frame must be a msgpack map, got {type(raw).__name__}")
    code = raw.pop("t", None)
    if type(code) is not int:
        raise MalformedFrame("frame has no integer type field 't'")
    try:
        ftype = FrameType(code)
    except ValueError:
        raise MalformedFrame(f"unknown frame type {code}") from None
    for name, kind in FIELDS[ftype].items():
        if type(raw.get(name)) is not kind:
            got = type(raw[name]).__name__ if name in raw else "nothing"
            raise MalformedFrame(f"{ftype.name} field {name!r} must be {kind.__name__}, "
                                 f"got {got}")
    return Frame(ftype, raw)


class FrameStream:
    """Frames over one asyncio stream pair: length prefix, size limit, tags once keyed,
    and coalesced writes (frames written in one turn of the loop leave in one write)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_frame: int = DEFAULT_MAX_FRAME, counters: WireCounters | None = None,
                 label: str = "") -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.counters = counters if counters is not None else WireCounters()
        self.label = label or peer_label(writer)
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._send_count = 0
        self._recv_count = 0

    def set_keys(self, send_key: bytes, recv_key: bytes) -> None:
        self._send_key, self._recv_key = send_key, recv_key

    async def read_frame(self) -> Frame:
        """The next frame. Raises :class:`FrameTooLarge`, :class:`MalformedFrame`,
        ``asyncio.IncompleteReadError`` (peer closed) or ``OSError``."""
        header = await self.reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        if length > self.max_frame:
            self.counters.oversize_frames += 1
            raise FrameTooLarge(f"frame of {length} bytes is over the limit of "
                                f"{self.max_frame} bytes")
        data = await self.reader.readexactly(length)
        if self._recv_key is not None:
            if length < TAG_BYTES:
                self.counters.bad_tags += 1
                raise MalformedFrame("frame too short to carry its tag")
            body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
            expected = hmac.digest(self._recv_key, _COUNTER.pack(self._recv_count) + body,
                                   "sha256")
            if not hmac.compare_digest(tag, expected):
                self.counters.bad_tags += 1
                raise MalformedFrame("frame tag does not verify (altered, replayed or "
                                     "injected frame)")
            self._recv_count += 1
        else:
            body = data
        try:
            frame = decode_frame(body)
        except MalformedFrame:
            self.counters.malformed_frames += 1
            raise
        self.counters.frames_in += 1
        self.counters.bytes_in += length + _HEADER.size
        return frame

    def write_frame(self, ftype: FrameType, fields: Mapping[str, Any]) -> None:
        """Queue a frame; it leaves with the others queued in the same loop turn."""
        body = encode_frame(ftype, fields)
        size = len(body) + (TAG_BYTES if self._send_key is not None else 0)
        if size > self.max_frame:
            raise FrameTooLarge(f"{ftype.name} frame of {size} bytes is over the limit "
                                f"of {self.max_frame} bytes: send smaller batches")
        if self._send_key is not None:
            body += hmac.digest(self._send_key, _COUNTER.pack(self._send_count) + body,
                                "sha256")
            self._send_count += 1
        self._pending.append(_HEADER.pack(len(body)))
        self._pending.append(body)
        self.counters.frames_out += 1
        self.counters.bytes_out += len(body) + _HEADER.size
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and not self.writer.is_closing():
            self.writer.write(b"".join(self._pending))
        self._pending.clear()

    async def wait_writable(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (no flush)."""
        await self.writer.drain()

    async def drain(self) -> None:
        """Flush, then wait while the transport's buffer is over its high-water mark."""
        self.flush()
        await self.writer.drain()

    def abort(self) -> None:
        """Close at once, dropping anything not yet written."""
        self._pending.clear()
        transport = self.writer.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def close(self) -> None:
        self.flush()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self.abort()


def peer_label(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _transcript(cluster: str, initiator: tuple[str, bytes], acceptor: tuple[str, bytes]
                ) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, cluster, initiator[0], acceptor[0],
                          initiator[1], acceptor[1]], use_bin_type=True)


def proof(token: str, role: str, transcript: bytes) -> bytes:
    """What a side of ``role`` sends to prove it knows ``token`` for this exchange."""
    return hmac.digest(token.encode(), _MAC_LABEL + role.encode() + b"\0" + transcript,
                       "sha256")


def _direction_key(token: str, sender_role: str, transcript: bytes) -> bytes:
    return hmac.digest(token.encode(), _KEY_LABEL + sender_role.encode() + b"\0" + transcript,
                       "sha256")


async def handshake(stream: FrameStream, me: Identity, *, initiator: bool,
                    timeout: float = HANDSHAKE_TIMEOUT) -> str:
    """Run the mutual handshake on ``stream``; the authenticated peer's node id.

    Raises :class:`HandshakeError` (reason in the message, never the token) on any refusal
    or on timeout. On success the stream's frame tags are keyed.
    """
    limit, stream.max_frame = stream.max_frame, min(stream.max_frame, HANDSHAKE_MAX_FRAME)
    try:
        return await asyncio.wait_for(_handshake(stream, me, initiator), timeout)
    except HandshakeError:  # a ConnectionError, hence an OSError: keep its reason
        raise
    except asyncio.TimeoutError:
        stream.counters.handshake_timeouts += 1
        raise HandshakeError(f"no complete handshake from {stream.label} within "
                             f"{timeout:g}s") from None
    except MalformedFrame as exc:
        raise HandshakeError(f"bad handshake frame from {stream.label}: {exc}") from None
    except (asyncio.IncompleteReadError, OSError) as exc:
        raise HandshakeError(f"{stream.label} closed the connection during the handshake "
                             f"({type(exc).__name__})") from None
    finally:
        stream.max_frame = limit


async def _handshake(stream: FrameStream, me: Identity, initiator: bool) -> str:
    nonce = os.urandom(NONCE_BYTES)
    stream.write_frame(FrameType.HELLO, {"v": PROTOCOL_VERSION, "cluster": me.cluster_id,
                                         "node": me.node_id, "nonce": nonce})
    await stream.drain()
    hello = await stream.read_frame()
    if hello.type is not FrameType.HELLO:
        raise HandshakeError(f"{stream.label} sent {hello.type.name} before HELLO")
    if hello["v"] != PROTOCOL_VERSION:
        raise HandshakeError(f"{stream.label} speaks protocol version {hello['v']}, we speak "
                             f"{PROTOCOL_VERSION}: run the same hypercacheio version on "
                             f"every node")
    if hello["cluster"] != me.cluster_id:
        raise HandshakeError(f"{stream.label} belongs to cluster {hello['cluster']!r}, not "
                             f"{me.cluster_id!r} (HYPERCACHEIO_CLUSTER_ID)")
    peer_id: str = hello["node"]
    if not peer_id or peer_id == me.node_id:
        raise HandshakeError(f"{stream.label} claims our own node id {me.node_id!r} (or none):"
                             f" a node connected to itself, or two nodes share an id")
    if len(hello["nonce"]) != NONCE_BYTES:
        raise HandshakeError(f"{stream.label} sent a nonce of {len(hello['nonce'])} bytes")
    mine, theirs = (me.node_id, nonce), (peer_id, hello["nonce"])
    my_role, peer_role = (INITIATOR, ACCEPTOR) if initiator else (ACCEPTOR, INITIATOR)
    transcript = (_transcript(me.cluster_id, mine, theirs) if initiator
                  else _transcript(me.cluster_id, theirs, mine))
    stream.write_frame(FrameType.AUTH, {"mac": proof(me.token, my_role, transcript)})
    await stream.drain()
    auth = await stream.read_frame()
    if auth.type is not FrameType.AUTH:
        raise HandshakeError(f"{stream.label} sent {auth.type.name} instead of AUTH")
    if not hmac.compare_digest(auth["mac"], proof(me.token, peer_role, transcript)):
        raise HandshakeError(f"{stream.label} (node {peer_id!r}) failed the token proof: "
                             f"check HYPERCACHEIO_API_TOKEN is the same on every node")
    stream.set_keys(_direction_key(me.token, my_role, transcript),
                    _direction_key(me.token, peer_role, transcript))
    return peer_id


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """TLS for the replication port: our certificate and key, and the cluster's CA.

    With a CA set the server requires and verifies a client certificate (mutual TLS) and
    the client verifies the server's against the CA; without it the client trusts the
    system's CAs. Host names are not checked: the CA is the cluster's own, and which node
    a peer is, is proven by the handshake.
    """

    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> TlsFiles | None:
        cert = getattr(settings, "repl_tls_cert", None)
        key = getattr(settings, "repl_tls_key", None)
        ca = getattr(settings, "repl_tls_ca", None)
        if not cert and not key and not ca:
            return None
        if not cert or not key:
            raise ConfigError("HYPERCACHEIO_REPL_TLS_CERT and HYPERCACHEIO_REPL_TLS_KEY must be "
                              "set together (the CA alone is not enough)")
        return cls(cert, key, ca or None)

    def _load(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load HYPERCACHEIO_REPL_TLS_CERT {self.cert!r} with "
                              f"HYPERCACHEIO_REPL_TLS_KEY {self.key!r}: {exc}") from None
        if self.ca:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load HYPERCACHEIO_REPL_TLS_CA {self.ca!r}: "
                                  f"{exc}") from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        if self.ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not self.ca:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return self._load(ctx)
