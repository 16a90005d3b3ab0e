"""The node under a full disk, connection floods, large values, odd owners and rude clients:
real daemons, real sockets, a real tmpfs."""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import time
from pathlib import Path

import pytest

from disk_helpers import fill
from node_helpers import PREFIX, TOKEN, Node, wait_until

pytestmark = pytest.mark.timeout(180)

FLOOD = 1100
HALF_HEAD = (f"GET {PREFIX}/cache/flood HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             "X-Slow: ").encode()  # no token, and the head never ends


def outside_logs(tmp_path: Path) -> dict[str, str]:
    return {"HYPERCACHEIO_NODE_LOG_FILE": str(tmp_path / "node.log")}


# ---- a full disk ----------------------------------------------------------------------------

def test_full_disk_is_507_json_and_recovers(small_tmpfs: Path, tmp_path: Path) -> None:
    node = Node(str(small_tmpfs / "data"), extra_env=outside_logs(tmp_path))
    node.log_file = str(tmp_path / "node.log")
    with node:
        assert node.json("POST", "/cache/kept", b"v" * 1000)[0] == 200
        assert node.request("GET", "/cache/kept")[0] == 200
        fill(small_tmpfs / "filler")
        statuses = []
        for i in range(40):  # writes until the database needs a page it cannot have
            status, headers, body = node.request("POST", f"/cache/big{i}", b"x" * 50_000)
            statuses.append(status)
            if status != 200:
                break
        assert status == 507, (statuses, body)
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["code"] == "storage_full"
        status, _, body = node.request("POST", "/incr/counter")  # every write: 507
        assert status == 507 and json.loads(body)["code"] == "storage_full"
        assert node.request("GET", "/cache/kept")[2] == b"v" * 1000  # reads go on
        assert node.proc is not None and node.proc.poll() is None  # alive, no SIGBUS
        os.unlink(small_tmpfs / "filler")
        assert node.json("POST", "/cache/after", b"y" * 1000)[0] == 200  # recovers
        assert node.request("GET", "/cache/after")[2] == b"y" * 1000
    assert "storage full" in node.log()


def test_truncated_token_file_under_a_node_is_repaired(tmp_path: Path) -> None:
    with Node(str(tmp_path / "data")) as node:
        node.json("POST", "/cache/k", b"one")
        for _ in range(2):
            assert node.request("GET", "/cache/k")[2] == b"one"  # in the node's L1 now
        os.truncate(tmp_path / "data" / "hypercacheio.l1", 0)
        assert wait_until(lambda: os.path.getsize(tmp_path / "data" / "hypercacheio.l1")
                          > 0, timeout=5)
        assert node.request("GET", "/cache/k")[2] == b"one"
        assert node.metric("l1_repairs_total") == 1
        node.json("POST", "/cache/k", b"two")
        assert node.request("GET", "/cache/k")[2] == b"two"
        assert node.proc is not None and node.proc.poll() is None
        proc = node.proc
    assert proc.returncode == 0  # a clean stop, not -SIGBUS


# ---- connection floods ----------------------------------------------------------------------

def _raise_own_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:
        if hard < FLOOD + 200:
            pytest.skip(f"the hard open-file limit ({hard}) is below {FLOOD + 200}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _half_open(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(HALF_HEAD)
        socks.append(s)
    return socks


def test_flood_of_half_open_connections_does_not_starve_clients(tmp_path: Path) -> None:
    _raise_own_file_limit()
    # The node starts with the usual soft limit of 1,024 files; it raises it itself.
    with Node(str(tmp_path / "data"), nofile=1024) as node:
        node.json("POST", "/cache/hot", b"value")
        socks = _half_open(node.port, FLOOD)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                conn.request("GET", f"{PREFIX}/cache/hot", headers={
                    "X-Hypercacheio-Token": TOKEN})
                resp = conn.getresponse()
                body = resp.read()
                times.append(time.perf_counter() - t0)
                assert (resp.status, body) == (200, b"value")
            conn.close()
            times.sort()
            p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99) - 1]
            print(f"\n{FLOOD} half-open connections held: GET p50 {p50 * 1000:.2f} ms, "
                  f"p99 {p99 * 1000:.2f} ms over {len(times)} requests")
            assert p99 < 0.1  # the bar is 10 ms; generous here against a loaded machine
            assert node.metric("connections") >= FLOOD
        finally:
            for s in socks:
                s.close()


def test_connection_cap_closes_the_newest_and_logs_once(tmp_path: Path) -> None:
    env = {"HYPERCACHEIO_NODE_MAX_CONNECTIONS": "20"}
    with Node(str(tmp_path / "data"), extra_env=env) as node:
        socks = _half_open(node.port, 40)
        try:
            closed = 0
            for s in socks:
                s.settimeout(2)
                try:
                    closed += s.recv(1) == b""
                except ConnectionResetError:
                    closed += 1
                except TimeoutError:
                    pass
                if closed >= 15:
                    break
            assert closed >= 15
        finally:
            for s in socks:
                s.close()
        assert wait_until(lambda: node.metric("connections") <= 1, timeout=10)
        assert node.request("GET", "/cache/x")[0] == 404  # served again
        assert node.metric("refused_connections_total") >= 15
    log = node.log()
    assert log.count("connection cap reached") == 1, log


def test_slow_request_head_is_closed_after_the_read_timeout(tmp_path: Path) -> None:
    env = {"HYPERCACHEIO_NODE_READ_TIMEOUT": "0.3"}
    with Node(str(tmp_path / "data"), extra_env=env) as node:
        (s,) = _half_open(node.port, 1)
        s.settimeout(5)
        t0 = time.monotonic()
        try:
            assert s.recv(1) == b""  # the node closed it
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 3
        s.close()
        assert node.metric("timed_out_connections_total") == 1


def test_stalled_body_is_408(tmp_path: Path) -> None:
    env = {"HYPERCACHEIO_NODE_READ_TIMEOUT": "0.3"}
    with Node(str(tmp_path / "data"), extra_env=env) as node:
        s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        s.sendall((f"POST {PREFIX}/cache/slow HTTP/1.1\r\nHost: x\r\n"
                   f"X-Hypercacheio-Token: {TOKEN}\r\nContent-Length: 100\r\n\r\nabc").encode())
        answer = s.recv(4096)
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert node.request("GET", "/cache/slow")[0] == 404


# ---- memory bound in bytes ------------------------------------------------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_node_get_memory_is_bounded_in_bytes_and_freed_by_clear(tmp_path: Path) -> None:
    bound = 4 * 1024 * 1024
    env = {"HYPERCACHEIO_L1_MAX_BYTES": str(bound)}
    with Node(str(tmp_path / "data"), extra_env=env) as node:
        assert node.proc is not None
        value = os.urandom(1024 * 1024)
        for i in range(60):
            assert node.json("POST", f"/cache/large{i}", value)[0] == 200
        start = _rss(node.proc.pid)
        for i in range(60):
            assert node.request("GET", f"/cache/large{i}")[2] == value
            assert node.metric("l1_bytes") <= bound
        assert node.metric("l1_bytes") > bound / 2  # it is used, up to the bound
        grown = _rss(node.proc.pid) - start
        print(f"\nnode RSS grew {grown / 2**20:.1f} MiB over 60 GETs of 1 MiB "
              f"(bound {bound / 2**20:.0f} MiB)")
        assert grown < 40 * 1024 * 1024  # unbounded, it held all 60 MiB
        assert node.json("DELETE", "/cache")[0] == 200
        assert node.metric("l1_bytes") == 0 and node.metric("l1_items") == 0


# ---- owners, rude clients, the Server header ------------------------------------------------

@pytest.mark.parametrize("owner", ["%FF", "%C3%28", "a%80b", "%ED%A0%80"])
def test_lock_owner_that_is_not_utf8_is_400(tmp_path: Path, owner: str) -> None:
    with Node(str(tmp_path / "data")) as node:
        status, doc = node.json("POST", f"/lock/res?owner={owner}&ttl=30")
        assert status == 400 and doc["code"] == "bad_request" and "UTF-8" in doc["error"]
        for method in ("GET", "DELETE"):
            assert node.json(method, f"/lock/res?owner={owner}")[0] == 400
        assert node.json("GET", "/lock/res")[1]["locked"] is False
        grant = node.json("POST", "/lock/res?owner=%C3%A9t%C3%A9&ttl=30")[1]  # "été"
        assert grant["acquired"] and grant["owner"] == "été"


def test_lock_owner_raw_non_utf8_bytes_is_400(tmp_path: Path) -> None:
    with Node(str(tmp_path / "data")) as node:
        answers = []
        for raw in (b"\xff", b"\xfe"):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
            s.sendall(b"POST " + PREFIX.encode() + b"/lock/raw?owner=" + raw
                      + b" HTTP/1.1\r\nHost: x\r\nX-Hypercacheio-Token: " + TOKEN.encode()
                      + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            answers.append(s.recv(4096))
            s.close()
        for answer in answers:  # aiohttp's parser refuses them before any route
            assert answer.split(b" ")[1] == b"400", answer
        assert node.json("GET", "/lock/raw")[1]["locked"] is False


def test_client_dropping_mid_body_is_one_info_line(tmp_path: Path) -> None:
    with Node(str(tmp_path / "data")) as node:
        s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        s.sendall((f"POST {PREFIX}/cache/drop HTTP/1.1\r\nHost: x\r\n"
                   f"X-Hypercacheio-Token: {TOKEN}\r\nContent-Length: 1000\r\n\r\n"
                   "only a part").encode())
        time.sleep(0.1)
        s.close()
        assert wait_until(lambda: "dropped the connection" in node.log(), timeout=10)
        assert node.request("GET", "/cache/drop")[0] == 404
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    dropped = [r for r in lines if "dropped the connection" in r["msg"]]
    assert len(dropped) == 1 and dropped[0]["level"] == "info"
    assert not [r for r in lines if r["level"] in ("error", "critical") or "exc" in r], lines


def test_server_header_names_no_versions(tmp_path: Path) -> None:
    with Node(str(tmp_path / "data")) as node:
        for path, token in (("/ping", None), ("/cache/x", TOKEN), ("/nope", TOKEN)):
            _, headers, _ = node.request("GET", path, token=token)
            server = headers.get("server", "")
            assert "aiohttp" not in server.lower() and "python" not in server.lower(), server


def test_sigterm_still_clean_with_idle_connections(tmp_path: Path) -> None:
    # aiohttp may wait its shutdown timeout on a connection with a partial head: keep it short.
    node = Node(str(tmp_path / "data"),
                extra_env={"HYPERCACHEIO_NODE_SHUTDOWN_TIMEOUT": "1"}).start()
    socks = _half_open(node.port, 5)
    try:
        assert node.stop(signal.SIGTERM) == 0
    finally:
        for s in socks:
            s.close()
        node.kill()
