"""The primary's push to its secondaries, with real node processes on 127.0.0.1 (each with its
own directory): stores compared whole by a checksum of their live rows.

The issue's "secondary started empty after 100,000 writes" runs here with 20,000 writes (the
suite's time budget); ``benchmarks/bench_replication.py`` runs the larger sizes.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_helpers import Cluster, replication_status, store_checksum, wait_converged
from hypercacheio import Cache
from hypercacheio.codec import TAG_STR
from hypercacheio.replication.frames import encode_batch
from hypercacheio.replication.records import SET, Record
from hypercacheio.store import Store
from node_helpers import TOKEN, Node, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, secondaries=2) as c:
        yield c


def _cache(node: Node) -> Cache:
    return Cache(node.directory, l1_max_items=0, default_ttl=None)


def _writer_process(directory: str, count: int, prefix: str) -> subprocess.Popen[bytes]:
    code = (
        "import sys\n"
        "from hypercacheio import Cache\n"
        "c = Cache(sys.argv[1], l1_max_items=0, default_ttl=None)\n"
        "for i in range(int(sys.argv[2])):\n"
        "    c.set(f'{sys.argv[3]}{i}', {'n': i})\n"
        "    if i % 7 == 0: c.incr(f'{sys.argv[3]}count')\n"
        "c.close()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, directory, str(count), prefix])


def _get(node: Node, key: str) -> tuple[int, bytes]:
    status, _, body = node.request("GET", f"/cache/{key}")
    return status, body


# ---- convergence -------------------------------------------------------------------------

def test_writes_from_processes_and_the_api_converge_on_every_secondary(
        cluster: Cluster) -> None:
    primary, (s1, s2) = cluster.primary, cluster.secondaries
    api = primary.client()
    api.set("api:fill", "old")
    assert cluster.wait_converged()
    assert _get(s1, "api:fill") == (200, b"old")  # now in s1's GET memory ...
    writers = [_writer_process(primary.directory, 300, f"proc{n}:") for n in range(2)]
    cache = _cache(primary)
    try:
        for i in range(300):
            cache.set(f"lib:{i}", b"\x00" * (i % 50))
        cache.set_many({f"many:{i}": i for i in range(100)})
        cache.delete_many([f"many:{i}" for i in range(0, 100, 3)])
        for _ in range(25):
            cache.incr("lib:counter")
        cache.touch("lib:1", 3600)
        api.set("api:fill", "new")  # ... which must not answer the old value afterwards
        api.set("api:str", "é" * 10)
        api.delete("lib:2")
        api.incr("api:counter", 5)
        api.set_many({f"api:many:{i}": [i] for i in range(50)})
        for proc in writers:
            assert proc.wait(60) == 0
    finally:
        cache.close()
    assert cluster.wait_converged(), [store_checksum(d) for d in cluster.directories]
    count, _ = store_checksum(primary.directory)
    assert count > 900
    for node in (s1, s2):
        assert _get(node, "api:fill") == (200, b"new")
        assert _get(node, "lib:2")[0] == 404
        assert node.client().get("lib:counter") == 25
        assert node.client().get("proc1:299") == {"n": 299}
    assert cluster.wait_acked()
    rows = replication_status(primary)
    assert all(r["connected"] and r["last_error"] is None for r in rows.values())


def test_a_clear_on_the_primary_clears_every_secondary(cluster: Cluster) -> None:
    api = cluster.primary.client()
    api.set_many({f"k{i}": i for i in range(200)})
    assert cluster.wait_converged()
    api.clear()
    api.set("after", 1)
    assert cluster.wait_converged()
    assert store_checksum(cluster.secondaries[0].directory)[0] == 1


# ---- failures of a secondary -------------------------------------------------------------

def test_a_secondary_killed_during_a_burst_gets_every_acknowledged_write(
        tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=2) as cluster:
        victim = cluster.secondaries[0]
        cache = _cache(cluster.primary)
        done = threading.Event()
        written = [0]

        def burst() -> None:
            i = 0
            while not done.is_set() and i < 20_000:
                cache.set(f"burst:{i % 3000}", i)  # overwrites too: the last value must win
                if i % 11 == 0:
                    cache.delete(f"burst:{(i * 7) % 3000}")
                i += 1
                written[0] = i

        thread = threading.Thread(target=burst)
        thread.start()
        try:
            assert wait_until(lambda: written[0] > 1500, 30)
            victim.kill()  # kill -9 mid-stream
            at_kill = written[0]
            assert wait_until(lambda: written[0] > at_kill + 1500, 30)
            victim.start()
            assert wait_until(lambda: written[0] > at_kill + 3000, 30)
        finally:
            done.set()
            thread.join(60)
            cache.close()
        assert cluster.wait_converged(60), [store_checksum(d) for d in cluster.directories]
        assert cluster.wait_acked()
        row = replication_status(cluster.primary)[victim.url]
        assert row["snapshots_sent"] == 1  # the first contact only: it resumed from its position
        assert row["errors"] > 0  # it did see the secondary fail


def test_a_new_secondary_converges_by_snapshot_while_writes_continue(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, secondaries=1, start=False)
    late = cluster.secondaries[0]
    try:
        cluster.primary.start()  # its secondary is not there yet
        cache = _cache(cluster.primary)
        for base in range(0, 20_000, 2000):
            cache.set_many({f"pre:{i:06}": f"v{i}" for i in range(base, base + 2000)})
        cache.delete_many([f"pre:{i:06}" for i in range(0, 20_000, 9)])
        done = threading.Event()

        def keep_writing() -> None:
            i = 0
            while not done.is_set():
                cache.set(f"pre:{(i * 13) % 20_000:06}", f"during{i}")
                cache.delete(f"pre:{(i * 17) % 20_000:06}")
                i += 1

        thread = threading.Thread(target=keep_writing)
        thread.start()
        try:
            late.start()
            assert wait_until(lambda: replication_status(cluster.primary)[late.url][
                "snapshots_sent"] == 1, 60)
        finally:
            done.set()
            thread.join(30)
            cache.close()
        assert cluster.wait_converged(60), [store_checksum(d) for d in cluster.directories]
        row = replication_status(cluster.primary)[late.url]
        assert row["snapshot_rows_sent"] >= 17_000 and row["rows_sent"] > 0
    finally:
        cluster.stop()


def test_rows_written_before_the_store_was_clustered_reach_a_new_secondary(
        tmp_path: Path) -> None:
    """No write follows them: the primary's handshake finds the secondary empty (a snapshot),
    not the oplog's position 0 (which holds none of them)."""
    cluster = Cluster(tmp_path, secondaries=1, start=False)
    store = Store(cluster.primary.directory)
    try:
        store.set_many([(f"old:{i}", TAG_STR, "v", None) for i in range(500)])
        assert store.oplog_position() == 0
    finally:
        store.close()
    try:
        cluster.start()
        assert cluster.wait_converged(30)
        assert store_checksum(cluster.secondaries[0].directory)[0] == 500
    finally:
        cluster.stop()


def test_a_secondary_recreated_empty_gets_a_snapshot(tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=1) as cluster:
        secondary = cluster.secondaries[0]
        cluster.primary.client().set_many({f"k{i}": i for i in range(300)})
        assert cluster.wait_converged()
        secondary.kill()
        shutil.rmtree(secondary.directory)
        secondary.start()  # same URL, empty store: it holds no position
        assert cluster.wait_converged(30)
        assert replication_status(cluster.primary)[secondary.url]["snapshots_sent"] == 2


def test_deletes_never_come_back(tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=1) as cluster:
        primary, secondary = cluster.primary, cluster.secondaries[0]
        api = primary.client()
        api.set_many({f"d{i}": i for i in range(100)})
        assert cluster.wait_converged()
        old = Store(primary.directory)
        try:
            # the writes as they were pushed: replayed later, they must change nothing
            old_records = [r for r in old.oplog_since(0, 10_000) if r.key and r.key[:1] == "d"]
            source = old.node_id
        finally:
            old.close()
        secondary.kill()
        api.delete_many([f"d{i}" for i in range(50)])
        secondary.start()
        assert cluster.wait_converged()
        assert secondary.client().get("d1") is None and secondary.client().get("d60") == 60
        status, _, body = secondary.request("POST", "/replication/batch",
                                            encode_batch(source, old_records))
        assert status == 200, body
        assert cluster.wait_converged(5)
        assert secondary.client().get("d1") is None
        assert store_checksum(secondary.directory)[0] == 50


# ---- the receiving routes ----------------------------------------------------------------

def _raw_post(node: Node, path: str, head: dict[str, str], body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        conn.putrequest("POST", "/api/hypercacheio" + path)
        for name, value in head.items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body)
        return conn.getresponse().status
    finally:
        conn.close()


def test_pushes_with_a_wrong_token_or_a_bad_frame_change_nothing(tmp_path: Path) -> None:
    with Node(str(tmp_path / "s")) as node:
        node.client().set("kept", 1)
        before = store_checksum(node.directory)
        record = Record(1, SET, "intruder", TAG_STR, "x", None, (1 << 50), "evil", None)
        frame = encode_batch("evil-source", [record])
        for token in ("wrong-token", None):
            status, _, _ = node.request("POST", "/replication/batch", frame, token=token)
            assert status == 401
            status, _, _ = node.request("POST", "/replication/snapshot", frame, token=token)
            assert status == 401
        # valid frame, but this node holds no position in that source's oplog
        status, doc = node.json("POST", "/replication/batch", frame)
        assert status == 409 and doc["code"] == "need_snapshot"
        # a malformed frame: nothing of it is applied, even the well-formed record
        bad = encode_batch("evil-source", [record])[:-3] + b"\xc1\xc1\xc1"
        status, doc = node.json("POST", "/replication/batch", bad)
        assert status == 400 and doc["code"] == "malformed_frame"
        status, doc = node.json("POST", "/replication/snapshot", frame)  # wrong kind
        assert status == 400 and doc["code"] == "malformed_frame"
        status = _raw_post(node, "/replication/batch",
                           {"Content-Length": str(1 << 30), "X-Hypercacheio-Token": TOKEN},
                           b"x" * 100)
        assert status == 413
        assert store_checksum(node.directory) == before
        assert node.client().get("intruder") is None


def test_a_node_refuses_frames_from_its_own_database(tmp_path: Path) -> None:
    with Node(str(tmp_path / "n")) as node:
        store = Store(node.directory)
        try:
            own = store.node_id
        finally:
            store.close()
        record = Record(1, SET, "self", TAG_STR, "x", None, 1 << 50, own, None)
        status, doc = node.json("POST", "/replication/batch", encode_batch(own, [record]))
        assert status == 409 and doc["code"] == "same_store"


# ---- failures of the primary --------------------------------------------------------------

def test_the_primary_killed_and_restarted_loses_no_acknowledged_write(tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=2) as cluster:
        primary = cluster.primary
        cache = _cache(primary)
        try:
            for i in range(2000):
                cache.set(f"p:{i}", i)
            assert cluster.wait_acked()
            primary.kill()  # kill -9
            for i in range(2000, 3000):  # written while the primary's node is down
                cache.set(f"p:{i}", i)
            primary.start()
            for i in range(3000, 3500):
                cache.set(f"p:{i}", i)
        finally:
            cache.close()
        assert cluster.wait_converged(60)
        assert store_checksum(cluster.secondaries[0].directory)[0] == 3500
        rows = replication_status(primary)
        for row in rows.values():
            assert row["snapshots_sent"] == 0  # resumed from the persisted positions
            assert 1500 <= row["rows_sent"] < 3500  # what it missed, not everything again
        for node in cluster.secondaries:
            status, doc = node.json("GET", "/ping")
            assert doc["replication"]["refused_batches"] == 0  # no batch out of order


# ---- HYPERCACHEIO_ASYNC=false and the figures ---------------------------------------------

def test_sync_writes_wait_for_every_reachable_secondary(tmp_path: Path) -> None:
    env = {"HYPERCACHEIO_ASYNC": "false", "HYPERCACHEIO_TIMEOUT": "1"}
    with Cluster(tmp_path, secondaries=2, primary_env=env) as cluster:
        primary, (s1, s2) = cluster.primary, cluster.secondaries
        assert cluster.wait_acked()
        for i in range(20):
            status, headers, _ = primary.request("POST", f"/cache/sync{i}", b"v")
            assert status == 200 and headers["x-hypercacheio-replicas"] == "2"
            # confirmed means applied: both secondaries' stores hold it already
            for node in (s1, s2):
                store = Store(node.directory)
                try:
                    assert store.get(f"sync{i}") is not None
                finally:
                    store.close()
        s2.kill()
        answers = []
        for i in range(5):  # the first may wait up to the timeout: s2 is not known down yet
            status, headers, _ = primary.request("POST", f"/cache/down{i}", b"v")
            answers.append((status, headers.get("x-hypercacheio-replicas")))
        assert answers[-1] == (200, "1"), answers
        status, headers, _ = primary.request("POST", "/many/delete",
                                             b"\x81\xa4keys\x91\xa5sync0",
                                             {"Content-Type": "application/msgpack"})
        assert status == 200 and headers["x-hypercacheio-replicas"] == "1"
        assert primary.metric("replication_sync_writes_total") >= 26
        assert primary.metric("replication_sync_short_total") >= 6
        s2.start()
        assert cluster.wait_converged()


def test_async_writes_carry_no_replica_count(cluster: Cluster) -> None:
    status, headers, _ = cluster.primary.request("POST", "/cache/a", b"v")
    assert status == 200 and "x-hypercacheio-replicas" not in headers


def test_metrics_and_ping_show_each_secondary(cluster: Cluster) -> None:
    primary, (s1, s2) = cluster.primary, cluster.secondaries
    primary.client().set("m", 1)
    assert cluster.wait_acked()
    text = primary.request("GET", "/metrics")[2].decode()
    for node in (s1, s2):
        assert f'hypercacheio_replication_connected{{secondary="{node.url}"}} 1' in text
        assert f'hypercacheio_replication_backlog_rows{{secondary="{node.url}"}} 0' in text
    assert "hypercacheio_replication_acked_position{" in text
    status, doc = primary.json("GET", "/ping", token=None)
    assert doc == {"ok": True}  # the figures only with the token
    s2.kill()
    primary.client().set("m", 2)
    assert wait_until(lambda: not replication_status(primary)[s2.url]["connected"], 10)
    row = replication_status(primary)[s2.url]
    assert row["backlog_rows"] >= 1 and row["last_error"]
    assert "refused" in row["last_error"].lower() or "connect" in row["last_error"].lower()
    assert wait_until(lambda: replication_status(primary)[s2.url]["backlog_seconds"] > 0, 5)
    status, doc = s1.json("GET", "/ping")
    sources = doc["replication"]["sources"]
    assert len(sources) == 1 and sources[0]["applied"] > 0
    assert s1.metric("replication_received_rows_total") > 0


def test_the_primary_node_marks_its_store_clustered(tmp_path: Path) -> None:
    """Writes of every process then log to the oplog, whatever their own settings say."""
    with Cluster(tmp_path, secondaries=1) as cluster:
        store = Store(cluster.primary.directory)
        try:
            assert store.node_meta("clustered") in (1, "1")
            before = store.oplog_position()
            store.set("x", TAG_STR, "y", None)
            assert store.oplog_position() == before + 1
        finally:
            store.close()
        assert wait_converged(cluster.directories)
        assert os.path.exists(cluster.secondaries[0].directory)


def test_a_pushing_primary_stops_promptly(tmp_path: Path) -> None:
    """SIGTERM right after writes: the push tasks end (a cancellation swallowed by
    ``asyncio.wait_for`` once kept the node running until it was killed)."""
    with Cluster(tmp_path, secondaries=1) as cluster:
        primary = cluster.primary
        for _ in range(4):
            store = Store(primary.directory)
            try:
                for i in range(50):
                    store.set(f"s{i}", TAG_STR, "v", None)
            finally:
                store.close()
            assert primary.stop(timeout=10) == 0  # TimeoutExpired if it hangs
            primary.start()
        assert cluster.wait_converged()
