"""The binary replication transport (replication/wire.py, replication/link.py), over real
sockets on 127.0.0.1: frames, the authenticated handshake, TLS, heartbeats, reconnects."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

msgpack = pytest.importorskip("msgpack")

from hypercacheio.errors import (  # noqa: E402
    ConfigError,
    FrameTooLarge,
    MalformedFrame,
    NodeUnavailable,
    ReplicationError,
)
from hypercacheio.replication.link import Backoff, LinkOptions, PeerLink  # noqa: E402
from hypercacheio.replication.link_server import LinkServer  # noqa: E402
from hypercacheio.replication.wire import (  # noqa: E402
    PROTOCOL_VERSION,
    Frame,
    FrameStream,
    FrameType,
    Identity,
    TlsFiles,
    decode_frame,
    encode_frame,
)

TOKEN = "s3cret-token-for-tests"
OTHER_TOKEN = "another-token-entirely"
FAST = LinkOptions(handshake_timeout=2.0, connect_timeout=2.0, heartbeat_interval=0.05,
                   liveness_timeout=3.0)
SILENCE = LinkOptions(handshake_timeout=2.0, connect_timeout=2.0, heartbeat_interval=0.05,
                      liveness_timeout=0.5)


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0, loop: str = "asyncio") -> None:
    if loop == "asyncio":
        asyncio.run(asyncio.wait_for(coro, timeout))
        return
    uvloop = pytest.importorskip("uvloop", reason="uvloop (the node's event loop) not installed")
    event_loop = uvloop.new_event_loop()
    try:
        event_loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        event_loop.close()


# The node runs on uvloop where installed: what touches accept and TLS runs on both loops.
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def ident(node: str, token: str = TOKEN, cluster: str = "c1") -> Identity:
    return Identity(cluster, node, token)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Recorder:
    """An application: keeps every frame and acks with the count of records seen."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, Frame]] = []
        self.records: list[Any] = []

    async def __call__(self, peer: str, frame: Frame) -> Any:
        self.frames.append((peer, frame))
        if frame.type is FrameType.BATCH:
            self.records.extend(frame["records"])
            return len(self.records)
        return None


async def serve(node: str = "b", **kwargs: Any) -> tuple[LinkServer, Recorder]:
    app = Recorder()
    kwargs.setdefault("options", FAST)
    server = LinkServer(kwargs.pop("identity", ident(node)), kwargs.pop("on_frame", app),
                        **kwargs)
    await server.start()
    return server, app


def link_to(port: int, node: str = "a", **kwargs: Any) -> PeerLink:
    kwargs.setdefault("options", FAST)
    kwargs.setdefault("backoff", Backoff(base=0.01, cap=0.1, rng=random.Random(1)))
    link = PeerLink("127.0.0.1", port, kwargs.pop("identity", ident(node)), **kwargs)
    link.start()
    return link


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


class Proxy:
    """A TCP relay that records what the client sends and can go silent (black hole)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self.frozen = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer, record=True),
                             self._pump(up_reader, writer, record=False),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    record: bool) -> None:
        while data := await reader.read(65536):
            if self.frozen:
                continue
            if record:
                self.sent += data
            writer.write(data)
        writer.close()


# ---------------------------------------------------------------- frames


def test_frames_round_trip_and_validate() -> None:
    body = encode_frame(FrameType.BATCH, {"seq": 3, "records": [b"x" * 10, [1, "k"]]})
    frame = decode_frame(body)
    assert frame.type is FrameType.BATCH and frame["seq"] == 3
    assert frame["records"] == [b"x" * 10, [1, "k"]]
    bad = [
        b"\xc1",  # never-used msgpack byte
        b"",
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({"seq": 1}),  # no type
        msgpack.packb({"t": 99}),  # unknown type
        msgpack.packb({"t": int(FrameType.BATCH), "seq": "1", "records": []}),
        msgpack.packb({"t": int(FrameType.BATCH), "seq": True, "records": []}),  # bool
        msgpack.packb({"t": int(FrameType.BATCH), "seq": 1}),  # missing field
        msgpack.packb({"t": int(FrameType.HELLO), "v": 1, "cluster": "c", "node": "n",
                       "nonce": "not bytes"}),
    ]
    for body in bad:
        with pytest.raises(MalformedFrame):
            decode_frame(body)


def test_identity_and_tls_settings_refuse_bad_values() -> None:
    with pytest.raises(ConfigError, match="API_TOKEN"):
        Identity("c", "n", "")
    assert TOKEN not in repr(ident("a"))
    with pytest.raises(ConfigError, match="TLS_KEY"):
        TlsFiles.from_settings(type("S", (), {"repl_tls_cert": "c.pem", "repl_tls_key": None,
                                              "repl_tls_ca": None})())
    with pytest.raises(ConfigError, match="/nonexistent/cert.pem"):
        TlsFiles("/nonexistent/cert.pem", "/nonexistent/key.pem").server_context()


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(base=0.1, cap=2.0, rng=random.Random(3))
    for attempt in range(12):
        ceiling = min(2.0, 0.1 * 2 ** attempt)
        assert ceiling / 2 <= backoff.delay(attempt) <= ceiling
    assert len({round(backoff.delay(20), 6) for _ in range(20)}) > 1  # jitter


# ---------------------------------------------------------------- handshake


@LOOPS
def test_handshake_both_ways_then_batches_are_delivered_and_acked(loop: str) -> None:
    async def main() -> None:
        server, app = await serve("b")
        acks: list[tuple[int, Any]] = []
        link = link_to(server.port, "a", on_ack=lambda seq, pos: acks.append((seq, pos)))
        try:
            assert await link.wait_up(5) == "b"
            await eventually(lambda: "a" in server.channels)
            assert link.counters.handshakes_ok == 1 and server.counters.handshakes_ok == 1
            seqs = [await link.send([b"r%d" % i, {"k": i}]) for i in range(3)]
            await eventually(lambda: len(acks) == 3)
            assert seqs == [1, 2, 3]
            assert acks == [(1, 2), (2, 4), (3, 6)]
            assert [peer for peer, _ in app.frames] == ["a", "a", "a"]
            assert app.records == [b"r0", {"k": 0}, b"r1", {"k": 1}, b"r2", {"k": 2}]
            assert link.in_flight == 0
            status = link.status()  # what the node will show per peer
            assert status["connected"] and status["peer_id"] == "b"
            assert status["frames_out"] >= 5 and status["last_ack_rtt"] is not None
            assert server.counters.as_dict()["frames_in"] >= 5
        finally:
            await link.stop()
            await server.close()

    run(main(), loop=loop)


def test_wrong_token_is_refused_on_both_sides_and_nothing_is_delivered(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hypercacheio.replication")

    async def main() -> None:
        server, app = await serve("b")
        link = link_to(server.port, "a", identity=ident("a", OTHER_TOKEN))
        try:
            await eventually(lambda: server.counters.handshakes_refused >= 2
                             and link.counters.handshakes_refused >= 2)
            assert not link.connected and server.channels == {}
            with pytest.raises(NodeUnavailable, match="not connected"):
                await link.send([b"x"])
            assert "token proof" in link.last_error
            assert app.frames == []
            assert server.counters.handshakes_ok == link.counters.handshakes_ok == 0
        finally:
            await link.stop()
            await server.close()

    run(main())
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("refused" in m and "token proof" in m for m in refusals)
    assert any("cannot link to peer" in m and "token proof" in m for m in refusals)
    # repeated refusals of the same host are logged once per interval, not per attempt
    assert sum("refused" in m for m in refusals) == 1
    assert TOKEN not in caplog.text and OTHER_TOKEN not in caplog.text


@pytest.mark.parametrize(("client", "reason"), [
    (ident("a", cluster="other-cluster"), "cluster"),
    (ident("b"), "our own node id"),
])
def test_wrong_cluster_or_own_node_id_is_refused(client: Identity, reason: str) -> None:
    async def main() -> None:
        server, app = await serve("b")
        link = link_to(server.port, identity=client)
        try:
            await eventually(lambda: server.counters.handshakes_refused >= 1
                             and link.counters.handshakes_refused >= 1)
            assert reason in link.last_error
            assert not link.connected and app.frames == []
        finally:
            await link.stop()
            await server.close()

    run(main())


def test_protocol_version_mismatch_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hypercacheio.replication")

    async def main() -> None:
        server, app = await serve("b")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        stream = FrameStream(reader, writer)
        stream.write_frame(FrameType.HELLO, {"v": PROTOCOL_VERSION + 1, "cluster": "c1",
                                             "node": "future", "nonce": b"n" * 32})
        await stream.drain()
        hello = await stream.read_frame()  # the server speaks first, then hangs up
        assert hello.type is FrameType.HELLO and hello["v"] == PROTOCOL_VERSION
        assert await read_to_eof(reader) == b""
        assert server.counters.handshakes_refused == 1 and app.frames == []
        writer.close()
        await server.close()

    run(main())
    assert "protocol version" in caplog.text


def test_replayed_handshake_and_batch_are_refused() -> None:
    async def main() -> None:
        server, app = await serve("b")
        proxy = Proxy(server.port)
        await proxy.start()
        link = link_to(proxy.port, "a")
        acks: list[int] = []
        link.on_ack = lambda seq, pos: acks.append(seq)
        try:
            await link.wait_up(5)
            await link.send([b"once"])
            await eventually(lambda: acks == [1])
        finally:
            await link.stop()
        recorded = bytes(proxy.sent)
        await proxy.close()
        assert b"once" in recorded
        # Replay everything the authenticated client sent, byte for byte.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(recorded)
        await read_to_eof(reader)
        writer.close()
        await eventually(lambda: server.counters.handshakes_refused == 1)
        assert app.records == [b"once"]  # nothing of the replay was delivered
        await server.close()

    run(main())


def test_silent_half_open_connection_is_closed_by_the_handshake_timeout() -> None:
    async def main() -> None:
        options = LinkOptions(handshake_timeout=0.3, heartbeat_interval=0.05, liveness_timeout=3.0)
        server, app = await serve("b", options=options)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        received = await read_to_eof(reader)  # never sends hello: the server hangs up
        assert received  # it only ever got the server's HELLO
        assert server.counters.handshake_timeouts == 1
        assert server.counters.handshakes_refused == 1 and app.frames == []
        writer.close()
        await server.close()

    run(main())


# ---------------------------------------------------------------- bad frames


def test_garbage_and_oversize_frames_close_only_their_connection() -> None:
    async def main() -> None:
        small = LinkOptions(max_frame=64 * 1024, heartbeat_interval=0.05, liveness_timeout=3.0)
        server, app = await serve("b", options=small)
        good = link_to(server.port, "c", options=small)
        await good.wait_up(5)
        unknown = msgpack.packb({"t": 99})
        for junk in (b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                     len(unknown).to_bytes(4, "big") + unknown):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(junk)
            await read_to_eof(reader)
            writer.close()
        assert server.counters.malformed_frames == 2
        assert server.counters.oversize_frames == 1  # "GET " read as a length of ~1.2 GB
        # Before authentication even a frame under the limit is refused when it is not a
        # small HELLO: an unknown peer cannot make the server buffer megabytes.
        big_hello = encode_frame(FrameType.HELLO, {"v": PROTOCOL_VERSION, "cluster": "c1",
                                                   "node": "x" * 10_000, "nonce": b"n" * 32})
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(len(big_hello).to_bytes(4, "big") + big_hello)
        await read_to_eof(reader)
        writer.close()
        assert server.counters.oversize_frames == 2 and server.counters.handshakes_ok == 1
        # After the handshake: an oversize batch from an authenticated peer.
        downs: list[str] = []
        big = link_to(server.port, "a", options=LinkOptions(max_frame=1 << 20,
                                                       heartbeat_interval=0.05,
                                                       liveness_timeout=3.0),
                      on_down=lambda peer, reason: downs.append(reason))
        await big.wait_up(5)
        await big.send([b"x" * 100_000])
        await eventually(lambda: downs != [])
        assert server.counters.oversize_frames == 3
        with pytest.raises(FrameTooLarge):  # the sender refuses its own limit up front
            await good.send([b"y" * 70_000])
        await good.send([b"still served"])
        await eventually(lambda: app.records == [b"still served"])
        await big.wait_up(5)  # the link reconnected after being dropped
        await big.stop()
        await good.stop()
        await server.close()

    run(main())


def test_tampered_or_ill_typed_frames_after_the_handshake_close_the_connection() -> None:
    async def main() -> None:
        server, app = await serve("b")
        downs: list[str] = []
        link = link_to(server.port, "a", on_down=lambda peer, reason: downs.append(reason))
        await link.wait_up(5)
        session = link._session
        assert session is not None
        # A well-tagged frame whose fields have the wrong types.
        session.channel.stream.write_frame(FrameType.ACK, {"seq": "one"})
        await eventually(lambda: len(downs) == 1)
        assert server.counters.malformed_frames == 1
        await link.wait_up(5)
        session = link._session
        assert session is not None
        # A valid body with a forged tag (what an injector without the token can do).
        body = encode_frame(FrameType.BATCH, {"seq": 1, "records": [b"forged"]})
        writer = session.channel.stream.writer
        writer.write(len(body + bytes(32)).to_bytes(4, "big") + body + bytes(32))
        await eventually(lambda: len(downs) == 2)
        assert server.counters.bad_tags == 1
        assert app.frames == []
        await link.stop()
        await server.close()

    run(main())


# ---------------------------------------------------------------- liveness, reconnects


def test_silent_peer_is_declared_down_and_the_link_reconnects_when_it_returns() -> None:
    async def main() -> None:
        server, _ = await serve("b", options=SILENCE)
        proxy = Proxy(server.port)
        await proxy.start()
        port = proxy.port
        events: list[str] = []
        acks: list[Any] = []
        link = link_to(port, "a", options=SILENCE, on_up=lambda peer: events.append("up:" + peer),
                       on_down=lambda peer, reason: events.append("down:" + reason),
                       on_ack=lambda seq, pos: acks.append(pos))
        await link.wait_up(5)
        await link.send([b"before"])
        await eventually(lambda: acks == [1])
        proxy.frozen = True  # the network goes silent, both connections stay open
        await eventually(lambda: any(e.startswith("down:") for e in events))
        assert "silent" in events[1]
        assert link.counters.peers_declared_down == 1
        await eventually(lambda: server.counters.peers_declared_down == 1)
        with pytest.raises(NodeUnavailable):
            await link.send([b"while down"])
        await proxy.close()
        await server.close()
        # The peer comes back on the same address.
        server2, app2 = await serve("b", port=port)
        assert await link.wait_up(5) == "b"
        await link.send([b"after"])
        await eventually(lambda: acks == [1, 1])
        assert app2.records == [b"after"]
        assert events[0] == "up:b" and events[-1] == "up:b"
        assert link.counters.reconnects >= 1
        await link.stop()
        await server2.close()

    run(main())


def test_reconnect_attempts_back_off_exponentially() -> None:
    async def main() -> None:
        with socket.socket() as sock:  # a port with nothing listening
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        delays: list[float] = []
        done = asyncio.Event()

        async def fake_sleep(seconds: float) -> None:
            delays.append(seconds)
            if len(delays) >= 8:
                done.set()
            await asyncio.sleep(0)

        link = link_to(port, backoff=Backoff(base=0.1, cap=1.0, rng=random.Random(5)),
                       sleep=fake_sleep)
        await asyncio.wait_for(done.wait(), 10)
        await link.stop()
        for attempt, delay in enumerate(delays[:8]):
            ceiling = min(1.0, 0.1 * 2 ** attempt)
            assert ceiling / 2 <= delay <= ceiling, (attempt, delay)
        assert "Error" in link.last_error  # connection refused, kept for status reports
        with pytest.raises(NodeUnavailable, match="not connected within"):
            await link.wait_up(0.01)

    run(main())


def test_in_flight_window_holds_senders_until_acks_arrive() -> None:
    async def main() -> None:
        release = asyncio.Event()
        seen: list[int] = []

        async def slow(peer: str, frame: Frame) -> Any:
            seen.append(frame["seq"])
            await release.wait()
            return frame["seq"]

        server, _ = await serve("b", on_frame=slow,
                                options=LinkOptions(heartbeat_interval=0.05, liveness_timeout=5))
        link = link_to(server.port, max_in_flight=2)
        await link.wait_up(5)
        await link.send([1])
        await link.send([2])
        third = asyncio.create_task(link.send([3]))
        await eventually(lambda: seen == [1])
        await asyncio.sleep(0.05)
        assert not third.done() and link.in_flight == 2
        release.set()
        assert await asyncio.wait_for(third, 5) == 3
        await eventually(lambda: link.in_flight == 0)
        await link.stop()
        await server.close()

    run(main())


# ---------------------------------------------------------------- snapshots


def test_snapshot_is_streamed_in_chunks_and_a_failure_is_reported() -> None:
    async def main() -> None:
        async def chunks(n: int) -> AsyncIterator[Any]:
            for i in range(n):
                yield {"rows": [[f"k{i}", b"v"]], "i": i}
            if n == 0:
                raise RuntimeError("store unreadable")

        async def app(peer: str, frame: Frame) -> Any:
            if frame.type is FrameType.SNAPSHOT_REQUEST:
                return chunks(frame["req"]["n"])
            return 0

        server, _ = await serve("b", on_frame=app)
        link = link_to(server.port)
        await link.wait_up(5)
        got = [c async for c in link.request_snapshot({"n": 5})]
        assert [c["i"] for c in got] == [0, 1, 2, 3, 4]
        with pytest.raises(ReplicationError, match="RuntimeError"):
            async for _ in link.request_snapshot({"n": 0}):
                pass
        assert link.connected  # a failed snapshot does not break the link
        await link.stop()
        await server.close()

    run(main())


# ---------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_leaf(d: Path, ca: str, name: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    for name in ("node-a", "node-b"):
        _make_leaf(d, "ca", name)
    _make_leaf(d, "rogue-ca", "rogue")
    return d


def tls(d: Path, name: str, ca: str | None = "ca") -> TlsFiles:
    return TlsFiles(str(d / f"{name}.pem"), str(d / f"{name}.key"),
                    str(d / f"{ca}.pem") if ca else None)


@LOOPS
def test_mutual_tls_carries_the_link(pki: Path, loop: str) -> None:
    async def main() -> None:
        server, app = await serve("b", tls=tls(pki, "node-b"))
        link = link_to(server.port, "a", tls=tls(pki, "node-a"))
        await link.wait_up(5)
        await link.send([b"over tls"])
        await eventually(lambda: app.records == [b"over tls"])
        writer = server.channels["a"].stream.writer
        assert writer.get_extra_info("ssl_object") is not None
        assert writer.get_extra_info("peercert")["subject"] == ((("commonName", "node-a"),),)
        await link.stop()
        await server.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("case", ["client without the CA", "client cert from another CA",
                                  "plaintext client"])
@LOOPS
def test_tls_refuses_clients_that_do_not_verify(pki: Path, case: str, loop: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hypercacheio.replication")

    async def main() -> None:
        server, app = await serve("b", tls=tls(pki, "node-b"))
        files = {"client without the CA": tls(pki, "node-a", ca=None),
                 "client cert from another CA": tls(pki, "rogue", ca="ca"),
                 "plaintext client": None}[case]
        link = link_to(server.port, "a", tls=files)
        with pytest.raises(NodeUnavailable):
            await link.wait_up(1.5)
        assert not link.connected and app.frames == [] and server.channels == {}
        # the server refuses at the TLS layer, and says so
        await eventually(lambda: server.counters.tls_failures >= 1)
        assert server.counters.handshakes_refused >= 1 and server.counters.handshakes_ok == 0
        if case == "client without the CA":
            assert "CERTIFICATE_VERIFY_FAILED" in link.last_error
        await link.stop()
        await server.close()

    run(main(), loop=loop)
    assert "TLS handshake failed" in caplog.text
    # a peer that keeps failing the same way is logged once at WARNING, then quietly
    client_side = [r for r in caplog.records if "cannot link to peer" in r.getMessage()]
    assert len(client_side) == 1


def test_tls_context_of_a_server_without_ca_does_not_ask_for_client_certs(pki: Path) -> None:
    ctx = tls(pki, "node-b", ca=None).server_context()
    assert ctx.verify_mode == ssl.CERT_NONE
    assert tls(pki, "node-b").server_context().verify_mode == ssl.CERT_REQUIRED
