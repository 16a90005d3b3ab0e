"""The node's HTTP API through raw HTTP, as curl would speak it, against a real daemon."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypercacheio import Cache
from node_helpers import TOKEN, Node, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = str(tmp_path_factory.mktemp("node-api"))
    with Node(directory, extra_env={"HYPERCACHEIO_NODE_ACCESS_LOG": "true"}) as n:
        yield n


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = str(tmp_path_factory.mktemp("node-limited"))
    with Node(directory, extra_env={"HYPERCACHEIO_NODE_MAX_VALUE_BYTES": "1000",
                                    "HYPERCACHEIO_NODE_RATE_LIMIT": "20"}) as n:
        yield n


def snapshot(directory: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    conn = sqlite3.connect(os.path.join(directory, "hypercacheio.sqlite"))
    try:
        entries = conn.execute("SELECT key, tag, value, expire_at FROM entries "
                               "ORDER BY key").fetchall()
        locks = conn.execute("SELECT name, owner, expire_at, fence FROM locks "
                             "ORDER BY name").fetchall()
        return entries, locks
    finally:
        conn.close()


# ---- values ---------------------------------------------------------------------------------

def test_set_then_get_bytes_by_default(node: Node) -> None:
    status, doc = node.json("POST", "/cache/greeting", b"hello")
    assert status == 200 and doc == {"stored": True, "expires_at": None}
    status, headers, body = node.request("GET", "/cache/greeting")
    assert status == 200 and body == b"hello"
    assert headers["x-hypercacheio-type"] == "bytes"
    assert headers["content-type"] == "application/octet-stream"
    assert "x-hypercacheio-expires-at" not in headers


@pytest.mark.parametrize("kind,body", [("str", "héllo ✓".encode()), ("int", b"-42"),
                                       ("pickle", pickle.dumps({"a": [1, 2]})),
                                       ("bytes", bytes(range(256)))])
def test_types_round_trip(node: Node, kind: str, body: bytes) -> None:
    status, _ = node.json("POST", f"/cache/typed-{kind}", body,
                          {"X-Hypercacheio-Type": kind})
    assert status == 200
    status, headers, got = node.request("GET", f"/cache/typed-{kind}")
    assert (status, headers["x-hypercacheio-type"], got) == (200, kind, body)


def test_missing_key_is_404_json(node: Node) -> None:
    status, doc = node.json("GET", "/cache/never-set")
    assert status == 404 and doc["code"] == "not_found"


def test_ttl_by_query_and_header_gives_expiry(node: Node) -> None:
    status, doc = node.json("POST", "/cache/ttl-q?ttl=100", b"x")
    assert status == 200 and doc["expires_at"] is not None
    status, headers, _ = node.request("GET", "/cache/ttl-q")
    assert float(headers["x-hypercacheio-expires-at"]) == pytest.approx(doc["expires_at"])
    status, doc = node.json("POST", "/cache/ttl-h", b"x", {"X-Hypercacheio-TTL": "50"})
    assert doc["expires_at"] is not None
    # a ttl <= 0 removes the key, as Cache.set does
    node.json("POST", "/cache/ttl-h?ttl=0", b"y")
    assert node.request("GET", "/cache/ttl-h")[0] == 404


def test_delete(node: Node) -> None:
    node.json("POST", "/cache/del-me", b"1")
    assert node.json("DELETE", "/cache/del-me") == (200, {"deleted": True})
    assert node.json("DELETE", "/cache/del-me") == (200, {"deleted": False})


def test_add_has_one_winner(node: Node) -> None:
    assert node.json("POST", "/add/add-once", b"first")[1]["added"] is True
    assert node.json("POST", "/add/add-once", b"second")[1]["added"] is False
    assert node.request("GET", "/cache/add-once")[2] == b"first"


def test_touch(node: Node) -> None:
    assert node.json("POST", "/touch/touch-none?ttl=10")[1]["touched"] is False
    node.json("POST", "/cache/touch-me", b"v")
    status, doc = node.json("POST", "/touch/touch-me?ttl=10")
    assert doc["touched"] is True and doc["expires_at"] is not None
    status, doc = node.json("POST", "/touch/touch-me")  # no ttl: never expires
    assert doc == {"touched": True, "expires_at": None}


def test_incr_and_negative_delta(node: Node) -> None:
    assert node.json("POST", "/incr/counter") == (200, {"value": 1})
    assert node.json("POST", "/incr/counter?delta=10") == (200, {"value": 11})
    assert node.json("POST", "/incr/counter?delta=-20") == (200, {"value": -9})
    node.json("POST", "/cache/not-int", b"abc")
    status, doc = node.json("POST", "/incr/not-int")
    assert status == 409 and doc["code"] == "not_integer"
    node.json("POST", "/cache/big", str(2**63 - 1).encode(), {"X-Hypercacheio-Type": "int"})
    status, doc = node.json("POST", "/incr/big")
    assert status == 409 and doc["code"] == "overflow"


def test_keys_with_reserved_characters(node: Node) -> None:
    for raw, quoted in [("a/b", "a%2Fb"), ("..", "%2E%2E"), ("q?x=1#f", "q%3Fx%3D1%23f"),
                        ("ключ", "%D0%BA%D0%BB%D1%8E%D1%87"), ("sp ace", "sp%20ace")]:
        assert node.json("POST", f"/cache/{quoted}", raw.encode())[0] == 200
        assert node.request("GET", f"/cache/{quoted}")[2] == raw.encode()


def test_key_length_limit(node: Node) -> None:
    assert node.json("POST", "/cache/" + "k" * 1024, b"x")[0] == 200
    status, doc = node.json("POST", "/cache/" + "k" * 1025, b"x")
    assert status == 400 and doc["code"] == "invalid_key"
    status, doc = node.json("GET", "/cache/")
    assert status == 404


# NUL is reserved for internal names (the quorum's add lease is "\x00add:" + key): every key
# and lock route refuses it with 400 and changes nothing (batch routes: test_node_batch)
NUL_KEY_ROUTES = [("GET", "/cache/{}"), ("POST", "/cache/{}"), ("DELETE", "/cache/{}"),
                  ("POST", "/add/{}"), ("POST", "/touch/{}?ttl=5"), ("POST", "/incr/{}"),
                  ("GET", "/lock/{}"), ("POST", "/lock/{}"), ("POST", "/lock/{}?extend=true"),
                  ("DELETE", "/lock/{}?force=true"), ("DELETE", "/lock/{}?owner=o"),
                  ("GET", "/ttl/{}"), ("POST", "/pull/{}")]


@pytest.mark.parametrize("method,route", NUL_KEY_ROUTES)
@pytest.mark.parametrize("name", ["%00add%3Akept", "k%00", "%00"])
def test_a_key_or_lock_name_with_nul_is_400_on_every_route(node: Node, method: str,
                                                            route: str, name: str) -> None:
    node.json("POST", "/cache/kept", b"v")
    node.json("POST", "/lock/held?owner=me&ttl=60")
    before = snapshot(node.directory)
    status, doc = node.json(method, route.format(name), b"1")
    assert status == 400 and doc["code"] == "invalid_key", doc
    assert "NUL" in doc["error"]
    assert snapshot(node.directory) == before


def test_flush(tmp_path: Path) -> None:
    with Node(str(tmp_path / "flush")) as n:
        for i in range(5):
            n.json("POST", f"/cache/k{i}", b"v")
        n.json("POST", "/lock/stays")
        assert n.json("DELETE", "/cache") == (200, {"cleared": 5})
        assert n.request("GET", "/cache/k1")[0] == 404
        assert n.json("GET", "/lock/stays")[1]["locked"] is True


# ---- locks ----------------------------------------------------------------------------------

def test_lock_owner_and_fence_in_json(node: Node) -> None:
    status, grant = node.json("POST", "/lock/res?ttl=30&owner=alice")
    assert grant["acquired"] is True and grant["owner"] == "alice"
    assert isinstance(grant["fence"], int) and grant["expires_at"] is not None
    status, other = node.json("POST", "/lock/res?ttl=30&owner=bob")
    assert other["acquired"] is False and other["fence"] is None
    info = node.json("GET", "/lock/res?owner=alice")[1]
    assert info["locked"] and info["owned"] and info["fence"] == grant["fence"]
    assert node.json("GET", "/lock/res?owner=bob")[1]["owned"] is False
    assert node.json("DELETE", "/lock/res?owner=bob")[1]["released"] is False
    assert node.json("DELETE", "/lock/res")[1]["released"] is False  # no owner: a hint
    assert node.json("DELETE", "/lock/res?owner=alice")[1]["released"] is True
    again = node.json("POST", "/lock/res?owner=bob")[1]
    assert again["acquired"] and again["fence"] > grant["fence"]
    assert node.json("DELETE", "/lock/res?force=true")[1]["released"] is True


def test_lock_without_owner_gets_one_and_extend(node: Node) -> None:
    grant = node.json("POST", "/lock/auto?ttl=5")[1]
    assert grant["acquired"] and len(grant["owner"]) == 32
    owner = grant["owner"]
    ext = node.json("POST", f"/lock/auto?ttl=60&owner={owner}&extend=true")[1]
    assert ext["acquired"] and ext["fence"] == grant["fence"]
    assert node.json("POST", "/lock/auto?owner=other&extend=true")[1]["acquired"] is False
    assert node.json("DELETE", f"/lock/auto?owner={owner}")[1]["released"]


# ---- node endpoints -------------------------------------------------------------------------

def test_ping_bare_and_detailed(node: Node) -> None:
    assert node.json("GET", "/ping", token=None) == (200, {"ok": True})
    status, doc = node.json("GET", "/ping")
    for field in ("role", "node_id", "version", "uptime", "entries", "db_bytes",
                  "wal_bytes", "peers"):
        assert field in doc
    assert doc["role"] == "primary" and doc["listen"] == [f"http://127.0.0.1:{node.port}"]
    status, headers, body = node.request("GET", "/ping", token=None,
                                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert "node_id" in json.loads(body)


def test_metrics_prometheus_text(node: Node) -> None:
    node.request("GET", "/cache/greeting")
    status, headers, body = node.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "# TYPE hypercacheio_requests_total counter" in text
    assert 'hypercacheio_requests_total{op="get",status="200"}' in text
    assert "hypercacheio_entries " in text and "hypercacheio_wal_bytes " in text


def test_openapi_document_is_served_without_token(node: Node) -> None:
    status, doc = node.json("GET", "/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/cache/{key}", "/add/{key}", "/lock/{key}", "/touch/{key}", "/incr/{key}",
            "/cache", "/ping", "/metrics"} <= set(doc["paths"])


def test_every_route_is_in_the_openapi_document() -> None:
    from hypercacheio.node.openapi import document
    from hypercacheio.node.routing import ROUTES

    paths = document("x")["paths"]
    for method, path, _handler, name in ROUTES:
        documented = path.replace("{key:[\\s\\S]+}", "{key}")
        assert method.lower() in paths[documented], (method, path)
        assert paths[documented][method.lower()]["operationId"] == name


# ---- auth -----------------------------------------------------------------------------------

EVERY_ENDPOINT = [
    ("GET", "/cache/seed"), ("POST", "/cache/seed"), ("DELETE", "/cache/seed"),
    ("DELETE", "/cache"), ("POST", "/add/fresh"), ("POST", "/touch/seed?ttl=1"),
    ("POST", "/incr/seed-counter"), ("GET", "/lock/seed-lock"),
    ("POST", "/lock/fresh-lock"), ("DELETE", "/lock/seed-lock?force=true"),
    ("GET", "/metrics"), ("GET", "/ping"),
]


@pytest.mark.parametrize("token", ["wrong", "", None], ids=["wrong", "empty", "missing"])
def test_bad_token_on_every_endpoint_is_401_and_changes_nothing(tmp_path: Path,
                                                               token: str | None) -> None:
    with Node(str(tmp_path / "auth")) as n:
        n.json("POST", "/cache/seed", b"v")
        n.json("POST", "/incr/seed-counter")
        n.json("POST", "/lock/seed-lock?owner=o")
        before = snapshot(n.directory)
        for method, path in EVERY_ENDPOINT:
            if token is None and path == "/ping":
                continue  # no token at all on /ping is the public liveness answer
            status, headers, body = n.request(method, path, b"changed", token=token)
            assert status == 401, (method, path, status)
            assert json.loads(body)["code"] == "unauthorized"
        assert snapshot(n.directory) == before
        n.stop()
        log = n.log()
        assert n.token not in log and "node listening" in log


# ---- malformed input -----------------------------------------------------------------------

@pytest.mark.parametrize("method,path,body,headers", [
    ("POST", "/cache/m", b"x", {"X-Hypercacheio-Type": "float"}),
    ("POST", "/cache/m", b"12x", {"X-Hypercacheio-Type": "int"}),
    ("POST", "/cache/m", str(2**70).encode(), {"X-Hypercacheio-Type": "int"}),
    ("POST", "/cache/m", b"\xff\xfe", {"X-Hypercacheio-Type": "str"}),
    ("POST", "/cache/m?ttl=soon", b"x", {}),
    ("POST", "/cache/m?ttl=nan", b"x", {}),
    ("POST", "/cache/m", b"x", {"X-Hypercacheio-TTL": "inf"}),
    ("POST", "/incr/m?delta=1.5", None, {}),
    ("POST", "/incr/m?delta=99999999999999999999", None, {}),
    ("POST", "/incr/m?delta=%C2%B2", None, {}),
    ("POST", "/incr/m?delta=%2B-5", None, {}),
    ("POST", "/incr/m?delta=--5", None, {}),
    ("POST", "/incr/m?delta=" + "1" * 5000, None, {}),
    ("POST", "/lock/m?ttl=-1", None, {}),
    ("POST", "/lock/m?extend=maybe", None, {}),
    ("POST", "/lock/m?owner=" + "o" * 300, None, {}),
])
def test_malformed_requests_get_400_json(node: Node, method: str, path: str,
                                         body: bytes | None, headers: dict[str, str]) -> None:
    status, doc = node.json(method, path, body, headers)
    assert status == 400, doc
    assert doc["code"] == "bad_request" and doc["error"]


def test_unknown_route_and_method_are_json(node: Node) -> None:
    status, doc = node.json("GET", "/nope")
    assert status == 404 and doc["code"] == "no_route"
    status, headers, body = node.request("PUT", "/cache/x", b"v")
    assert status == 405 and "POST" in headers["allow"]
    assert json.loads(body)["code"] == "method_not_allowed"


def test_value_size_limit_is_413(limited: Node) -> None:
    assert limited.json("POST", "/cache/small", b"x" * 1000)[0] == 200
    status, doc = limited.json("POST", "/cache/large", b"x" * 1001)
    assert status == 413 and doc["code"] == "too_large"
    status, doc = limited.json("POST", "/add/large", b"x" * 100_000)
    assert status == 413
    assert limited.request("GET", "/cache/large")[0] == 404


def test_rate_limit_is_429(limited: Node) -> None:
    statuses = [limited.request("GET", "/cache/small")[0] for _ in range(60)]
    assert 429 in statuses and statuses[0] == 200
    status, doc = limited.json("GET", "/cache/small")
    assert status in (200, 429)


# ---- coherence with the library ------------------------------------------------------------

def test_api_writes_and_library_writes_see_each_other(node: Node) -> None:
    cache = Cache(node.directory)
    try:
        cache.set("from-lib", {"x": 1})
        assert cache.get("coherent") is None
        node.json("POST", "/cache/coherent", b"v1")
        assert cache.get("coherent") == b"v1"
        node.json("POST", "/cache/coherent", b"v2")
        assert cache.get("coherent") == b"v2"  # the L1 copy was invalidated by the node
        status, headers, body = node.request("GET", "/cache/from-lib")
        assert headers["x-hypercacheio-type"] == "pickle"
        assert pickle.loads(body) == {"x": 1}  # the node passed the pickle through untouched
    finally:
        cache.close()


def test_node_memory_layer_follows_writes_from_other_processes(node: Node) -> None:
    cache = Cache(node.directory, l1_max_items=0)
    try:
        assert node.request("GET", "/cache/l1-key")[0] == 404  # the node remembers the miss
        cache.set("l1-key", b"one")
        assert node.request("GET", "/cache/l1-key")[2] == b"one"
        assert node.request("GET", "/cache/l1-key")[2] == b"one"  # served from memory
        cache.set("l1-key", "two")
        status, headers, body = node.request("GET", "/cache/l1-key")
        assert (body, headers["x-hypercacheio-type"]) == (b"two", "str")
        cache.delete("l1-key")
        assert node.request("GET", "/cache/l1-key")[0] == 404
        node.json("POST", "/cache/l1-short?ttl=0.3", b"brief")
        assert node.request("GET", "/cache/l1-short")[0] == 200
        time.sleep(0.4)
        assert node.request("GET", "/cache/l1-short")[0] == 404  # expiry bounds the memory
    finally:
        cache.close()


def test_background_collection_removes_expired_entries_and_locks(tmp_path: Path) -> None:
    with Node(str(tmp_path / "gc"), extra_env={"HYPERCACHEIO_NODE_GC_INTERVAL": "0.1"}) as n:
        n.json("POST", "/cache/short?ttl=0.05", b"x")
        n.json("POST", "/cache/long", b"x")
        n.json("POST", "/lock/brief?ttl=0.05")

        def collected() -> bool:
            text = n.request("GET", "/metrics")[2].decode()
            return "hypercacheio_gc_removed_total 1" in text

        assert wait_until(collected, 10)
        entries, locks = snapshot(n.directory)
        assert [row[0] for row in entries] == ["long"] and locks == []


# ---- another process holding SQLite's write lock --------------------------------------------

def test_a_held_write_lock_does_not_stall_the_node(tmp_path: Path) -> None:
    # An application process holding the write lock makes the node's writes wait; they
    # wait on a worker thread, so the node keeps answering everything else meanwhile.
    import threading

    with Node(str(tmp_path)) as n:
        assert n.json("POST", "/cache/before", b"1")[0] == 200
        holder = sqlite3.connect(os.path.join(str(tmp_path), "hypercacheio.sqlite"),
                                 isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long app transaction
        results: dict[str, object] = {}

        def write() -> None:
            results["set"] = n.json("POST", "/cache/during", b"2", timeout=30)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            assert wait_until(lambda: b"waited_writes_total 1" in
                              n.request("GET", "/metrics", timeout=2)[2], timeout=10)
            # The write waits, and the node answers reads, pings and metrics meanwhile.
            assert n.request("GET", "/cache/before", timeout=2)[2] == b"1"
            assert n.request("GET", "/ping", timeout=2)[0] == 200
            assert writer.is_alive() and "set" not in results
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        writer.join(30)
        assert results["set"] == (200, {"stored": True, "expires_at": None})
        assert n.request("GET", "/cache/during")[2] == b"2"
