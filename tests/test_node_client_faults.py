"""RemoteCache when the node dies or hangs up: one error (NodeUnavailable), and no request that
must not be applied twice is ever sent twice. Real node processes and real sockets."""

from __future__ import annotations

import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hypercacheio import NodeUnavailable, RemoteCache
from hypercacheio.node import transport as transport_module
from node_helpers import Node

pytestmark = pytest.mark.timeout(120)

TRANSPORTS = ["fast", "urllib3"]
ANSWER = (b'{"ok": true, "value": 1, "added": true, "touched": true, "acquired": true, '
          b'"fence": 1, "released": true, "deleted": true, "locked": true, "owned": true}')


class HangUpServer:
    """An HTTP server on 127.0.0.1 that answers or hangs up on each request it reads, in the
    order of ``plan`` (True: answer, False: close the connection without answering); past
    the end of the plan it hangs up.

    ``seen`` counts the requests read, by request line without the query string.
    ``close_after_answer`` closes each connection right after its answer (as a server whose
    keep-alive timeout ran out would), without saying ``Connection: close``.
    """

    def __init__(self, plan: list[bool], close_after_answer: bool = False) -> None:
        self.plan = list(plan)
        self.close_after_answer = close_after_answer
        self.seen: Counter[str] = Counter()
        self.closed = threading.Event()  # set each time the server closes a connection
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket, buf: bytes) -> tuple[str, bytes] | None:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            data = conn.recv(65536)
            if not data:
                return None
            rest += data
        method, target, _ = head.split(b"\r\n")[0].decode().split(" ")
        return f"{method} {target.split('?')[0]}", rest[length:]

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    got = self._read_request(conn, buf)
                except OSError:
                    break
                if got is None:
                    break
                line, buf = got
                with self._lock:
                    self.seen[line] += 1
                    answer = self.plan.pop(0) if self.plan else False
                if not answer:
                    break
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
                if self.close_after_answer:
                    break
        self.closed.set()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def hang_up() -> Iterator[Callable[..., HangUpServer]]:
    servers: list[HangUpServer] = []

    def make(plan: list[bool], close_after_answer: bool = False) -> HangUpServer:
        servers.append(HangUpServer(plan, close_after_answer))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


PREFIX = "/api/hypercacheio"
# (name, call, request line the node receives, sent at most once?)
OPS: list[tuple[str, Callable[[RemoteCache], Any], str, bool]] = [
    ("get", lambda rc: rc.get("k"), f"GET {PREFIX}/cache/k", False),
    ("set", lambda rc: rc.set("k", b"v"), f"POST {PREFIX}/cache/k", False),
    ("delete", lambda rc: rc.delete("k"), f"DELETE {PREFIX}/cache/k", False),
    ("lock_status", lambda rc: rc.lock("k").locked(), f"GET {PREFIX}/lock/k", False),
    ("ping", lambda rc: rc.ping(), f"GET {PREFIX}/ping", False),
    ("incr", lambda rc: rc.incr("k"), f"POST {PREFIX}/incr/k", True),
    ("add", lambda rc: rc.add("k", b"v"), f"POST {PREFIX}/add/k", True),
    ("touch", lambda rc: rc.touch("k", 10), f"POST {PREFIX}/touch/k", True),
    ("pull", lambda rc: rc.pull("k"), f"POST {PREFIX}/pull/k", True),
    ("lock", lambda rc: rc.lock("k").acquire(blocking=False), f"POST {PREFIX}/lock/k", True),
    ("unlock", lambda rc: rc.unlock("k", "me"), f"DELETE {PREFIX}/lock/k", True),
    ("extend", lambda rc: rc.extend_lock("k", "me", 5), f"POST {PREFIX}/lock/k", True),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name,call,line,once", OPS, ids=[op[0] for op in OPS])
def test_a_node_hanging_up_is_node_unavailable_and_only_idempotent_requests_are_resent(
        hang_up: Callable[..., HangUpServer], transport: str, name: str,
        call: Callable[[RemoteCache], Any], line: str, once: bool) -> None:
    server = hang_up([True])
    rc = RemoteCache(server.url, "t", transport=transport, timeout=2.0)
    assert rc.ping()["ok"] is True  # a kept-alive connection, which the server then drops
    with pytest.raises(NodeUnavailable) as info:
        call(rc)
    assert type(info.value) is NodeUnavailable
    if once:
        assert server.seen[line] == 1, server.seen
        assert "unknown" in str(info.value)
    else:  # resent once on a new connection, which is dropped too
        assert server.seen[line] == 2 + (name == "ping"), server.seen
    rc.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_idempotent_request_resent_after_a_stale_connection_succeeds(
        hang_up: Callable[..., HangUpServer], transport: str) -> None:
    server = hang_up([True, False, True])  # ping; the GET dropped; its resend answered
    rc = RemoteCache(server.url, "t", transport=transport)
    assert rc.ping()["ok"] is True
    assert rc.get("k") == ANSWER  # the server's body, read as bytes (no type header)
    assert server.seen[f"GET {PREFIX}/cache/k"] == 2
    rc.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_pooled_connection_the_node_closed_is_not_used_for_incr(
        hang_up: Callable[..., HangUpServer], transport: str) -> None:
    server = hang_up([True] * 10, close_after_answer=True)
    rc = RemoteCache(server.url, "t", transport=transport)
    assert rc.ping()["ok"] is True
    assert server.closed.wait(5)  # the pooled connection is closed by now
    assert rc.incr("k") == 1  # checked before sending: sent once, on a new connection
    assert server.seen[f"POST {PREFIX}/incr/k"] == 1
    rc.close()


def test_incr_uses_a_new_connection_once_the_pooled_one_idled_too_long(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Node(str(tmp_path / "idle")) as node:
        rc = node.client(transport="fast")
        assert rc.incr("n") == 1 and rc.incr("n") == 2
        made = rc._transport.connections_made
        assert made == 1  # recent and open: reused
        assert rc.get("n") == 2 and rc._transport.connections_made == made
        monkeypatch.setattr(transport_module, "REUSE_IDLE_MAX", 0.0)
        assert rc.incr("n") == 3
        assert rc._transport.connections_made == made + 1  # idle too long: a new one
        assert rc.get("n") == 3  # an idempotent GET still reuses
        assert rc._transport.connections_made == made + 1
        rc.close()


def _every_method(rc: RemoteCache) -> list[tuple[str, Callable[[], Any]]]:
    lock = rc.lock("lk", ttl=5)
    return [
        ("get", lambda: rc.get("k")),
        ("has", lambda: rc.has("k")),
        ("in", lambda: "k" in rc),
        ("get_many", lambda: rc.get_many(["k", "k2"])),
        ("ttl", lambda: rc.ttl("k")),
        ("set", lambda: rc.set("k", 1)),
        ("forever", lambda: rc.forever("k", 1)),
        ("add", lambda: rc.add("k", 1)),
        ("set_many", lambda: rc.set_many({"k": 1})),
        ("delete", lambda: rc.delete("k")),
        ("delete_many", lambda: rc.delete_many(["k"])),
        ("pull", lambda: rc.pull("k")),
        ("incr", lambda: rc.incr("n")),
        ("decr", lambda: rc.decr("n")),
        ("touch", lambda: rc.touch("k", 5)),
        ("clear", lambda: rc.clear()),
        ("remember", lambda: rc.remember("r", 5, lambda: 1)),
        ("lock.acquire", lambda: lock.acquire(blocking=False)),
        ("lock.extend", lambda: lock.extend(5)),
        ("lock.locked", lambda: lock.locked()),
        ("lock.release", lambda: lock.release()),
        ("restore_lock", lambda: rc.restore_lock("lk", "me")),
        ("stats", lambda: rc.stats()),
        ("ping", lambda: rc.ping()),
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_every_method_raises_node_unavailable_after_kill_9(
        tmp_path: Path, transport: str, where: str) -> None:
    sock = str(tmp_path / "node.sock")
    node = Node(str(tmp_path / "data"), unix_socket=sock).start()
    try:
        if where == "tcp":
            rc = node.client(transport=transport, timeout=2.0)
        else:
            rc = RemoteCache(unix_socket=sock, token=node.token, transport=transport,
                             timeout=2.0)
        for _, call in _every_method(rc):  # each works, on kept-alive connections
            call()
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        for name, call in _every_method(rc):
            with pytest.raises(NodeUnavailable) as info:
                call()
            assert type(info.value) is NodeUnavailable, name
        rc.close()
    finally:
        node.kill()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_incr_after_the_node_was_killed_and_restarted_is_applied_once(
        tmp_path: Path, transport: str) -> None:
    node = Node(str(tmp_path / "data")).start()
    try:
        rc = node.client(transport=transport, maxsize=4)
        assert rc.incr("n") == 1
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        node.start()  # same port: every pooled connection is dead
        assert rc.incr("n") == 2
        assert rc.get("n") == 2
        rc.close()
    finally:
        node.kill()
