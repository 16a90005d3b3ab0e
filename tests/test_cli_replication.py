"""``hypercacheio stats`` and ``hypercacheio check`` on a primary and its secondaries, and
``stats`` on active-active nodes: real nodes on 127.0.0.1 (``cluster_helpers.Cluster``,
``test_replication_mesh.MeshCluster``), the CLI in a subprocess or ``run_check`` in this
process with the host's environment."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from cluster_helpers import Cluster, replication_status
from hypercacheio.cli.replication import MESH_PEER_PREFIX, PRIMARY_PEER_PREFIX
from hypercacheio.config import Settings
from hypercacheio.ops import check as chk
from hypercacheio.store import Store
from node_helpers import Node, cli, free_port, wait_until
from test_replication_mesh import MeshCluster


def stats_json(env: Mapping[str, str]) -> dict[str, Any]:
    result = cli("stats", "--json", env=env)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def by_url(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["url"]: row for row in doc["replication"]["secondaries"]}


def check_keys(directory: str) -> list[str]:
    """Live check keys in a node's database."""
    db = sqlite3.connect(f"file:{os.path.join(directory, 'hypercacheio.sqlite')}?mode=ro",
                         uri=True)
    try:
        return [r[0] for r in db.execute(
            "SELECT key FROM entries WHERE key LIKE 'hypercacheio:check:%' AND tag >= 0")]
    finally:
        db.close()


def host_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str], **extra: str) -> None:
    """This process sees ``env``'s HYPERCACHEIO_* settings (and no others), as the host's."""
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)
    for name, value in {**env, **extra}.items():
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.setenv(name, value)


def rows(report: chk.Report) -> dict[tuple[str, str], chk.CheckRow]:
    return {(r.endpoint.label, r.check): r for r in report.rows}


# --- stats ----------------------------------------------------------------------------------


def test_stats_on_a_primary_shows_each_secondary_and_a_drained_backlog(tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=2) as cluster:
        client = cluster.primary.client()
        for i in range(20):
            client.set(f"k{i}", i)
        client.close()
        assert cluster.wait_acked()
        doc = stats_json(cluster.primary.env)
        state = doc["replication"]
        assert state["role"] == "primary" and state["node_running"] is True
        secondaries = by_url(doc)
        assert set(secondaries) == {s.url for s in cluster.secondaries}
        for row in secondaries.values():
            assert row["connected"] is True
            assert row["acked"] == state["oplog_position"] >= 20
            assert row["backlog_rows"] == 0 and row["last_error"] is None
        text = cli("stats", env=cluster.primary.env)
        assert text.returncode == 0, text.stderr
        assert "node: running" in text.stdout
        for node in cluster.secondaries:
            assert node.url in text.stdout
        assert cluster.primary.token not in text.stdout + text.stderr


def test_stats_shows_a_stopped_secondary_disconnected_with_a_growing_backlog(
        tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=2) as cluster:
        down, up = cluster.secondaries
        down.stop()
        client = cluster.primary.client()
        for i in range(5):
            client.set(f"a{i}", i)
        assert wait_until(lambda: replication_status(cluster.primary)[down.url]["connected"]
                          is False, 15)
        first = by_url(stats_json(cluster.primary.env))
        assert first[down.url]["connected"] is False
        assert first[down.url]["backlog_rows"] >= 5
        assert first[down.url]["last_error"]
        for i in range(7):
            client.set(f"b{i}", i)
        client.close()
        second = by_url(stats_json(cluster.primary.env))
        assert second[down.url]["backlog_rows"] >= first[down.url]["backlog_rows"] + 7
        assert wait_until(lambda: replication_status(cluster.primary)[up.url]["backlog_rows"]
                          == 0, 15)
        assert by_url(stats_json(cluster.primary.env))[up.url]["connected"] is True

        # the primary's node stopped: what the store alone knows, and it says so
        cluster.primary.stop()
        doc = stats_json(cluster.primary.env)
        assert doc["replication"]["node_running"] is False
        alone = by_url(doc)
        assert alone[down.url]["connected"] is None
        assert alone[down.url]["backlog_rows"] >= 12
        assert alone[down.url]["backlog_seconds"] > 0
        assert alone[up.url]["backlog_rows"] == 0
        text = cli("stats", env=cluster.primary.env)
        assert "node: not running" in text.stdout and "store alone" in text.stdout

        # both back: the backlog drains to 0
        down.start()
        cluster.primary.start()
        assert cluster.wait_acked()
        drained = by_url(stats_json(cluster.primary.env))
        assert all(r["connected"] is True and r["backlog_rows"] == 0
                   for r in drained.values()), drained


def test_stats_on_a_secondary_shows_its_position_and_primary(tmp_path: Path) -> None:
    with Cluster(tmp_path, secondaries=1) as cluster:
        cluster.primary.client().set("x", 1)
        assert cluster.wait_acked()
        acked = replication_status(cluster.primary)[cluster.secondaries[0].url]["acked"]
        primary_id = cluster.primary.json("GET", "/ping")[1]["node_id"]
        state = stats_json(cluster.secondaries[0].env)["replication"]
        assert state["role"] == "secondary"
        assert state["primary_url"] == cluster.primary.url
        assert [(s["source"], s["position"]) for s in state["sources"]] == [(primary_id, acked)]
        text = cli("stats", env=cluster.secondaries[0].env).stdout
        assert f"secondary of {cluster.primary.url}" in text and primary_id in text


def test_stats_without_replication_adds_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env["HYPERCACHEIO_SQLITE_PATH"] = str(tmp_path)
    doc = stats_json(env)
    assert "replication" not in doc and "mesh" not in doc


def test_the_secondary_position_prefix_is_the_nodes() -> None:
    from hypercacheio.node.replica_routes import PEER_PREFIX

    assert PRIMARY_PEER_PREFIX == PEER_PREFIX


def test_the_mesh_position_prefix_is_the_meshs() -> None:
    from hypercacheio.replication.mesh import _peer_key

    assert _peer_key("127.0.0.1:7400") == MESH_PEER_PREFIX + "127.0.0.1:7400"


# --- stats, active-active -------------------------------------------------------------------


def address(cluster: MeshCluster, node: Node) -> str:
    return f"127.0.0.1:{cluster.repl_ports[cluster.nodes.index(node)]}"


def mesh_peers(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["address"]: row for row in doc["mesh"]["peers"]}


def test_stats_on_an_active_active_node_shows_each_peer_and_the_version_vector(
        tmp_path: Path) -> None:
    with MeshCluster(tmp_path, 3) as cluster:
        a, b, c = cluster.nodes
        for i, node in enumerate(cluster.nodes):
            client = node.client()
            for j in range(5):
                client.set(f"n{i}-{j}", j)
            client.close()
        assert cluster.wait_converged()
        ids = {address(cluster, n): cluster.mesh(n)["node_id"] for n in cluster.nodes}
        assert wait_until(lambda: all(p["backlog_records"] == 0
                                      for p in mesh_peers(stats_json(a.env)).values()), 15)
        doc = stats_json(a.env)
        state = doc["mesh"]
        assert "replication" not in doc  # no primary, no secondary
        assert state["node_running"] is True and state["node_id"] == ids[address(cluster, a)]
        assert (state["configured_nodes"], state["majority"]) == (3, 2)
        peers = mesh_peers(doc)
        assert set(peers) == {address(cluster, b), address(cluster, c)}
        for addr, row in peers.items():
            assert row["node_id"] == ids[addr]
            assert row["connected"] is True and row["handshake"] == "authenticated"
            assert row["acked"] == state["oplog_position"] >= 5
            assert row["backlog_seconds"] == 0 and row["last_error"] is None
            assert row["records_received"] >= 5 and row["lag_ms"] is not None
            assert row["conflicts_resolved"] >= 0 and row["clock_skew_records"] == 0
        # every node's five writes are applied here, counted per origin
        assert all(state["version_vector"][node_id] >= 5 for node_id in ids.values())

        text = cli("stats", env=a.env)
        assert text.returncode == 0, text.stderr
        assert f"active-active node {ids[address(cluster, a)]}" in text.stdout
        assert "node: running" in text.stdout and "version vector" in text.stdout
        for addr, node_id in ids.items():
            assert node_id in text.stdout
            if addr != address(cluster, a):
                assert addr in text.stdout
        assert "authenticated" in text.stdout
        assert a.token not in text.stdout + text.stderr


def test_stats_shows_a_stopped_peer_behind_and_what_the_store_alone_keeps(
        tmp_path: Path) -> None:
    with MeshCluster(tmp_path, 3) as cluster:
        a, b, c = cluster.nodes
        up, down = address(cluster, b), address(cluster, c)
        # c's store is empty: back, it takes a snapshot (from a or b), after which a's
        # backlog for c drains with no new write of a's
        c.stop()
        client = a.client()
        for i in range(6):
            client.set(f"k{i}", i)
        client.close()
        assert wait_until(lambda: mesh_peers(stats_json(a.env))[down]["connected"] is False
                          and mesh_peers(stats_json(a.env))[up]["backlog_records"] == 0, 15)
        live = mesh_peers(stats_json(a.env))
        assert live[down]["backlog_records"] >= 6 and live[down]["handshake"] != "authenticated"

        # what the store alone keeps, once b's position is persisted: stop a's node
        store = Store(a.directory)
        try:
            position = store.oplog_position()
            assert wait_until(lambda: store.peer_position(MESH_PEER_PREFIX + up).acked  # type: ignore[union-attr]
                              >= position, 10)
        finally:
            store.close()
        a.stop()
        doc = stats_json(a.env)
        state = doc["mesh"]
        assert state["node_running"] is False and state["handshakes_refused"] is None
        alone = mesh_peers(doc)
        for row in alone.values():
            assert row["connected"] is None and row["handshake"] is None
            assert row["lag_ms"] is None and row["acked_persisted_at"] is not None
        assert alone[down]["backlog_records"] >= 6 and alone[down]["backlog_seconds"] > 0
        assert alone[up]["backlog_records"] == 0
        assert state["version_vector"][state["node_id"]] >= 6
        text = cli("stats", env=a.env)
        assert text.returncode == 0, text.stderr
        assert "node: not running" in text.stdout and "store alone" in text.stdout
        assert down in text.stdout and "unknown" in text.stdout

        # both back: the backlog drains
        c.start()
        a.start()
        assert wait_until(lambda: all(
            p["connected"] is True and p["backlog_records"] == 0
            for p in mesh_peers(stats_json(a.env)).values()), 20)


# --- check ----------------------------------------------------------------------------------


def test_check_on_a_secondary_passes_forward_and_push_and_cleans_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Cluster(tmp_path, secondaries=1) as cluster:
        secondary = cluster.secondaries[0]
        host_env(monkeypatch, secondary.env)
        report = chk.run_check(Settings.from_env())
        found = rows(report)
        assert found[("primary", "Forward")].status == chk.PASS, found[("primary", "Forward")]
        assert found[("primary", "Push")].status == chk.PASS, found[("primary", "Push")]
        assert report.ok, [r for r in report.rows if r.status != chk.PASS]
        assert check_keys(cluster.primary.directory) == []
        assert wait_until(lambda: check_keys(secondary.directory) == [], 10)

        result = cli("check", env=secondary.env)
        assert result.returncode == 0, result.stdout
        assert "Forward" in result.stdout and "Push" in result.stdout
        assert secondary.token not in result.stdout + result.stderr


def test_check_on_an_embedded_secondary_forwards_but_gets_no_push(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Cluster(tmp_path, secondaries=1) as cluster:
        secondary = cluster.secondaries[0]
        secondary.stop()  # no node here: the library forwards, nothing receives the push
        host_env(monkeypatch, secondary.env, HYPERCACHEIO_PREFIX="app:")
        report = chk.run_check(Settings.from_env(), push_wait=0.3)
        found = rows(report)
        assert found[("primary", "Forward")].status == chk.PASS, found[("primary", "Forward")]
        push = found[("primary", "Push")]
        assert push.status == chk.FAIL
        assert "within 0.3 s" in push.detail and "no node runs" in push.detail
        assert check_keys(cluster.primary.directory) == []


def test_check_on_a_primary_reports_a_broken_push(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api/hypercacheio"
    cluster = Cluster(tmp_path, secondaries=1, start=False)
    good = cluster.secondaries[0]
    cluster.primary.env["HYPERCACHEIO_SECONDARY_URLS"] = f"{good.url},{dead}"
    with cluster.start():
        assert wait_until(lambda: replication_status(cluster.primary)[dead]["connected"]
                          is False, 15)
        host_env(monkeypatch, cluster.primary.env)
        report = chk.run_check(Settings.from_env())
        found = rows(report)
        assert found[("secondary 1", "Push")].status == chk.PASS, found[("secondary 1", "Push")]
        broken = found[("secondary 2", "Push")]
        assert broken.status == chk.FAIL
        assert "cannot read from the secondary" in broken.detail
        assert "push not connected" in broken.detail and "last error" in broken.detail
        assert not report.ok
        assert wait_until(lambda: check_keys(good.directory) == [], 10)

        result = cli("check", env=cluster.primary.env)
        assert result.returncode == 1
        assert "Push" in result.stdout and "push not connected" in result.stdout
        assert cluster.primary.token not in result.stdout + result.stderr


def test_check_on_a_primary_with_a_secondary_it_does_not_push_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The secondary answers but the running primary node was not told about it (its
    SECONDARY_URLS changed since it started): the Push row fails and says so."""
    with Cluster(tmp_path, secondaries=0) as cluster, \
            Node(str(tmp_path / "stray")) as stray:
        host_env(monkeypatch, cluster.primary.env,
                 HYPERCACHEIO_SERVER_ROLE="primary", HYPERCACHEIO_SECONDARY_URLS=stray.url)
        report = chk.run_check(Settings.from_env(), push_wait=0.3)
        push = rows(report)[("secondary 1", "Push")]
        assert push.status == chk.FAIL
        assert "within 0.3 s" in push.detail
        assert "pushes to no secondary" in push.detail
