"""The node's batch routes (node/batch.py) against a real node: msgpack bodies, limits, all or
nothing, and RemoteCache's many-key methods over them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from hypercacheio import Cache, RemoteCache
from hypercacheio.codec import TAG_PICKLE, encode
from hypercacheio.node import protocol as p
from node_helpers import Node

pytestmark = pytest.mark.timeout(120)

MAX_VALUE = 100_000
MSGPACK = {"Content-Type": p.MSGPACK_TYPE}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = str(tmp_path_factory.mktemp("node-batch"))
    with Node(directory, extra_env={"HYPERCACHEIO_NODE_MAX_VALUE_BYTES": str(MAX_VALUE)}) as n:
        yield n


@pytest.fixture
def rc(node: Node) -> Iterator[RemoteCache]:
    client = node.client()
    client.clear()
    yield client
    client.close()


def post(node: Node, path: str, doc: Any, token: str | None = None) -> tuple[int, bytes]:
    body = doc if isinstance(doc, bytes) else msgpack.packb(doc, use_bin_type=True)
    kwargs: dict[str, Any] = {} if token is None else {"token": token}
    status, _, data = node.request("POST", path, body, MSGPACK, **kwargs)
    return status, data


def item(key: str, value: Any) -> list[Any]:
    tag, payload = encode(value)
    return [key, p.TYPE_NAMES[tag], p.payload_to_body(tag, payload)]


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


VALUES = {"b": b"\x00raw", "s": "text \u2713", "i": -(2**63), "big": 2**70, "f": 1.5,
          "n": None, "l": [1, "a"], "p": Point(3), "empty": b"", "es": ""}


def test_round_trip_of_every_type(rc: RemoteCache) -> None:
    assert rc.set_many(VALUES) == []
    got = rc.get_many([*VALUES, "missing"])
    assert got == VALUES and all(type(got[k]) is type(v) for k, v in VALUES.items())
    assert "missing" not in got
    assert rc.get("p") == Point(3) and rc.get("i") == -(2**63)


def test_raw_many_get_answers_type_and_payload_and_leaves_out_missing_keys(node: Node,
                                                                           rc: RemoteCache) -> None:
    rc.set("n", 42)
    rc.set("s", "x")
    status, data = post(node, "/many/get", {"keys": ["n", "s", "nope"]})
    assert status == 200
    assert msgpack.unpackb(data) == {"values": {"n": ["int", b"42"], "s": ["str", b"x"]}}


def test_many_set_is_read_by_a_local_cache_and_the_node_never_unpickles(
        node: Node, rc: RemoteCache) -> None:
    # A pickle the node could not load (its class does not exist there) is stored as is.
    status, data = post(node, "/many/set", {"items": [["opaque", "pickle", b"\x80\x05junk"],
                                                      item("n", 7)], "ttl": None})
    assert status == 200 and json.loads(data) == {"stored": 2, "expires_at": None}
    local = Cache(node.directory, l1_max_items=0)
    try:
        row = local.store.get("opaque")
        assert row is not None and row[:2] == (TAG_PICKLE, b"\x80\x05junk")
        assert local.get("n") == 7
        assert rc.get_many(["opaque", "n"]) == {"n": 7}  # a pickle that does not load: a miss
    finally:
        local.close()


def test_many_delete_and_counts(node: Node, rc: RemoteCache) -> None:
    rc.set_many({"a": 1, "b": 2, "c": 3})
    assert rc.delete_many(["a", "b", "zz"]) == 2
    assert rc.get_many(["a", "b", "c"]) == {"c": 3}
    assert rc.delete_many([]) == 0 and rc.get_many([]) == {} and rc.set_many({}) == []


def test_many_set_ttl(node: Node, rc: RemoteCache) -> None:
    rc.set_many({"t1": 1, "t2": 2}, ttl=100)
    left = rc.ttl("t1")
    assert left is not None and 98 < left <= 100
    rc.set_many({"t1": 1}, ttl=0)  # as Cache.set_many: ttl <= 0 removes
    assert rc.get_many(["t1", "t2"]) == {"t2": 2}


def test_get_many_over_the_key_limit_is_split_by_the_client(rc: RemoteCache) -> None:
    values = {f"k{i}": i for i in range(p.BATCH_MAX_KEYS + 5)}
    for start in range(0, len(values), 500):
        rc.set_many(dict(list(values.items())[start:start + 500]))
    assert rc.get_many(values) == values


def _snapshot(node: Node) -> dict[str, Any]:
    local = Cache(node.directory, l1_max_items=0)
    try:
        return {k: local.get(k) for k in ("keep", "x", "y")}
    finally:
        local.close()


BAD_SETS: list[tuple[str, Any, int]] = [
    ("not msgpack", b"\xc1\xc1 not msgpack", 400),
    ("truncated", msgpack.packb({"items": [["x", "str", b"1"]]})[:-2], 400),
    ("not a map", [1, 2], 400),
    ("no items", {"keys": ["x"]}, 400),
    ("invalid key", {"items": [["x", "str", b"1"], ["", "str", b"2"]]}, 400),
    ("long key", {"items": [["x", "str", b"1"], ["k" * 1025, "str", b"2"]]}, 400),
    ("bytes key", {"items": [["x", "str", b"1"], [b"y", "str", b"2"]]}, 400),
    ("unknown type", {"items": [["x", "str", b"1"], ["y", "float", b"2"]]}, 400),
    ("bad int", {"items": [["x", "str", b"1"], ["y", "int", b"12a"]]}, 400),
    ("int too big", {"items": [["x", "int", b"1"], ["y", "int", str(2**64).encode()]]}, 400),
    ("bad utf-8", {"items": [["x", "str", b"1"], ["y", "str", b"\xff"]]}, 400),
    ("payload as str", {"items": [["x", "str", b"1"], ["y", "str", "text"]]}, 400),
    ("short item", {"items": [["x", "str"]]}, 400),
    ("bad ttl", {"items": [["x", "str", b"1"]], "ttl": "soon"}, 400),
    ("nan ttl", {"items": [["x", "str", b"1"]], "ttl": float("nan")}, 400),
    ("too many keys", {"items": [[f"k{i}", "int", b"1"] for i in range(p.BATCH_MAX_KEYS + 1)]},
     400),
    ("too large", {"items": [["x", "bytes", b"v" * (MAX_VALUE + 70_000)]]}, 413),
]


@pytest.mark.parametrize("name,doc,status", BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_a_bad_many_set_is_refused_and_changes_nothing(node: Node, rc: RemoteCache, name: str,
                                                       doc: Any, status: int) -> None:
    rc.set("keep", "kept")
    rc.set("x", "before")
    before = _snapshot(node)
    got, data = post(node, "/many/set", doc)
    assert got == status, data
    assert set(json.loads(data)) == {"error", "code"}
    assert _snapshot(node) == before == {"keep": "kept", "x": "before", "y": None}


@pytest.mark.parametrize("path", ["/many/get", "/many/delete"])
def test_bad_key_lists_are_refused(node: Node, rc: RemoteCache, path: str) -> None:
    rc.set("x", "before")
    for doc, status in [({"keys": ["x", ""]}, 400), ({"keys": "x"}, 400), (b"\xc1", 400),
                        ({"keys": ["x"] * (p.BATCH_MAX_KEYS + 1)}, 400),
                        ({"keys": ["x" * 1000] * 200}, 413)]:
        got, data = post(node, path, doc)
        assert got == status, (doc if isinstance(doc, bytes) else str(doc)[:60], data)
        assert rc.get("x") == "before"


@pytest.mark.parametrize("path,doc", [
    ("/many/get", {"keys": ["x", "\x00add:x"]}),
    ("/many/delete", {"keys": ["x", "a\x00"]}),
    ("/many/set", {"items": [item("new", 1), item("\x00add:new", 1)]}),
])
def test_a_batch_with_a_nul_key_is_400_and_changes_nothing(node: Node, rc: RemoteCache,
                                                           path: str, doc: Any) -> None:
    """NUL is reserved for internal names (the quorum's add lease, ``"\\x00add:" + key``)."""
    rc.set("x", "before")
    before = _snapshot(node)
    got, data = post(node, path, doc)
    assert got == 400 and json.loads(data)["code"] == "invalid_key", data
    assert b"NUL" in data
    assert _snapshot(node) == before and rc.get("new") is None


def test_a_body_announced_over_the_limit_is_413_before_it_is_read(node: Node) -> None:
    status, _, data = node.request("POST", "/many/set", b"", {
        **MSGPACK, "Content-Length": str(MAX_VALUE + 64 * 1024 + 1)}, timeout=5)
    assert status == 413 and json.loads(data)["code"] == "too_large"


@pytest.mark.parametrize("path", ["/many/get", "/many/set", "/many/delete", "/pull/k"])
def test_wrong_token_is_401(node: Node, rc: RemoteCache, path: str) -> None:
    rc.set("k", 1)
    status, data = post(node, path, {"keys": ["k"], "items": [item("k", 2)]}, token="wrong")
    assert status == 401 and json.loads(data)["code"] == "unauthorized"
    status, _, _ = node.request("GET", "/ttl/k", token="wrong")
    assert status == 401
    assert rc.get("k") == 1


def test_pull(node: Node, rc: RemoteCache) -> None:
    rc.set("p", Point(1), ttl=50)
    assert rc.pull("p") == Point(1)
    assert rc.pull("p", "gone") == "gone" and rc.get("p") is None
    rc.set("raw", "text")
    status, headers, body = node.request("POST", "/pull/raw")
    assert status == 200 and body == b"text" and headers[p.TYPE_HEADER.lower()] == "str"
    status, _, body = node.request("POST", "/pull/raw")
    assert status == 404 and json.loads(body)["code"] == "not_found"


def test_ttl_route(node: Node, rc: RemoteCache) -> None:
    rc.set("forever", 1, ttl=None)
    rc.set("soon", 1, ttl=30)
    assert rc.ttl("forever") is None
    left = rc.ttl("soon")
    assert left is not None and 28 < left <= 30
    assert rc.ttl("missing") == 0.0
    status, doc = node.json("GET", "/ttl/soon")
    assert status == 200 and 28 < doc["ttl"] <= 30 and doc["expires_at"] > 0
    status, doc = node.json("GET", "/ttl/" + "k" * 1025)
    assert status == 400


def test_batch_writes_invalidate_the_nodes_get_cache(node: Node, rc: RemoteCache) -> None:
    rc.set("hot", "old")
    assert rc.get("hot") == "old" and rc.get("hot") == "old"  # now in the node's L1
    rc.set_many({"hot": "new"})
    assert rc.get("hot") == "new"
    rc.delete_many(["hot"])
    assert rc.get("hot") is None
    rc.set("hot", "again")
    assert rc.get("hot") == "again"
    assert rc.pull("hot") == "again" and rc.get("hot") is None
