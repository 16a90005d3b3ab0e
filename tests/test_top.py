"""``hypercacheio top`` against real nodes: ``--once --json``, plain text without a terminal,
the full-screen view in a tmux pane (keys q, p, s), and a cluster with a secondary down."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypercacheio.cli.top import parse_metrics, quantile, sparkline
from node_helpers import Node, cli, wait_until

pytest.importorskip("aiohttp")


def load(node: Node, sets: int = 40, gets: int = 60, deletes: int = 5) -> None:
    """A small load: every set key read back, ``gets - sets`` misses, a few deletes."""
    client = node.client()
    for i in range(sets):
        client.set(f"k{i}", b"v" * 100)
    for i in range(gets):
        client.get(f"k{i}")
    for i in range(deletes):
        client.delete(f"k{i}")


def requests_by_op(node: Node) -> dict[str, int]:
    metrics = parse_metrics(node.request("GET", "/metrics")[2].decode())
    totals: dict[str, int] = {}
    for labels, value in metrics["hypercacheio_requests_total"]:
        totals[labels["op"]] = totals.get(labels["op"], 0) + int(value)
    return totals


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with Node(str(tmp_path_factory.mktemp("top") / "data")) as running:
        load(running)
        yield running


# ---- the figures --------------------------------------------------------------------------

def test_metrics_carry_a_latency_histogram_per_operation(node: Node) -> None:
    metrics = parse_metrics(node.request("GET", "/metrics")[2].decode())
    buckets = [(labels["le"], value) for labels, value
               in metrics["hypercacheio_request_duration_seconds_bucket"]
               if labels["op"] == "get"]
    assert buckets[-1][0] == "+Inf"
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    count = {labels["op"]: value for labels, value
             in metrics["hypercacheio_request_duration_seconds_count"]}
    assert counts[-1] == count["get"] == requests_by_op(node)["get"] == 60
    sums = {labels["op"]: value for labels, value
            in metrics["hypercacheio_request_duration_seconds_sum"]}
    assert 0 < sums["get"] < 60 * 5


def test_quantile_interpolates_within_the_bucket() -> None:
    buckets = [(0.001, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.001)
    assert quantile(0.75, buckets) == pytest.approx(0.0055)
    assert quantile(0.99, [(0.001, 0.0), (float("inf"), 10.0)]) == 0.001  # above every bound
    assert quantile(0.5, [(0.001, 0.0), (float("inf"), 0.0)]) is None
    assert sparkline([0, 4, 8]) == " ▄█" and sparkline([0, 0]) == "▁▁"


def test_once_json_matches_the_nodes_counters(node: Node, tmp_path: Path) -> None:
    result = cli("top", "--once", "--json", "--interval", "0.1", env=node.env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    node_ops = requests_by_op(node)
    for op in ("get", "set", "delete"):
        assert doc["ops"][op]["requests_total"] == node_ops[op]
    assert (doc["ops"]["get"]["requests_total"], doc["ops"]["set"]["requests_total"]) == (60, 40)
    assert doc["ops"]["get"]["errors_total"] == 0  # 20 misses are answers, not errors
    assert doc["hits_total"] == node.metric("hits_total") == 40
    assert doc["misses_total"] == node.metric("misses_total") == 20
    assert doc["hit_ratio"] == pytest.approx(40 / 60, abs=1e-3)
    assert doc["db_bytes"] > 0 and doc["peers"] == []
    assert 0 < doc["ops"]["get"]["p50_ms"] <= doc["ops"]["get"]["p99_ms"]
    assert doc["ops"]["metrics"]["per_s"] > 0  # top's own first scrape, within --interval
    # a remote node: --url and the token from the environment, no local storage directory
    env = {**node.env, "HYPERCACHEIO_SQLITE_PATH": str(tmp_path / "elsewhere")}
    env.pop("HYPERCACHEIO_NODE_PORT")
    remote = cli("top", "--once", "--json", "--interval", "0.1", "--url", node.url, env=env)
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["ops"]["set"]["requests_total"] == 40


def test_once_text_and_plain_lines_without_a_terminal(node: Node) -> None:
    result = cli("top", "--once", "--interval", "0.1", env=node.env)
    assert result.returncode == 0, result.stderr
    get_row = next(line for line in result.stdout.splitlines() if re.search(r"\bget\b", line))
    assert " 60 " in get_row and "hit ratio 66.7%" in result.stdout
    assert "q quit" not in result.stdout
    proc = subprocess.Popen([sys.executable, "-m", "hypercacheio.cli", "top", "--interval",
                             "0.1"], env=node.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(10)
    assert all("entries=35" in line and "hit_ratio=0.667" in line for line in lines), lines


def test_manage_py_top_uses_the_alias_settings(node: Node) -> None:
    pytest.importorskip("django")
    manage = Path(__file__).parents[1] / "examples" / "django_project" / "manage.py"
    env = {**node.env, "DEMO_CACHE_DIR": node.directory}
    result = subprocess.run([sys.executable, str(manage), "hypercacheio", "top", "--once",
                             "--json", "--interval", "0.1"], env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["url"] == node.url and doc["ops"]["set"]["requests_total"] == 40


def test_no_node_is_a_clear_error(tmp_path: Path) -> None:
    from node_helpers import free_port, node_env

    result = cli("top", "--once", env=node_env(str(tmp_path), free_port()))
    assert result.returncode == 1
    assert "no node answers at http://127.0.0.1:" in result.stderr
    assert "--json goes with --once" in cli("top", "--json", env=os.environ).stderr


# ---- the full screen ----------------------------------------------------------------------

class Pane:
    """A tmux session of its own (private socket) running one shell command."""

    def __init__(self, directory: Path, command: str, env: dict[str, str]) -> None:
        self.socket = str(directory / "tmux.sock")
        script = directory / "run.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()
                          if k.startswith(("HYPERCACHEIO_", "PYTHON", "PATH", "HOME")))
        script.write_text(f"#!/bin/sh\nunset COLUMNS LINES\n{exports}{command}\n")
        script.chmod(0o755)
        subprocess.run(["tmux", "-S", self.socket, "-f", "/dev/null", "new-session", "-d",
                        "-x", "140", "-y", "45", str(script)], check=True, timeout=10)

    def text(self, escapes: bool = False) -> str:
        """The screen; with ``escapes``, with its colours as ANSI sequences."""
        done = subprocess.run(["tmux", "-S", self.socket, "capture-pane", "-p",
                               *(["-e"] if escapes else [])],
                              capture_output=True, text=True, timeout=10)
        return done.stdout

    def keys(self, keys: str) -> None:
        subprocess.run(["tmux", "-S", self.socket, "send-keys", keys], check=True, timeout=10)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        seen = [""]

        def found() -> bool:
            seen[0] = self.text()
            return re.search(pattern, seen[0]) is not None
        assert wait_until(found, timeout, 0.1), f"no {pattern!r} on screen:\n{seen[0]}"
        return seen[0]

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=10)


def _row(screen: str, op: str) -> list[str]:
    for line in screen.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) > 2 and cells[1] == op:
            return cells[1:-1]
    raise AssertionError(f"no row {op!r}:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_full_screen_shows_the_counters_and_quits_on_q(node: Node, tmp_path: Path) -> None:
    stty = tmp_path / "stty.txt"
    command = (f"{shlex.quote(sys.executable)} -m hypercacheio.cli top --interval 0.2; "
               f"echo exit=$? > {tmp_path / 'exit.txt'}; stty -a > {stty}; sleep 30")
    pane = Pane(tmp_path, command, {**node.env, "TERM": "xterm-256color"})
    try:
        screen = pane.wait_for(r"│ get .*│")
        expected = requests_by_op(node)
        for op in ("get", "set", "delete"):
            assert int(_row(screen, op)[3]) == expected[op], screen
        assert "hit ratio 66.7% (40 hits, 20 misses)" in screen
        assert "entries 35" in pane.wait_for(r"entries 35")
        assert "sorted by ops/s" in screen
        pane.keys("s")
        pane.wait_for(r"sorted by name")
        pane.keys("p")
        pane.wait_for(r"PAUSED")
        pane.keys("q")
        assert wait_until(lambda: stty.exists() and stty.stat().st_size > 0, 10)
        assert (tmp_path / "exit.txt").read_text().strip() == "exit=0"
        modes = stty.read_text().split()
        assert "icanon" in modes and "echo" in modes, "terminal not restored"
    finally:
        pane.close()


# ---- a cluster ----------------------------------------------------------------------------

def test_a_secondary_that_is_down_shows_as_down(tmp_path: Path) -> None:
    from cluster_helpers import Cluster, replication_status

    with Cluster(tmp_path, secondaries=2) as cluster:
        up, down = cluster.secondaries
        client = cluster.primary.client()
        client.set("a", b"1")
        assert cluster.wait_acked(15)
        down.stop()
        n = [0]

        def seen_down() -> bool:
            n[0] += 1
            client.set(f"after-{n[0]}", b"x")
            return not replication_status(cluster.primary)[down.url]["connected"]
        assert wait_until(seen_down, 15, 0.1)
        result = cli("top", "--once", "--json", "--interval", "0.1", "--url",
                     cluster.primary.url, env=cluster.primary.env)
        assert result.returncode == 0, result.stderr
        peers: dict[str, Any] = {p["address"]: p for p in json.loads(result.stdout)["peers"]}
        assert peers[down.url]["health"] == "down" and not peers[down.url]["connected"]
        assert peers[down.url]["last_error"]
        assert peers[up.url]["connected"] and peers[up.url]["health"] in ("ok", "lagging")
        text = cli("top", "--once", "--interval", "0.1", env=cluster.primary.env).stdout
        down_row = next(line for line in text.splitlines() if down.url.split("/")[2] in line)
        assert re.search(r"│ down\s*│", down_row), text
        up_row = next(line for line in text.splitlines() if up.url.split("/")[2] in line)
        assert "down" not in up_row
        dashboard_names_exist(cluster.primary)
        if shutil.which("tmux") is None:
            return
        pane = Pane(tmp_path, f"{shlex.quote(sys.executable)} -m hypercacheio.cli top "
                    "--interval 0.2", {**cluster.primary.env, "TERM": "xterm-256color"})
        try:
            address = down.url.split("/")[2]  # host:port
            pane.wait_for(re.escape(address) + r" .*│ down")
            coloured = next(line for line in pane.text(escapes=True).splitlines()
                            if address in line)
            assert re.search(r"\x1b\[[0-9;]*31m\s*down", coloured), repr(coloured)  # red
            pane.keys("q")
        finally:
            pane.close()


def dashboard_names_exist(primary: Node) -> None:
    """Every metric the Grafana dashboard queries is one a node exposes: a primary's
    ``/metrics``, or (active-active only) one of the mesh's per-peer series."""
    dashboard = Path(__file__).parents[1] / "examples" / "grafana" / "hypercacheio.json"
    doc = json.loads(dashboard.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"hypercacheio_\w+", expr)}
    exposed = set(parse_metrics(primary.request("GET", "/metrics")[2].decode()))
    from hypercacheio.replication import observe

    mesh_source = Path(observe.__file__).read_text()  # where the mesh's series are named
    missing = sorted(name for name in used if name not in exposed and not (
        name.startswith("hypercacheio_mesh_peer_")
        and f'("{name.removeprefix("hypercacheio_mesh_peer_")}", ' in mesh_source))
    assert used and missing == [], missing


def test_an_active_active_peer_that_is_down_shows_as_down(tmp_path: Path) -> None:
    from node_helpers import free_port

    ports = [free_port(), free_port()]
    nodes = [Node(str(tmp_path / f"node-{i + 1}"), extra_env={
        "HYPERCACHEIO_HA_ENABLED": "true",
        "HYPERCACHEIO_PEER_ADDRS": f"127.0.0.1:{ports[1 - i]}",
        "HYPERCACHEIO_REPL_PORT": str(ports[i]),
        "HYPERCACHEIO_ANTI_ENTROPY_INTERVAL": "0",
        "HYPERCACHEIO_TIMEOUT": "1"}) for i in range(2)]

    def mesh_peers(node: Node) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = node.json("GET", "/ping")[1].get("mesh", {}).get(
            "peers", [])
        return peers

    try:
        for node in nodes:
            node.start()
        if not mesh_peers(nodes[0]):
            pytest.skip("this checkout's node has no active-active mesh in /ping")
        assert wait_until(lambda: all(p["connected"] for p in mesh_peers(nodes[0])), 20)
        nodes[0].client().set("a", b"1")
        result = cli("top", "--once", "--json", "--interval", "0.1", env=nodes[0].env)
        peer = json.loads(result.stdout)["peers"][0]
        assert (peer["role"], peer["health"], peer["address"]) == (
            "mesh peer", "ok", f"127.0.0.1:{ports[1]}")
        nodes[1].stop()
        assert wait_until(lambda: not mesh_peers(nodes[0])[0]["connected"], 20)
        result = cli("top", "--once", "--json", "--interval", "0.1", env=nodes[0].env)
        assert result.returncode == 0, result.stderr
        peer = json.loads(result.stdout)["peers"][0]
        assert peer["health"] == "down" and not peer["connected"]
    finally:
        for node in nodes:
            try:
                node.stop()
            except Exception:
                node.kill()
