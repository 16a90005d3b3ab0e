"""RemoteCache against a real node daemon: TCP and unix socket, errors, locks."""

from __future__ import annotations

import datetime
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypercacheio import (
    AuthError,
    Cache,
    InvalidKeyError,
    InvalidValueError,
    LockError,
    LockTimeout,
    NodeUnavailable,
    RemoteCache,
    Settings,
)
from hypercacheio.api import CacheLike
from hypercacheio.cache import MISSING
from hypercacheio.node.client import RequestRejected
from hypercacheio.node.transport import FastTransport, Response, _Conn
from node_helpers import Node, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = str(tmp_path_factory.mktemp("node-client"))
    sock = str(tmp_path_factory.mktemp("sock") / "node.sock")
    with Node(directory, unix_socket=sock,
              extra_env={"HYPERCACHEIO_NODE_MAX_VALUE_BYTES": "100000"}) as n:
        yield n


@pytest.fixture(params=[("tcp", "fast"), ("unix", "fast"), ("tcp", "urllib3"),
                        ("unix", "urllib3")], ids=lambda p: "-".join(p))
def rc(request: pytest.FixtureRequest, node: Node) -> Iterator[RemoteCache]:
    where, transport = request.param
    if where == "tcp":
        client = node.client(transport=transport)
    else:
        client = RemoteCache("http://localhost", node.token, unix_socket=node.unix_socket,
                             transport=transport)
    client.clear()
    yield client
    client.close()


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


VALUES = [b"raw\x00bytes", "text ✓", 0, -(2**63), 2**63 - 1, 2**80, 3.5, None, True,
          [1, "a", None], {"k": (1, 2)}, Point(1, 2), b"", ""]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:20] for v in VALUES])
def test_set_get_round_trip(rc: RemoteCache, value: object) -> None:
    assert rc.set("v", value) is True
    got = rc.get("v", "DEFAULT")
    assert got == value and type(got) is type(value)


def test_get_default_and_has(rc: RemoteCache) -> None:
    assert rc.get("missing") is None
    assert rc.get("missing", 7) == 7
    assert not rc.has("missing")
    rc.set("present", None)
    assert rc.has("present") and rc.get("present", 7) is None


def test_ttl_and_touch(rc: RemoteCache) -> None:
    rc.set("t", 1, ttl=100)
    rc.set("t2", 1, ttl=datetime.timedelta(seconds=100))
    rc.set("gone", 1, ttl=0)
    assert rc.get("gone") is None
    assert rc.touch("t", 1000) is True
    assert rc.touch("missing", 10) is False
    assert rc.touch("t", -1) is True and rc.get("t") is None  # ttl <= 0 removes it
    with pytest.raises(TypeError):
        rc.set("t", 1, ttl="soon")


def test_add_delete(rc: RemoteCache) -> None:
    assert rc.add("a", "first") is True
    assert rc.add("a", "second") is False
    assert rc.get("a") == "first"
    assert rc.delete("a") is True
    assert rc.delete("a") is False
    assert rc.add("a", "third", ttl=50) is True


def test_incr_decr(rc: RemoteCache) -> None:
    assert rc.incr("n") == 1
    assert rc.incr("n", 5) == 6
    assert rc.decr("n", 10) == -4
    assert rc.incr("n", -1) == -5
    assert rc.get("n") == -5
    rc.set("s", "text")
    with pytest.raises(TypeError):
        rc.incr("s")
    rc.set("max", 2**63 - 1)
    with pytest.raises(OverflowError):
        rc.incr("max")
    with pytest.raises(TypeError):
        rc.incr("n", 1.5)  # type: ignore[arg-type]


def test_clear(rc: RemoteCache) -> None:
    for i in range(3):
        rc.set(f"c{i}", i)
    assert rc.clear() == 3
    assert rc.get("c1") is None


def test_invalid_input_raises_locally(rc: RemoteCache) -> None:
    with pytest.raises(InvalidKeyError):
        rc.get("")
    with pytest.raises(InvalidKeyError):
        rc.set("k" * 1025, 1)
    with pytest.raises(InvalidValueError):
        rc.set("k", lambda: 1)
    # NUL is reserved for internal names (the quorum's add lease is "\x00add:" + key)
    for call in (lambda: rc.get("a\x00"), lambda: rc.set("\x00add:k", 1),
                 lambda: rc.add("\x00add:k", 1), lambda: rc.lock("\x00add:k"),
                 lambda: rc.get_many(["k", "\x00"]), lambda: rc.set_many({"\x00k": 1}),
                 lambda: rc.delete_many(["\x00"]), lambda: rc.incr("\x00")):
        with pytest.raises(InvalidKeyError, match="NUL"):
            call()
    assert rc.get("k") is None


def test_too_large_value_is_rejected(rc: RemoteCache) -> None:
    with pytest.raises(RequestRejected) as info:
        rc.set("huge", b"x" * 200_000)
    assert info.value.status == 413
    assert rc.get("huge") is None


def test_lock_acquire_release_fence(rc: RemoteCache) -> None:
    a = rc.lock("job", ttl=30)
    b = rc.lock("job", ttl=30)
    assert a.acquire(blocking=False) is True and a.fence is not None
    assert a.owned() and a.locked() and not b.owned()
    assert b.acquire(blocking=False) is False
    assert b.acquire(timeout=0.05) is False
    first = a.fence
    assert a.extend(60) is True and a.fence == first
    assert b.extend() is False
    assert a.release() is True and a.fence is None
    assert a.release() is False
    assert b.acquire(blocking=False) is True and b.fence is not None and b.fence > first
    assert b.force_release() is True


def test_lock_context_manager_and_explicit_owner(rc: RemoteCache) -> None:
    with rc.lock("ctx", ttl=5, owner="me") as lock:
        assert lock.owner == "me" and lock.owned()
        with pytest.raises(LockTimeout), rc.lock("ctx", ttl=5, blocking_timeout=0.05):
            pass
    assert not rc.lock("ctx").locked()
    with pytest.raises(LockError), rc.lock("ctx2", ttl=5) as held:
        held.force_release()


def test_lock_without_ttl_waits_for_release(rc: RemoteCache) -> None:
    holder = rc.lock("forever", ttl=None)
    assert holder.acquire()
    waiter = rc.lock("forever", ttl=None)
    assert waiter.acquire(timeout=0.05) is False
    holder.release()
    assert waiter.acquire(timeout=1.0) is True
    waiter.release()


def test_ping(rc: RemoteCache, node: Node) -> None:
    info = rc.ping()
    assert info["ok"] is True and info["role"] == "primary" and "uptime" in info
    assert f"unix:{node.unix_socket}" in info["listen"]


@pytest.mark.parametrize("transport", ["fast", "urllib3"])
def test_connection_is_kept_alive(node: Node, transport: str) -> None:
    rc = node.client(transport=transport)
    for _ in range(50):
        rc.get("ka")
    assert rc._transport.connections_made == 1
    rc.close()


def test_wrong_token_is_auth_error(node: Node) -> None:
    with pytest.raises(ValueError):
        RemoteCache(node.url, "bad\r\nX-Injected: 1")
    rc = RemoteCache(node.url, "wrong")
    with pytest.raises(AuthError, match="refused the API token"):
        rc.set("x", 1)
    with pytest.raises(AuthError):
        rc.ping()
    assert RemoteCache(node.url, "").ping() == {"ok": True}  # no token: bare liveness


@pytest.mark.parametrize("transport", ["fast", "urllib3"])
def test_unreachable_node_is_node_unavailable(tmp_path: Path, transport: str) -> None:
    rc = RemoteCache(f"http://127.0.0.1:{free_port()}", "t", timeout=0.5, transport=transport)
    with pytest.raises(NodeUnavailable):
        rc.get("x")
    rc2 = RemoteCache("http://localhost", "t", unix_socket=str(tmp_path / "none.sock"),
                      transport=transport)
    with pytest.raises(NodeUnavailable):
        rc2.ping()
    assert isinstance(NodeUnavailable("x"), ConnectionError)


@pytest.mark.parametrize("transport", ["fast", "urllib3"])
def test_silent_server_times_out_as_node_unavailable(transport: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        rc = RemoteCache(f"http://127.0.0.1:{server.getsockname()[1]}", "t", timeout=0.2,
                         transport=transport)
        with pytest.raises(NodeUnavailable):
            rc.get("x")


def test_a_wrong_url_path_is_an_error_not_a_miss(node: Node) -> None:
    rc = RemoteCache(f"http://127.0.0.1:{node.port}/wrong/prefix", node.token)
    with pytest.raises(RequestRejected, match="no hypercacheio node API"):
        rc.get("k")
    with pytest.raises(RequestRejected):
        rc.add("k", 1)


def test_url_forms() -> None:
    assert RemoteCache("http://h:1", "t").url == "http://h:1/api/hypercacheio"
    assert RemoteCache("http://h:1/", "t").url == "http://h:1/api/hypercacheio"
    assert RemoteCache("h:1", "t").url == "http://h:1/api/hypercacheio"
    assert RemoteCache("https://h/custom/", "t").url == "https://h/custom"
    with pytest.raises(ValueError):
        RemoteCache("ftp://h", "t")


def test_values_are_shared_with_a_local_cache(rc: RemoteCache, node: Node) -> None:
    local = Cache(node.directory, l1_max_items=0)
    try:
        rc.set("shared", Point(3, 4))
        assert local.get("shared") == Point(3, 4)
        local.set("from-local", {"n": 1})
        assert rc.get("from-local") == {"n": 1}
        local.set("num", 10)
        assert rc.incr("num", 5) == 15 and local.get("num") == 15
    finally:
        local.close()


def test_client_survives_a_node_restart(tmp_path: Path) -> None:
    node = Node(str(tmp_path / "restart")).start()
    try:
        rc = node.client()
        rc.set("k", 1)
        assert node.stop() == 0
        with pytest.raises(NodeUnavailable):
            rc.get("k")
        node.start()  # same port: the pooled connection is stale, a new one is made
        assert rc.get("k") == 1
    finally:
        node.kill()


def _one_answer_server(answers: int) -> tuple[socket.socket, threading.Thread]:
    """Answers ``answers`` requests, each on its own connection, closing it after (as a
    server whose keep-alive timeout passed would), without saying Connection: close."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve() -> None:
        for _ in range(answers):
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n"
                         b"Content-Type: application/json\r\n\r\n{\"ok\": true}")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_fast_transport_resends_once_on_a_connection_closed_while_idle() -> None:
    server, thread = _one_answer_server(2)
    with server:
        rc = RemoteCache(f"http://127.0.0.1:{server.getsockname()[1]}", "t", transport="fast")
        assert rc.ping() == {"ok": True}
        assert rc.ping() == {"ok": True}  # the pooled connection was closed: resent
        assert rc._transport.connections_made == 2
        thread.join(5)


def test_a_fresh_connection_closed_without_answer_is_node_unavailable() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    with server:
        rc = RemoteCache(f"http://127.0.0.1:{server.getsockname()[1]}", "t", transport="fast")
        with pytest.raises(NodeUnavailable, match="closed the connection"):
            rc.ping()
        thread.join(5)


def test_fast_transport_takes_its_answer_before_the_connection_is_reused(node: Node) -> None:
    # An idle connection (and its parser) goes to the next request at once, from any
    # thread: the answer must be out of it before it is put back, or a GET returns another
    # request's value.
    rc = node.client(transport="fast")
    rc.set("mine", "A")
    rc.set("theirs", "B")
    transport = rc._transport
    assert isinstance(transport, FastTransport)
    checkin = transport._checkin
    others: list[Response] = []
    started: list[bool] = []

    def checkin_then_another_thread(conn: _Conn) -> None:
        checkin(conn)
        if not started:  # another thread takes the idle connection before we read on
            started.append(True)
            others.append(transport.request("GET", rc.base_path + "/cache/theirs",
                                            rc._headers))

    transport._checkin = checkin_then_another_thread  # type: ignore[method-assign]
    try:
        assert rc.get("mine") == "A"
        assert others[0].body == b"B"
    finally:
        rc.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with Node(str(tmp_path / "tls"), tls=(str(cert), str(key))) as node:
        url = f"https://127.0.0.1:{node.port}"
        for transport in ("fast", "urllib3"):
            rc = RemoteCache(url, node.token, verify=str(cert), transport=transport)
            rc.set("secure", "yes")
            assert rc.get("secure") == "yes"
            assert rc.ping()["listen"] == [f"https://127.0.0.1:{node.port}"]
            with pytest.raises(NodeUnavailable):  # the default trust store does not know it
                RemoteCache(url, node.token, transport=transport).get("secure")


# ---- the whole Cache API, with Cache's defaults (hypercacheio.api.CacheLike) ----------------

def _scenario(c: CacheLike) -> list[object]:
    """The same calls on a Cache and a RemoteCache, both with default_ttl=100."""
    def whole(seconds: float | None) -> int | None:
        return None if seconds is None else round(seconds)

    out: list[object] = []
    c.set("a", 1)
    out += [whole(c.ttl("a")), c.forever("b", 2), c.ttl("b"), c.add("c", 3), whole(c.ttl("c"))]
    out += [c.set_many({"d": 4, "e": 5}), whole(c.ttl("d")), c.get_many(["a", "b", "zz"])]
    out += ["a" in c, "zz" in c, c.has("b"), c.incr("n"), whole(c.ttl("n")), c.decr("n", 3)]
    c.set("t", 1, ttl=None)
    out += [c.ttl("t"), c.touch("t"), whole(c.ttl("t")), c.touch("zz")]
    out += [c.set("g", 1, ttl=0), c.get("g", "default"), c.add("g", 1, ttl=-1), c.has("g")]
    out += [c.pull("a"), c.pull("a", "x"), c.delete_many(["b", "c", "zz"]), c.ttl("zz")]
    out += [c.remember("r", 50, lambda: "computed"), c.remember("r", 50, lambda: "again"),
            whole(c.ttl("r")), c.remember("r2", MISSING, lambda: 7), whole(c.ttl("r2"))]
    lock = c.lock("L", ttl=30)
    assert lock.acquire(blocking=False)
    restored = c.restore_lock("L", lock.owner)
    out += [restored.fence == lock.fence is not None, restored.owned(),
            c.restore_lock("L", "someone else").owned(), restored.release(), lock.locked()]
    stats = c.stats()
    out += [sorted(k for k in ("hits", "misses", "entries", "locks", "db_bytes") if k in stats)]
    return out


def test_remote_cache_has_the_whole_api_with_the_same_defaults(rc: RemoteCache, node: Node,
                                                               tmp_path: Path) -> None:
    local = Cache(str(tmp_path / "local"), default_ttl=100)
    remote = RemoteCache(rc.url, node.token, unix_socket=rc.unix_socket, default_ttl=100,
                         transport="fast" if isinstance(rc._transport, FastTransport)
                         else "urllib3")
    try:
        assert isinstance(local, CacheLike) and isinstance(remote, CacheLike)
        expected = _scenario(local)
        assert expected[:3] == [100, True, None]  # default_ttl applies; forever ignores it
        assert _scenario(remote) == expected
    finally:
        local.close()
        remote.close()


def test_default_ttl_comes_from_settings_and_ttl_none_overrides_it(node: Node) -> None:
    settings = Settings(api_token=node.token, node_port=node.port, default_ttl=60)
    rc = RemoteCache(settings=settings)
    assert rc.url == node.url and rc.default_ttl == 60.0
    rc.set("s", 1)
    left = rc.ttl("s")
    assert left is not None and 58 < left <= 60
    rc.set("s", 1, ttl=None)
    assert rc.ttl("s") is None
    assert RemoteCache(node.url, node.token).default_ttl is None
    with pytest.raises(ValueError, match="default_ttl"):
        RemoteCache(node.url, node.token, default_ttl=0)
    with pytest.raises(ValueError, match="unix_socket"):
        RemoteCache()
    rc.close()


def test_unix_socket_without_a_url(node: Node) -> None:
    assert node.unix_socket is not None
    with RemoteCache(unix_socket=node.unix_socket, token=node.token) as rc:
        rc.set("via-socket", "yes")
        assert rc.get("via-socket") == "yes"
        assert repr(rc) == f"<RemoteCache unix:{node.unix_socket}>"


def test_remember_computes_once_across_clients(node: Node) -> None:
    calls: list[int] = []
    results: list[object] = []
    start = threading.Barrier(4)

    def compute() -> str:
        calls.append(1)
        time.sleep(0.3)  # long enough for every other client to find no value and wait
        return "value"

    def worker() -> None:
        with node.client() as client:
            start.wait(5)
            results.append(client.remember("stampede", 30, compute))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == ["value"] * 4
    assert len(calls) == 1
