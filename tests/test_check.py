"""The connectivity check: against a real node daemon, a closed port, a wrong token, and
stand-in endpoints for the failures a real node cannot be made to show."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hypercacheio.cli.service import render_report
from hypercacheio.config import Settings
from hypercacheio.errors import NodeUnavailable
from hypercacheio.ops import check as chk
from node_helpers import Node

TOKEN = "check-test-token-5f2a9c"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HYPERCACHEIO_"):
            monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a real node --------------------------------------------------------------------------


@dataclass
class RunningNode:
    port: int
    directory: Path
    url: str
    unix_socket: str


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One real daemon (``hypercacheio node run``) on 127.0.0.1 and a unix socket."""
    directory = tmp_path_factory.mktemp("node")
    sock = str(directory / "node.sock")
    with Node(str(directory), token=TOKEN, unix_socket=sock) as running:
        yield RunningNode(running.port, directory, running.url, sock)


def node_env(node: RunningNode, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({"HYPERCACHEIO_SERVER_TYPE": "node", "HYPERCACHEIO_NODE_PORT": str(node.port),
                "HYPERCACHEIO_API_TOKEN": TOKEN, "HYPERCACHEIO_SQLITE_PATH": str(node.directory),
                "HYPERCACHEIO_NODE_SOCKET": node.unix_socket, "COLUMNS": "200"})
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypercacheio.cli", "check", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def leftovers(directory: Path) -> tuple[list[str], list[str]]:
    """Live check keys and check locks in the node's database."""
    db = sqlite3.connect(f"file:{directory / 'hypercacheio.sqlite'}?mode=ro", uri=True)
    try:
        keys = [r[0] for r in db.execute(
            "SELECT key FROM entries WHERE key LIKE 'hypercacheio:check:%' AND tag >= 0")]
        locks = [r[0] for r in db.execute(
            "SELECT name FROM locks WHERE name LIKE 'hypercacheio:check:%'")]
    finally:
        db.close()
    return keys, locks


def test_cli_check_passes_against_a_real_node_and_cleans_up(node: RunningNode) -> None:
    proc = run_cli(node_env(node))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Server type: NODE" in out and f"port {node.port}" in out
    for name in chk.CHECKS:
        assert name in out
    assert "all 12 checks passed" in out  # TCP on 127.0.0.1 and the unix socket
    assert TOKEN not in out
    assert leftovers(node.directory) == ([], [])


def test_every_configured_endpoint_is_checked(node: RunningNode) -> None:
    """A secondary checks its local node and its primary (here: the same node by name)."""
    settings = Settings(server_type="node", node_port=node.port, api_token=TOKEN,
                        directory=str(node.directory), role="secondary",
                        node_socket=node.unix_socket,
                        primary_url=f"http://localhost:{node.port}/api/hypercacheio")
    report = chk.run_check(settings)
    assert report.ok, [(r.endpoint.label, r.check, r.detail) for r in report.rows]
    assert [(r.endpoint.label, r.check) for r in report.rows] == (
        [("local node", c) for c in chk.CHECKS]
        + [("local node (unix socket)", c) for c in chk.CHECKS]
        + [("primary", c) for c in (*chk.CHECKS, chk.FORWARD, chk.PUSH)])
    assert report.rows[0].endpoint.url == f"http://127.0.0.1:{node.port}/api/hypercacheio"
    assert leftovers(node.directory) == ([], [])


def test_local_node_falls_back_to_the_configured_host(node: RunningNode) -> None:
    """127.0.0.1 does not answer (stand-in: a closed port); HYPERCACHEIO_NODE_HOST is tried
    next (stand-in: the name 'node.test' routed to the real node)."""
    calls: list[str] = []
    closed = free_port()

    def factory(ep: chk.Endpoint, token: str, timeout: float) -> Any:
        calls.append(ep.url or "")
        port = closed if ep.host == "127.0.0.1" else node.port
        return chk.remote_client(chk.Endpoint(ep.label, f"http://127.0.0.1:{port}"), token,
                                 timeout)

    settings = Settings(server_type="node", node_port=node.port, api_token=TOKEN,
                        directory=str(node.directory), node_host="node.test")
    report = chk.run_check(settings, client_factory=factory)
    assert report.ok, [(r.check, r.detail) for r in report.rows]
    assert calls == [f"http://127.0.0.1:{node.port}/api/hypercacheio",
                     f"http://node.test:{node.port}/api/hypercacheio"]
    assert {r.endpoint.host for r in report.rows} == {"node.test"}
    assert "127.0.0.1 did not answer" in report.rows[0].endpoint.note
    assert leftovers(node.directory) == ([], [])


def test_wrong_token_is_reported_and_never_printed(node: RunningNode) -> None:
    wrong = "wrong-token-0b7d41"
    proc = run_cli(node_env(node, HYPERCACHEIO_API_TOKEN=wrong))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "authentication failed" in out
    assert wrong not in out and TOKEN not in out
    assert "Traceback" not in out
    assert "ufw allow" not in out  # the node answered: no firewall advice
    assert leftovers(node.directory) == ([], [])


def test_closed_port_fails_with_firewall_advice() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({"HYPERCACHEIO_SERVER_TYPE": "node", "HYPERCACHEIO_NODE_PORT": str(port),
                "HYPERCACHEIO_API_TOKEN": TOKEN, "COLUMNS": "200"})
    proc = run_cli(env, "--timeout", "0.5")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "connection failed" in out
    assert TOKEN not in out
    family = chk.firewall_family()
    expected = {"ufw": f"sudo ufw allow {port}/tcp",
                "firewalld": f"--add-port={port}/tcp",
                "socketfilterfw": "socketfilterfw --unblockapp",
                "generic": f"--dport {port}"}[family]
    assert expected in out


# --- the embedded store -------------------------------------------------------------------


def test_embedded_mode_checks_the_local_store(tmp_path: Path) -> None:
    settings = Settings(directory=str(tmp_path / "data"), server_type="embedded")
    report = chk.run_check(settings)
    assert report.ok, [(r.check, r.detail) for r in report.rows]
    assert [r.check for r in report.rows] == list(chk.CHECKS)
    assert leftovers(tmp_path / "data") == ([], [])


# --- endpoints, advice, rendering ---------------------------------------------------------


def test_endpoints_by_role_and_the_peer_port_assumption() -> None:
    secondary = Settings(role="secondary", primary_url="http://p:9000/api/hypercacheio/",
                         peer_addrs=("10.0.0.2:7400", "[fd00::3]:7400"), node_port=8123)
    eps = chk.remote_endpoints(secondary, extra=["http://x:1", "http://p:9000/api/hypercacheio"])
    assert [(e.label, e.url) for e in eps] == [
        ("primary", "http://p:9000/api/hypercacheio"),
        ("peer 10.0.0.2:7400", "http://10.0.0.2:8123/api/hypercacheio"),
        ("peer fd00::3:7400", "http://[fd00::3]:8123/api/hypercacheio"),
        ("--endpoint", "http://x:1/api/hypercacheio"),
    ]
    assert "HYPERCACHEIO_NODE_PORT" in eps[1].note
    primary = Settings(secondary_urls=("http://s1:1/api", "http://s2:2/api"), ha_enabled=False,
                       peer_addrs=("10.0.0.2:7400",))
    assert [e.label for e in chk.remote_endpoints(primary)] == ["secondary 1", "secondary 2"]


@pytest.mark.parametrize(("system", "release", "family"), [
    ("Linux", {"ID": "ubuntu", "ID_LIKE": "debian"}, "ufw"),
    ("Linux", {"ID": "debian"}, "ufw"),
    ("Linux", {"ID": "fedora"}, "firewalld"),
    ("Linux", {"ID": "rocky", "ID_LIKE": "rhel centos fedora"}, "firewalld"),
    ("Linux", {"ID": "alpine"}, "generic"),
    ("Darwin", {}, "socketfilterfw"),
    ("FreeBSD", {}, "generic"),
])
def test_firewall_family(system: str, release: dict[str, str], family: str) -> None:
    assert chk.firewall_family(system, release) == family


def test_os_release_parsing(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text('# comment\nNAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\n')
    assert chk.read_os_release(str(path))["ID_LIKE"] == "rhel centos fedora"
    assert chk.read_os_release(str(tmp_path / "missing")) == {}


def test_firewall_advice_per_family() -> None:
    assert "  sudo ufw allow 8080/tcp" in chk.firewall_advice([8080], family="ufw")
    firewalld = chk.firewall_advice([8080, 8080, 9000], family="firewalld")
    assert firewalld.count("  sudo firewall-cmd --permanent --add-port=8080/tcp") == 1
    assert "  sudo firewall-cmd --reload" in firewalld
    mac = "\n".join(chk.firewall_advice([8080], family="socketfilterfw", python="/py"))
    assert f"{chk.SOCKETFILTERFW} --unblockapp /py" in mac


# --- failures a real node does not show: stand-in endpoints -------------------------------


class FakeLock:
    def __init__(self, node: FakeNode, name: str, owner: str | None) -> None:
        self.node, self.name, self.owner = node, name, owner or "anon"

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        holder = self.node.locks.get(self.name)
        if holder is None or self.node.broken_locks:
            self.node.locks[self.name] = self.owner
            return True
        return False

    def release(self) -> bool:
        if self.node.locks.get(self.name) == self.owner:
            del self.node.locks[self.name]
            return True
        return False


class FakeNode:
    """A dict with the RemoteCache methods the check uses, and switchable faults."""

    def __init__(self, *, add_always: bool = False, broken_locks: bool = False,
                 fail_get_with: Exception | None = None) -> None:
        self.data: dict[str, Any] = {}
        self.locks: dict[str, str] = {}
        self.add_always = add_always
        self.broken_locks = broken_locks
        self.fail_get_with = fail_get_with
        self.closed = False

    def ping(self) -> dict[str, Any]:
        return {"role": "primary", "node_id": "fake"}

    def get(self, key: str, default: Any = None) -> Any:
        if self.fail_get_with is not None:
            raise self.fail_get_with
        return self.data.get(key, default)

    def set(self, key: str, value: Any, ttl: Any = None) -> bool:
        self.data[key] = value
        return True

    def add(self, key: str, value: Any, ttl: Any = None) -> bool:
        if key in self.data and not self.add_always:
            return False
        self.data[key] = value
        return True

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def lock(self, name: str, ttl: Any = None, owner: str | None = None) -> FakeLock:
        return FakeLock(self, name, owner)

    def close(self) -> None:
        self.closed = True


def run_against(fake: FakeNode, token: str = TOKEN) -> chk.Report:
    settings = Settings(server_type="embedded", role="secondary", api_token=token,
                        primary_url="http://primary:8080/api/hypercacheio")
    return chk.run_check(settings, include_local=False, token=token,
                         client_factory=lambda ep, tok, timeout: fake)


def by_check(report: chk.Report) -> dict[str, chk.CheckRow]:
    return {r.check: r for r in report.rows}


def test_non_atomic_add_and_shared_lock_fail_and_are_cleaned_up() -> None:
    fake = FakeNode(add_always=True, broken_locks=True)
    report = run_against(fake)
    rows = by_check(report)
    assert rows["Add"].status == chk.FAIL and "not atomic" in rows["Add"].detail
    assert rows["Lock"].status == chk.FAIL and "mutual exclusion" in rows["Lock"].detail
    assert rows["Delete"].status == chk.PASS  # the other checks still ran
    assert report.exit_code == 1
    assert fake.data == {}
    assert fake.closed


def test_failure_details_never_show_the_token() -> None:
    fake = FakeNode(fail_get_with=RuntimeError(f"echoed header {TOKEN}"))
    report = run_against(fake)
    detail = by_check(report)["Get"].detail
    assert TOKEN not in detail and "***" in detail
    console = Console(record=True, width=200)
    render_report(report, console, family="ufw")
    assert TOKEN not in console.export_text()
    assert fake.data == {}


def test_a_node_that_answers_wrongly_gets_no_firewall_advice() -> None:
    class BusyNode(FakeNode):
        def ping(self) -> dict[str, Any]:
            raise NodeUnavailable("node answered 503: busy")

    report = run_against(BusyNode())
    assert by_check(report)["Ping"].detail == "bad answer: node answered 503: busy"
    assert report.unreachable == []
    assert {r.status for r in report.rows[1:]} == {chk.SKIP}


def test_transport_errors_are_shortened() -> None:
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

    pool: Any = None

    def wrapped(reason: Exception) -> NodeUnavailable:
        try:
            try:
                raise MaxRetryError(pool, "/api/hypercacheio/ping", reason=reason)
            except MaxRetryError as exc:
                raise NodeUnavailable("node at http://h:1 did not answer") from exc
        except NodeUnavailable as exc:
            return exc

    timeout = wrapped(ConnectTimeoutError(object(), "Connection to h timed out. (connect "
                                                    "timeout=1.0)"))
    assert chk.is_connection_failure(timeout)
    assert chk._describe(timeout) == ("connection failed: Connection to h timed out. "
                                      "(connect timeout=1.0)")
    conn: Any = object()
    refused = wrapped(NewConnectionError(conn, "Failed to establish a new connection: "
                                               "[Errno 111] Connection refused"))
    assert chk._describe(refused) == "connection failed: [Errno 111] Connection refused"


@pytest.fixture(scope="module")
def own_token_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node started as a new user starts it: no token set, so it generates node.token."""
    directory = tmp_path_factory.mktemp("own")
    with Node(str(directory), token=None) as running:  # type: ignore[arg-type]
        yield RunningNode(running.port, directory, running.url, "")


def test_check_finds_the_node_of_its_storage_directory(own_token_node: RunningNode) -> None:
    """No HYPERCACHEIO_SERVER_TYPE, no port, no token: the pid file in the storage directory
    says a node runs, and where; its node.token says which token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({"HYPERCACHEIO_SQLITE_PATH": str(own_token_node.directory), "COLUMNS": "200"})
    proc = run_cli(env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Server type: NODE" in out and "EMBEDDED" not in out
    assert "found by its pid file" in out and f"port {own_token_node.port}" in out
    assert own_token_node.url in out
    assert "all 6 checks passed" in out
    assert f"storage: {own_token_node.directory}" in proc.stderr


def test_wrong_directory_advice_names_the_directory(own_token_node: RunningNode,
                                                    tmp_path: Path) -> None:
    """Pointed at another directory, the check has no token for the node: the advice says
    to fix the directory, not that the hosts disagree on the token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({"HYPERCACHEIO_SQLITE_PATH": str(tmp_path / "elsewhere"), "COLUMNS": "200",
                "HYPERCACHEIO_SERVER_TYPE": "node",
                "HYPERCACHEIO_NODE_PORT": str(own_token_node.port)})
    proc = run_cli(env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "authentication failed" in out
    assert "--directory" in out and "HYPERCACHEIO_SQLITE_PATH" in out
    assert "set the same HYPERCACHEIO_API_TOKEN on every host" not in out
    token = (own_token_node.directory / "node.token").read_text().strip()
    assert token not in out
