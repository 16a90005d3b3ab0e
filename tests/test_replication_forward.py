"""Writes on a secondary host go to the primary (replication/forward.py, node/forward_routes.py).

Real node daemons on 127.0.0.1 (a primary and two secondaries, each with its own directory,
``cluster_helpers.Cluster``) and real processes. A "lone host" is a secondary host whose
directory the primary does not push to: what it reads after its own write can only come
from applying the primary's answer, not from the push.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster_helpers import Cluster, store_checksum
from hypercacheio import Cache, RemoteCache
from hypercacheio.errors import AuthError, NodeUnavailable
from hypercacheio.node import protocol as p
from hypercacheio.replication.forward import SecondaryCache, secondary_class
from hypercacheio.replication.records import DELETE, SET, Record
from hypercacheio.store import DB_NAME, Store
from node_helpers import TOKEN, Node, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), secondaries=2) as started:
        yield started


def secondary(directory: str | Path, primary: Node, **options: Any) -> Cache:
    """A Cache of a secondary host: ``directory`` its store, ``primary`` the primary's node."""
    return Cache(str(directory), role="secondary", primary_url=primary.url, api_token=TOKEN,
                 **options)


def version_of(directory: str, key: str) -> tuple[int, str, int] | None:
    """(hlc, node, tag) of a key's row in the store of ``directory`` (tombstones included)."""
    conn = sqlite3.connect(os.path.join(directory, DB_NAME))
    try:
        row = conn.execute("SELECT hlc, node, tag FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]), int(row[2]))
    finally:
        conn.close()


def hlc_of(directory: str, key: str) -> int:
    """The version of a key's row in the store of ``directory``."""
    row = version_of(directory, key)
    assert row is not None, key
    return row[0]


def primary_records(directory: str, prefix: str) -> list[Record]:
    """The rows (and tombstones) of keys under ``prefix`` as the push would carry them."""
    conn = sqlite3.connect(os.path.join(directory, DB_NAME))
    try:
        rows = conn.execute("SELECT key, tag, value, expire_at, hlc, node FROM entries "
                            "WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")).fetchall()
    finally:
        conn.close()
    return [Record(0, DELETE, key, None, None, expire_at, hlc, node) if tag == -1 else
            Record(0, SET, key, tag, value, expire_at, hlc, node)
            for key, tag, value, expire_at, hlc, node in rows]


def host_process(directory: str, env_extra: dict[str, str], code: str,
                 *args: str) -> subprocess.Popen[str]:
    """A process of a host: ``code`` runs with ``cache = Cache.from_env()`` of that host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({"HYPERCACHEIO_SQLITE_PATH": directory, "HYPERCACHEIO_API_TOKEN": TOKEN,
                "HYPERCACHEIO_TIMEOUT": "5", **env_extra})
    script = "import sys, json\nfrom hypercacheio import Cache\ncache = Cache.from_env()\n" + code
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def hosts(cluster: Cluster) -> list[tuple[str, dict[str, str]]]:
    """(directory, environment) of each host: the primary's, then each secondary's."""
    primary = cluster.primary
    return [(primary.directory, {"HYPERCACHEIO_SERVER_ROLE": "primary"})] + [
        (node.directory, {"HYPERCACHEIO_SERVER_ROLE": "secondary",
                          "HYPERCACHEIO_PRIMARY_URL": primary.url})
        for node in cluster.secondaries]


def outputs(procs: list[subprocess.Popen[str]]) -> list[str]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(out)
    return results


# ---- the library on every host -------------------------------------------------------------

def test_incr_from_every_host_and_process_gives_the_exact_total(cluster: Cluster) -> None:
    rounds, per_host = 60, 2
    code = ("for _ in range(int(sys.argv[1])):\n"
            "    cache.incr('forward:counter')\n"
            "    cache.decr('forward:down', 2)\n")
    procs = [host_process(directory, env, code, str(rounds))
             for directory, env in hosts(cluster) for _ in range(per_host)]
    outputs(procs)
    total = rounds * per_host * 3
    assert Cache(cluster.primary.directory).get("forward:counter") == total
    assert Cache(cluster.primary.directory).get("forward:down") == -2 * total
    assert cluster.wait_converged()
    for node in cluster.secondaries:
        assert Cache(node.directory).get("forward:counter") == total
        assert Cache(node.directory).get("forward:down") == -2 * total


def test_add_of_the_same_keys_from_every_host_has_one_winner(cluster: Cluster) -> None:
    code = ("won = [i for i in range(40) if cache.add(f'forward:add:{i}', sys.argv[1])]\n"
            "print(json.dumps(won))\n")
    procs = [host_process(directory, env, code, f"{n}-{i}")
             for n, (directory, env) in enumerate(hosts(cluster)) for i in range(2)]
    names = [f"{n}-{i}" for n in range(3) for i in range(2)]
    winners: dict[int, list[str]] = {}
    for name, out in zip(names, outputs(procs), strict=True):
        for key in json.loads(out):
            winners.setdefault(key, []).append(name)
    assert sorted(winners) == list(range(40))
    assert all(len(names) == 1 for names in winners.values()), winners
    primary = Cache(cluster.primary.directory)
    for key, (name,) in winners.items():
        assert primary.get(f"forward:add:{key}") == name
    assert cluster.wait_converged()
    for node in cluster.secondaries:
        local = Cache(node.directory)
        assert all(local.get(f"forward:add:{k}") == n for k, (n,) in winners.items())


def test_a_lock_from_one_secondary_blocks_the_other_and_the_primary(cluster: Cluster) -> None:
    s1, s2 = (secondary(node.directory, cluster.primary) for node in cluster.secondaries)
    on_primary = Cache(cluster.primary.directory)
    through_node = cluster.secondaries[1].client()
    lock = s1.lock("forward:job", ttl=30)
    assert lock.acquire(blocking=False)
    first = lock.fence
    assert not s2.lock("forward:job").acquire(blocking=False)
    assert not on_primary.lock("forward:job").acquire(blocking=False)
    assert not through_node.lock("forward:job").acquire(blocking=False)
    assert s2.lock("forward:job").locked() and not s2.lock("forward:job").owned()
    assert s1.restore_lock("forward:job", lock.owner).fence == first
    assert lock.release()
    second = s2.lock("forward:job")
    assert second.acquire(blocking=False)
    third = on_primary.lock("forward:other")
    assert third.acquire(blocking=False)
    # One authority: the fences of the grants grow across hosts.
    assert first is not None and second.fence is not None and third.fence is not None
    assert first < second.fence < third.fence
    second.release()
    third.release()
    # No lock row was ever written on the secondaries' own stores.
    for node in cluster.secondaries:
        assert Store(node.directory).lock_info("forward:job") is None


# ---- read-your-writes --------------------------------------------------------------------------

def test_read_your_writes_with_the_primarys_version_and_the_push_then_skipped(
        cluster: Cluster, tmp_path: Path) -> None:
    lone = secondary(tmp_path / "lone", cluster.primary)  # the primary never pushes here
    assert type(lone) is SecondaryCache
    other = Cache(str(tmp_path / "lone"))  # another process's view of the same host
    assert lone.set("ryw:a", {"v": 1}, ttl=300) is True
    assert other.get("ryw:a") == {"v": 1}
    assert lone.incr("ryw:n", 5) == 5 and lone.decr("ryw:n") == 4
    assert other.get("ryw:n") == 4
    assert lone.add("ryw:b", "first") and not lone.add("ryw:b", "second")
    assert other.get("ryw:b") == "first"
    lone.set_many({"ryw:m1": 1, "ryw:m2": b"two"}, ttl=600)
    assert other.get_many(["ryw:m1", "ryw:m2"]) == {"ryw:m1": 1, "ryw:m2": b"two"}
    assert lone.touch("ryw:m1", 1000) and 990 < (other.ttl("ryw:m1") or 0) <= 1000
    assert lone.pull("ryw:m2") == b"two" and other.get("ryw:m2") is None
    assert lone.delete("ryw:b") and other.get("ryw:b") is None
    assert lone.delete_many(["ryw:m1", "ryw:none"]) == 1 and other.get("ryw:m1") is None
    assert lone.set("ryw:gone", 1) and lone.set("ryw:gone", 2, ttl=0)
    assert other.get("ryw:gone") is None
    assert lone.remember("ryw:r", 60, lambda: "computed") == "computed"
    assert other.get("ryw:r") == "computed"
    assert lone.forever("ryw:f", "kept") and other.ttl("ryw:f") is None
    # Every row (and tombstone) here is the primary's, with the primary's version.
    primary_id = Store(cluster.primary.directory).node_id
    for key in ("ryw:a", "ryw:n", "ryw:m2", "ryw:b", "ryw:m1", "ryw:gone", "ryw:r", "ryw:f"):
        mine = version_of(lone.store.directory, key)
        assert mine is not None and mine == version_of(cluster.primary.directory, key), key
        assert mine[1] == primary_id
    # The push of the same records (the primary's rows, at their versions) changes nothing.
    pushed = primary_records(cluster.primary.directory, "ryw:")
    assert len(pushed) == 8
    assert lone.store.apply(pushed) == (0, 8)


def test_read_your_writes_of_a_clear(cluster: Cluster, tmp_path: Path) -> None:
    lone = secondary(tmp_path / "lone", cluster.primary)
    lone.set("clear:a", 1)
    assert Cache(str(tmp_path / "lone")).get("clear:a") == 1
    lone.clear()
    assert Cache(str(tmp_path / "lone")).get("clear:a") is None
    assert Cache(cluster.primary.directory).get("clear:a") is None
    # The primary's clear reached every secondary too, and nothing written later is lost.
    lone.set("clear:after", 2)
    assert cluster.wait_converged()


def test_a_touch_brings_the_primarys_row_not_a_stale_local_copy(
        cluster: Cluster, tmp_path: Path) -> None:
    lone = secondary(tmp_path / "lone", cluster.primary)
    lone.set("touch:k", "old", ttl=60)
    Cache(cluster.primary.directory).set("touch:k", "new", ttl=60)  # not pushed to lone
    assert lone.get("touch:k") == "old"
    assert lone.touch("touch:k", 500)
    assert Cache(str(tmp_path / "lone")).get("touch:k") == "new"
    assert version_of(lone.store.directory, "touch:k") == version_of(
        cluster.primary.directory, "touch:k")
    assert not lone.touch("touch:missing", 5)


def test_incr_create_false_and_errors_come_from_the_primary(
        cluster: Cluster, tmp_path: Path) -> None:
    lone = secondary(tmp_path / "lone", cluster.primary)
    with pytest.raises(KeyError):
        lone.incr("errors:missing", create=False)
    assert Cache(cluster.primary.directory).get("errors:missing") is None
    lone.set("errors:text", "abc")
    with pytest.raises(TypeError):
        lone.incr("errors:text")
    lone.set("errors:big", 2**63 - 1)
    with pytest.raises(OverflowError):
        lone.incr("errors:big")


def test_a_subclass_keeps_its_methods_and_its_super_calls_forward(
        cluster: Cluster, tmp_path: Path) -> None:
    class Counting(Cache):
        sets = 0

        def set(self, key: str, value: Any, ttl: Any = None) -> bool:
            Counting.sets += 1
            return super().set(key, value, ttl)

    cache = Counting(str(tmp_path / "sub"), role="secondary", primary_url=cluster.primary.url,
                     api_token=TOKEN)
    assert isinstance(cache, Counting) and isinstance(cache, SecondaryCache)
    assert type(cache) is secondary_class(Counting)
    cache.set("sub:k", 1)
    assert Counting.sets == 1
    assert Cache(cluster.primary.directory).get("sub:k") == 1
    assert type(Counting(str(tmp_path / "plain"))) is Counting  # the default role: as it is


def test_a_cache_in_the_default_role_is_a_plain_cache(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path))
    assert type(cache) is Cache
    assert "_primary" not in vars(cache)


def test_a_wrong_token_is_refused_and_nothing_is_written_here(
        cluster: Cluster, tmp_path: Path) -> None:
    lone = Cache(str(tmp_path / "lone"), role="secondary", primary_url=cluster.primary.url,
                 api_token="not-the-token")
    with pytest.raises(AuthError):
        lone.set("token:k", 1)
    assert lone.get("token:k") is None
    assert Cache(cluster.primary.directory).get("token:k") is None


# ---- the primary down --------------------------------------------------------------------------

def test_a_primary_that_never_answers_fails_writes_within_the_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        cache = Cache(str(tmp_path / "host"), role="secondary", api_token=TOKEN, timeout=0.3,
                      primary_url=f"http://127.0.0.1:{port}/api/hypercacheio")
        before = cache.store.live_digest(versions=True)
        for write in (lambda: cache.set("k", 1), lambda: cache.incr("n"),
                      lambda: cache.add("a", 1), lambda: cache.delete("k"),
                      lambda: cache.lock("L").acquire(blocking=False)):
            started = time.monotonic()
            with pytest.raises(NodeUnavailable):
                write()
            assert time.monotonic() - started < 3.0  # 0.3 s, generously
        assert cache.store.live_digest(versions=True) == before


def test_primary_down_writes_fail_promptly_reads_go_on(tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=1, secondary_env={"HYPERCACHEIO_TIMEOUT": "0.5"}) as c:
        (node,) = c.secondaries
        lib = secondary(node.directory, c.primary, timeout=0.5)
        lib.set("down:k", "v")
        assert c.wait_converged()
        c.primary.kill()
        before = store_checksum(node.directory)
        api = node.client(timeout=5)
        for write in (lambda: lib.set("down:k", "w"), lambda: lib.incr("down:n"),
                      lambda: lib.clear(), lambda: api.set("down:k", "w"),
                      lambda: api.delete("down:k"), lambda: api.incr("down:n")):
            started = time.monotonic()
            with pytest.raises(NodeUnavailable):
                write()
            assert time.monotonic() - started < 4.0
        status, doc = node.json("POST", "/incr/down:n")
        assert status == 503 and doc["code"] == "primary_unavailable"
        assert node.metric("forward_failures_total") == 4
        assert node.metric("forwarded_total") == 0
        assert store_checksum(node.directory) == before
        assert lib.get("down:k") == "v" and api.get("down:k") == "v"
        c.primary.start()  # back: writes go through again
        assert wait_until(lambda: _writes(lib), 10)


def _writes(cache: Cache) -> bool:
    try:
        return cache.set("down:k", "again")
    except NodeUnavailable:
        return False


# ---- a secondary's node API --------------------------------------------------------------------

@pytest.fixture
def lone_node(cluster: Cluster, tmp_path: Path) -> Iterator[Node]:
    """A secondary node the primary does not push to (its reads show only what it applied)."""
    with Node(str(tmp_path / "lone-node"), extra_env={
            "HYPERCACHEIO_SERVER_ROLE": "secondary",
            "HYPERCACHEIO_PRIMARY_URL": cluster.primary.url}) as node:
        yield node


def test_writes_through_a_secondary_node_are_the_primarys_and_read_here_at_once(
        cluster: Cluster, lone_node: Node) -> None:
    node = lone_node
    api = node.client()
    local = Cache(node.directory)
    assert api.set("api:a", [1, 2], ttl=300) and local.get("api:a") == [1, 2]
    assert api.incr("api:n", 3) == 3 and local.get("api:n") == 3
    assert api.add("api:b", 1) and not api.add("api:b", 2) and local.get("api:b") == 1
    assert api.touch("api:b", 900) and 890 < (local.ttl("api:b") or 0) <= 900
    assert not api.touch("api:missing", 9)
    api.set_many({"api:m1": "x", "api:m2": "y"})
    assert local.get_many(["api:m1", "api:m2"]) == {"api:m1": "x", "api:m2": "y"}
    assert api.delete_many(["api:m1"]) == 1 and local.get("api:m1") is None
    assert api.pull("api:m2") == "y" and local.get("api:m2") is None
    assert api.delete("api:a") and local.get("api:a") is None
    for key in ("api:n", "api:b", "api:m1", "api:a"):
        assert version_of(node.directory, key) == version_of(cluster.primary.directory, key)
    # The answer carries the primary's version headers through.
    status, headers, _ = node.request("POST", "/cache/api:h", b"1",
                                      {p.TYPE_HEADER: "int"})
    assert status == 200
    assert headers[p.VERSION_HEADER.lower()] == str(
        hlc_of(cluster.primary.directory, "api:h"))
    # A malformed request is refused here and never reaches the primary.
    status, doc = node.json("POST", "/cache/api:bad?ttl=soon", b"1")
    assert status == 400
    assert Cache(cluster.primary.directory).get("api:bad") is None
    # Keys and owners pass through as sent (escapes kept, nothing decoded twice).
    odd = "api:odd/ key%2F..é&x=1?"
    assert api.set(odd, 1) and local.get(odd) == 1
    assert Cache(cluster.primary.directory).get(odd) == 1
    # Locks through the node are the primary's.
    lock = api.lock("api:lock/é", ttl=30, owner="owner é&x=1")
    assert lock.acquire(blocking=False) and lock.owned()
    assert not Cache(cluster.primary.directory).lock("api:lock/é").acquire(blocking=False)
    assert lock.release()


def test_incr_through_both_secondary_nodes_and_the_primary_from_threads(
        cluster: Cluster) -> None:
    clients = [node.client() for node in cluster.nodes]

    def bump(client: RemoteCache) -> None:
        for _ in range(50):
            client.incr("api:threads")

    threads = [threading.Thread(target=bump, args=(c,)) for c in clients for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert cluster.primary.client().get("api:threads") == 300
    assert cluster.wait_converged()


# ---- the version of a write on the primary ----------------------------------------------------

def test_the_store_keeps_each_threads_last_version(tmp_path: Path) -> None:
    store = Store(str(tmp_path), clustered=True)
    assert store.last_version() == 0
    store.set("a", 0, 1, None)
    first = store.last_version()
    assert first == hlc_of(store.directory, "a")
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(store.last_version()))
    thread.start()
    thread.join()
    assert seen == [0]  # another thread's writes are not this one's
    assert not store.add("a", 0, 2, None)
    assert store.last_version() == first  # wrote nothing: no new version
    store.delete("a")
    assert store.last_version() == hlc_of(store.directory, "a") > first
    plain = Store(str(tmp_path / "plain"))  # not clustered: the one-statement set
    plain.set("b", 0, 1, None)
    assert plain.last_version() == hlc_of(plain.directory, "b")


def test_a_primarys_write_answers_carry_its_version(cluster: Cluster) -> None:
    primary = cluster.primary
    node_id = Store(primary.directory).node_id
    status, headers, _ = primary.request("POST", "/cache/ver:k?ttl=60", b"v")
    assert status == 200
    assert headers[p.VERSION_HEADER.lower()] == str(hlc_of(primary.directory, "ver:k"))
    assert headers[p.ORIGIN_HEADER.lower()] == node_id
    status, headers, body = primary.request("POST", "/incr/ver:n?delta=2&ttl=60")
    assert status == 200 and json.loads(body) == {"value": 2}
    assert float(headers[p.EXPIRES_HEADER.lower()]) > time.time() + 50
    status, headers, _ = primary.request("POST", "/add/ver:k", b"x")
    assert status == 200 and p.VERSION_HEADER.lower() not in headers  # not added: no version
    status, headers, body = primary.request("POST", "/touch/ver:k?ttl=30",
                                            headers={p.RETURN_HEADER: "row"})
    assert status == 200 and body == b"v"
    assert headers[p.VERSION_HEADER.lower()] == str(hlc_of(primary.directory, "ver:k"))
    status, _, _ = primary.request("POST", "/incr/ver:none?create=false")
    assert status == 404
    assert Cache(primary.directory).get("ver:none") is None


def test_import_does_not_load_the_http_client_for_a_secondary_cache_module() -> None:
    code = ("import sys, hypercacheio, hypercacheio.replication.forward\n"
            "assert 'hypercacheio.node.client' not in sys.modules\n"
            "assert 'urllib3' not in sys.modules and 'aiohttp' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_a_primary_that_sends_no_version_is_named_once_and_nothing_is_written_here(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import http.server

    from hypercacheio.replication import forward

    class OldPrimary(http.server.BaseHTTPRequestHandler):  # answers as a node without versions
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"stored": true, "expires_at": null}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OldPrimary)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        forward._warned.clear()
        cache = Cache(str(tmp_path), role="secondary", api_token=TOKEN,
                      primary_url=f"http://127.0.0.1:{server.server_port}/api/hypercacheio")
        with caplog.at_level("WARNING", "hypercacheio.replication.forward"):
            assert cache.set("k", 1) and cache.set("k", 2)
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "without its version" in caplog.records[0].message
        assert cache.get("k") is None  # never a local write without the primary's version
    finally:
        server.shutdown()
        server.server_close()
