"""Active-active mesh between real node daemons on 127.0.0.1 (replication/mesh.py, quorum.py).

``MeshCluster`` starts N nodes, each with its own directory, API port and replication port,
every node listing every other one in ``HYPERCACHEIO_PEER_ADDRS``. It composes the helpers of
``cluster_helpers`` / ``node_helpers`` (checksums, ``Node``) so that the fault suite can start
an active-active cluster the same way.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cluster_helpers import checksums, wait_converged
from hypercacheio import Cache
from hypercacheio.errors import NodeUnavailable
from hypercacheio.store import Store
from node_helpers import TOKEN, Node, free_port, wait_until

pytestmark = pytest.mark.timeout(120)


class MeshCluster:
    """``size`` active-active nodes under ``root`` (``root/node-1``, ...). ``configured``
    nodes are in every node's peer list (the extra ones start later: ``start_node``)."""

    def __init__(self, root: str | Path, size: int = 3, *, configured: int | None = None,
                 start: bool = True, token: str = TOKEN,
                 env: Mapping[str, str] | None = None) -> None:
        total = max(size, configured or size)
        self.repl_ports = [free_port() for _ in range(total)]
        self.nodes: list[Node] = []
        for i in range(total):
            peers = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(self.repl_ports) if j != i)
            node = Node(os.path.join(str(root), f"node-{i + 1}"), token=token, extra_env={
                "HYPERCACHEIO_HA_ENABLED": "true",
                "HYPERCACHEIO_PEER_ADDRS": peers,
                "HYPERCACHEIO_REPL_PORT": str(self.repl_ports[i]),
                "HYPERCACHEIO_ANTI_ENTROPY_INTERVAL": "0",
                "HYPERCACHEIO_TIMEOUT": "1",
                **(env or {}),
            })
            self.nodes.append(node)
        self.size = size
        if start:
            for node in self.nodes[:size]:
                node.start()
            assert self.wait_linked(self.nodes[:size])

    @property
    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    @property
    def directories(self) -> list[str]:
        return [n.directory for n in self.running]

    def mesh(self, node: Node) -> dict[str, Any]:
        status, doc = node.json("GET", "/ping")
        assert status == 200, doc
        mesh: dict[str, Any] = doc["mesh"]
        return mesh

    def wait_linked(self, nodes: Sequence[Node], timeout: float = 20.0) -> bool:
        """True once each of ``nodes`` is linked to each other one."""
        want = len(nodes) - 1

        def linked() -> bool:
            return all(sum(p["connected"] for p in self.mesh(n)["peers"]) >= want
                       for n in nodes)
        return wait_until(linked, timeout, 0.05)

    def wait_converged(self, timeout: float = 30.0, nodes: Sequence[Node] | None = None) -> bool:
        return wait_converged([n.directory for n in (nodes or self.running)], timeout)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                try:
                    node.stop()
                except Exception:
                    node.kill()

    def __enter__(self) -> MeshCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    with MeshCluster(tmp_path, 3) as c:
        yield c


def _explain(cluster: MeshCluster) -> str:
    return "\n".join(f"{n.directory}: {checksums([n.directory])} {cluster.mesh(n)}"
                     for n in cluster.running)


def _lib_writes(directory: str, prefix: str, count: int) -> None:
    cache = Cache(directory)
    for i in range(count):
        cache.set(f"{prefix}-{i}", {"i": i, "p": prefix})
    cache.delete(f"{prefix}-0")


def _incr_worker(directory: str, rounds: int) -> None:
    cache = Cache(directory)
    for _ in range(rounds):
        cache.incr("shared-counter", 1)


# ---- convergence ----------------------------------------------------------------------------

def test_writes_on_every_node_converge(cluster: MeshCluster) -> None:
    for n, node in enumerate(cluster.nodes):
        client = node.client()
        for i in range(50):
            client.set(f"api-{n}-{i}", f"v{i}")
        client.delete(f"api-{n}-1")
        _lib_writes(node.directory, f"lib-{n}", 50)
    # the same key written everywhere: one winner, the same on every node
    for node in cluster.nodes:
        node.client().set("contested", node.directory)
    assert cluster.wait_converged(), _explain(cluster)
    count, _ = checksums(cluster.directories)[0]
    assert count == 3 * 49 + 3 * 49 + 1
    for node in cluster.nodes:
        assert node.client().get("api-0-1") is None
        assert node.client().get("lib-2-5") == {"i": 5, "p": "lib-2"}


def test_concurrent_incr_from_all_nodes_gives_the_exact_sum(cluster: MeshCluster) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_incr_worker, args=(node.directory, 200))
             for node in cluster.nodes for _ in range(2)]
    for p in procs:
        p.start()
    for node in cluster.nodes:  # and over the API meanwhile
        client = node.client()
        for _ in range(20):
            client.incr("shared-counter", 1)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want = 3 * 2 * 200 + 3 * 20
    assert wait_until(lambda: all(n.client().get("shared-counter") == want
                                  for n in cluster.nodes), 30, 0.05), \
        [n.client().get("shared-counter") for n in cluster.nodes]
    assert cluster.wait_converged(), _explain(cluster)


# ---- add and locks by majority --------------------------------------------------------------

def test_add_has_one_winner_per_key_cluster_wide(cluster: MeshCluster) -> None:
    from concurrent.futures import ThreadPoolExecutor

    clients = [n.client() for n in cluster.nodes]
    keys = [f"once-{i}" for i in range(15)]

    def try_add(job: tuple[int, str]) -> tuple[str, bool]:
        which, key = job
        for _ in range(20):
            try:
                return key, bool(clients[which].add(key, which))
            except NodeUnavailable:  # contention may leave no majority for a moment
                time.sleep(0.01)
        raise AssertionError("no answer")

    jobs = [(w, k) for k in keys for w in range(3)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(try_add, jobs))
    wins: dict[str, int] = {}
    for key, won in results:
        wins[key] = wins.get(key, 0) + won
    assert all(count == 1 for count in wins.values()), wins
    assert cluster.wait_converged(), _explain(cluster)
    # an add of a key live anywhere fails everywhere afterwards
    assert clients[0].add("solo", 1) is True
    assert not any(c.add("solo", 2) for c in clients)


def test_locks_exclude_across_nodes_and_fail_without_a_majority(cluster: MeshCluster) -> None:
    a, b, c = cluster.nodes
    status, first = a.json("POST", "/lock/res?owner=alpha&ttl=30")
    assert status == 200 and first["acquired"] is True, first
    status, second = b.json("POST", "/lock/res?owner=beta&ttl=30")
    assert status == 200 and second["acquired"] is False, second
    status, released = a.json("DELETE", "/lock/res?owner=alpha")
    assert released["released"] is True
    status, third = c.json("POST", "/lock/res?owner=gamma&ttl=30")
    assert third["acquired"] is True, third
    assert third["fence"] > first["fence"]  # fences grow across the cluster
    c.json("DELETE", "/lock/res?owner=gamma")
    # two nodes down: the third refuses promptly, granting nothing
    a.stop()
    b.stop()
    began = time.monotonic()
    status, doc = c.json("POST", "/lock/other?owner=delta&ttl=30")
    assert status == 503 and doc["code"] == "quorum_unavailable", doc
    assert time.monotonic() - began < 5
    status, doc = c.json("GET", "/lock/other")  # who holds it is a majority's answer too
    assert status == 503 and doc["code"] == "quorum_unavailable", doc
    status, doc = c.json("POST", "/add/newkey", b"1")
    assert status == 503, doc
    assert c.metric("quorum_unavailable_total") == 3  # the lock, its status, the add
    assert c.metric("quorum_granted_total") == 1  # gamma's lock
    status, ping = c.json("GET", "/ping")
    peers = ping["mesh"]["peers"]
    assert [p["connected"] for p in peers] == [False, False]


def test_lock_status_is_what_a_majority_holds(cluster: MeshCluster) -> None:
    a, b, c = cluster.nodes
    c.stop()  # c grants nothing: its own lease table never hears of the lock
    status, taken = a.json("POST", "/lock/job?owner=alpha&ttl=30")
    assert status == 200 and taken["acquired"] is True, taken
    c.start()
    assert cluster.wait_linked(cluster.nodes)
    status, doc = c.json("GET", "/lock/job?owner=alpha")
    assert status == 200, doc
    assert doc["locked"] is True and doc["owned"] is True, doc
    assert doc["fence"] == taken["fence"]
    assert doc["expires_at"] == pytest.approx(taken["expires_at"], abs=0.01)
    status, doc = c.json("GET", "/lock/job?owner=beta")
    assert doc["locked"] is True and doc["owned"] is False, doc
    restored = _ha_cache(cluster, c).restore_lock("job", "alpha")  # the library, on c's host
    assert restored.owned() and restored.fence == taken["fence"]
    assert restored.ttl is not None and 0 < restored.ttl <= 30
    a.json("DELETE", "/lock/job?owner=alpha")
    status, doc = c.json("GET", "/lock/job")
    assert status == 200 and doc["locked"] is False, doc


# ---- failures and joins ---------------------------------------------------------------------

def test_killed_node_catches_up_with_nothing_lost(cluster: MeshCluster) -> None:
    import threading

    a, b, c = cluster.nodes
    local = Cache(c.directory)  # the applications of host c write on while its node is down

    def write_on_c() -> None:
        for i in range(600):
            local.set(f"on-c-{i}", i)
    writer = threading.Thread(target=write_on_c)
    writer.start()
    c.kill()  # SIGKILL, while host c writes
    client_a, client_b = a.client(), b.client()
    for i in range(300):
        client_a.set(f"while-down-a-{i}", i)
        client_b.set(f"while-down-b-{i}", i)
    client_a.delete("while-down-a-7")
    writer.join(60)
    c.start()
    assert cluster.wait_linked(cluster.nodes)
    assert cluster.wait_converged(), _explain(cluster)
    assert checksums(cluster.directories)[0][0] == 600 + 2 * 300 - 1
    assert c.client().get("while-down-b-299") == 299
    assert c.client().get("while-down-a-7") is None
    assert a.client().get("on-c-599") == 599


def test_delete_is_never_undone_by_a_returning_peer(cluster: MeshCluster) -> None:
    a, b, c = cluster.nodes
    a.client().set("doomed", "old")
    assert cluster.wait_converged(), _explain(cluster)
    c.stop()
    a.client().delete("doomed")
    assert wait_until(lambda: b.client().get("doomed") is None, 10, 0.02)
    c.start()  # it still holds "doomed" and its set of it
    assert cluster.wait_linked(cluster.nodes)
    assert cluster.wait_converged(), _explain(cluster)
    assert all(n.client().get("doomed") is None for n in cluster.nodes)


def test_fresh_fourth_node_joins_under_load_and_converges(tmp_path: Path) -> None:
    with MeshCluster(tmp_path, 3, configured=4) as cluster:
        clients = [n.client() for n in cluster.nodes[:3]]
        for i in range(1500):
            clients[i % 3].set(f"before-{i}", i)
        fourth = cluster.nodes[3]
        fourth.start()
        for i in range(300):  # writes go on while it joins
            clients[i % 3].set(f"during-{i}", i)
        assert cluster.wait_linked(cluster.nodes)
        assert cluster.wait_converged(), _explain(cluster)
        assert fourth.client().get("before-1499") == 1499
        # it bootstrapped from a snapshot (an empty store), not only from the streams
        assert cluster.mesh(fourth)["bootstrapped"] is True
        # the others' oplogs waited for it (registered by address before it ever came):
        # no one found it behind its oplog
        assert not any(p["resyncs_asked"] for n in cluster.nodes
                       for p in cluster.mesh(n)["peers"])


def test_peer_with_the_wrong_token_is_refused_and_changes_nothing(cluster: MeshCluster,
                                                                  tmp_path: Path) -> None:
    cluster.nodes[0].client().set("k", "v")
    assert cluster.wait_converged()
    before = checksums(cluster.directories)
    intruder = Node(str(tmp_path / "intruder"), token="wrong-token-" + "x" * 20, extra_env={
        "HYPERCACHEIO_HA_ENABLED": "true",
        "HYPERCACHEIO_PEER_ADDRS": f"127.0.0.1:{cluster.repl_ports[0]}",
        "HYPERCACHEIO_REPL_PORT": str(free_port()),
        "HYPERCACHEIO_ANTI_ENTROPY_INTERVAL": "0",
    })
    intruder.start()
    try:
        intruder.client().set("evil", "x")
        assert wait_until(lambda: cluster.mesh(cluster.nodes[0])["handshakes_refused"] > 0,
                          10, 0.05)
        assert checksums(cluster.directories) == before
        assert cluster.nodes[0].client().get("evil") is None
    finally:
        intruder.stop()


def test_snapshot_store_helpers_agree(tmp_path: Path) -> None:
    """A sanity check of the helpers the tests above rely on: a checksum differs when one
    store holds a row the other lacks (so a convergence check can fail)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    Store(one).close()
    s = Store(two)
    s.set("x", 1, 1, None)
    s.close()
    assert checksums([one])[0] != checksums([two])[0]


def _ha_cache(cluster: MeshCluster, node: Node) -> Cache:
    """A library Cache on ``node``'s directory configured for active-active."""
    return Cache(node.directory, peer_addrs=node.env["HYPERCACHEIO_PEER_ADDRS"],
                 node_port=node.port, api_token=node.token, timeout=2.0)


def test_library_cache_add_and_locks_are_cluster_wide(cluster: MeshCluster) -> None:
    one, two = _ha_cache(cluster, cluster.nodes[0]), _ha_cache(cluster, cluster.nodes[1])
    assert one.add("lib-once", "first") is True
    assert two.add("lib-once", "second") is False  # decided by a majority, not locally
    assert two.get("lib-once") in (None, "first")
    lock = one.lock("lib-lock", ttl=30)
    assert lock.acquire(blocking=False)
    assert not two.lock("lib-lock", ttl=30).acquire(blocking=False)
    first_fence = lock.fence
    lock.release()
    other = two.lock("lib-lock", ttl=30)
    assert other.acquire(blocking=False)
    assert other.fence is not None and first_fence is not None and other.fence > first_fence
    other.release()
    # the relaxing setting: a local add (off by default)
    local = Cache(cluster.nodes[2].directory, peer_addrs="127.0.0.1:1", node_port=1,
                  api_token=TOKEN, ha_local_add=True)
    assert local.add("only-here", 1) is True


def test_peer_behind_the_trimmed_oplog_is_resynced_from_a_snapshot(tmp_path: Path) -> None:
    with MeshCluster(tmp_path, 3, start=False) as cluster:
        one, two, three = cluster.nodes
        one.start()
        two.start()
        assert cluster.wait_linked([one, two])
        client = one.client()
        for i in range(200):
            client.set(f"early-{i}", i)
        assert cluster.wait_converged(nodes=[one, two])

        # node three is registered (the oplog waits for it): as if it had been away for
        # longer than the tombstone window, its position is dropped
        store = Store(one.directory)
        assert store.peer_forget(f"mesh:127.0.0.1:{cluster.repl_ports[2]}")
        store.close()

        def trimmed() -> bool:  # node two acknowledged it all: the oplog may go
            store = Store(one.directory)
            try:
                store.purge_expired()
                return store.oplog_bounds().oldest > store.oplog_bounds().last
            finally:
                store.close()
        assert wait_until(trimmed, 10, 0.05)
        seeded = Store(three.directory)  # not empty: no bootstrap of its own accord
        seeded.set("three-before", 1, 1, None)
        seeded.close()
        three.start()
        assert cluster.wait_linked(cluster.nodes)
        assert cluster.wait_converged(), _explain(cluster)
        assert cluster.mesh(three)["bootstrapped"] is True
        assert three.client().get("early-0") == 0
        client.set("after-resync", 1)  # and the stream to it goes on
        assert wait_until(lambda: three.client().get("after-resync") == 1, 10, 0.02)


def test_anti_entropy_repairs_what_the_stream_missed(tmp_path: Path) -> None:
    import sqlite3

    from hypercacheio.codec import TAG_INT
    from hypercacheio.store.clock import wall_hlc
    from hypercacheio.store.schema import DB_NAME

    with MeshCluster(tmp_path, 2, env={"HYPERCACHEIO_ANTI_ENTROPY_INTERVAL": "0.3"}) as cluster:
        one, two = cluster.nodes
        one.client().set("base", 1)
        assert cluster.wait_converged()
        node_id = cluster.mesh(two)["node_id"]
        two.stop()
        # a row that never went through the oplog (as in a store restored from a backup)
        db = sqlite3.connect(os.path.join(two.directory, DB_NAME))
        with db:
            db.execute("INSERT INTO entries(key, tag, value, expire_at, size, hlc, node) "
                       "VALUES ('behind-its-back', ?, 7, NULL, 16, ?, ?)",
                       (TAG_INT, wall_hlc(time.time()), node_id))
        db.close()
        two.start()
        assert cluster.wait_linked(cluster.nodes)
        assert wait_until(lambda: one.client().get("behind-its-back") == 7, 15, 0.05)
        assert cluster.wait_converged(), _explain(cluster)


def test_reordered_duplicated_or_replayed_batches_change_nothing(tmp_path: Path) -> None:
    """In process: a peer link (as node A) sends A's records to B's mesh, then the same
    batch again, reversed, split and over a new connection: B ends as A, and the copies
    apply nothing."""
    import asyncio

    from hypercacheio.config import Settings
    from hypercacheio.replication.frames import encode_batch
    from hypercacheio.replication.link import PeerLink
    from hypercacheio.replication.mesh import Mesh
    from hypercacheio.replication.wire import Identity

    a = Store(str(tmp_path / "a"), clustered=True)
    a.mark_clustered(True, multi_writer=True)
    for i in range(20):
        a.set(f"k{i}", 0, i, None)
    a.incr("n", 5, None)
    a.delete("k3")
    a.incr("n", 2, None)
    records = a.oplog_since(0, 1000)
    b = Store(str(tmp_path / "b"))
    settings = Settings(directory=str(tmp_path / "b"), peer_addrs=(), repl_port=free_port(),
                        api_token=TOKEN, anti_entropy_interval=0)
    mesh = Mesh(b, settings, TOKEN)
    mesh.start()
    try:
        async def send(batches: list[list[Any]]) -> None:
            link = PeerLink("127.0.0.1", settings.repl_port,
                            Identity(settings.cluster_id, a.node_id, TOKEN))
            link.start()
            await link.wait_up(5)
            for batch in batches:
                await link.send([encode_batch(a.node_id, batch)])
            for _ in range(500):  # every batch acknowledged (so applied)
                if link.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert link.in_flight == 0
            await link.stop()

        asyncio.run(send([records]))
        assert b.live_digest() == a.live_digest()
        assert b.get("n") is not None and b.get("n")[1] == 7
        applied = mesh.applied_total
        asyncio.run(send([records, list(reversed(records)), records[5:], records[:5]]))
        assert mesh.applied_total == applied  # every copy skipped
        assert b.live_digest() == a.live_digest()
        counter = b.get("n")
        assert counter is not None and counter[1] == 7  # contributions count once
    finally:
        mesh.stop()
        a.close()
        b.close()


def test_lock_without_ttl_is_provisional_until_fenced(tmp_path: Path) -> None:
    """A grantor's view of a proposer that dies between the grant and the fence step: the
    lease of a lock without ttl ends after CLAIM_SECONDS instead of never; fenced, it is
    permanent; an owner already holding it without end keeps it so."""
    from hypercacheio.replication.quorum import CLAIM_SECONDS, Quorum

    store = Store(str(tmp_path / "grantor"))
    grantor = Quorum(types.SimpleNamespace(store=store, size=3))  # type: ignore[arg-type]
    try:
        now = store.clock()
        answer = grantor.handle({"k": "grant", "name": "job", "owner": "o1", "exp": None,
                                 "prov": now + CLAIM_SECONDS})
        assert answer["ok"] is True
        info = store.lock_info("job")
        assert info is not None and info[1] == pytest.approx(now + CLAIM_SECONDS, abs=0.5)
        assert grantor.handle({"k": "fence", "name": "job", "owner": "o1", "fence": 7,
                               "final": True, "exp": None})["ok"] is True
        assert store.lock_info("job") == ("o1", None, 7)
        # the same owner asking again (its proposer may die too): still held without end
        assert grantor.handle({"k": "grant", "name": "job", "owner": "o1", "exp": None,
                               "prov": store.clock() + CLAIM_SECONDS})["ok"] is True
        held = store.lock_info("job")
        assert held is not None and held[1] is None
        assert grantor.handle({"k": "grant", "name": "job", "owner": "o2", "exp": None,
                               "prov": store.clock() + CLAIM_SECONDS})["ok"] is False
    finally:
        store.close()


def test_lock_without_ttl_is_permanent_on_every_granting_node(cluster: MeshCluster) -> None:
    a = cluster.nodes[0]
    status, taken = a.json("POST", "/lock/forever?owner=alpha")
    assert status == 200 and taken["acquired"] is True, taken
    for node in cluster.nodes:
        store = Store(node.directory)
        try:
            assert store.lock_info("forever") == ("alpha", None, taken["fence"])
        finally:
            store.close()
    a.json("DELETE", "/lock/forever?owner=alpha")
