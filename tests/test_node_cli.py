"""``hypercacheio node run|start|stop|status|restart`` with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hypercacheio import RemoteCache
from node_helpers import cli, free_port, node_env, wait_until

pytestmark = pytest.mark.timeout(120)


def _pid(directory: Path) -> int:
    return int((directory / "node.pid").read_text().split()[0])


def test_lifecycle_start_status_start_stop_stop_stale(tmp_path: Path) -> None:
    d = tmp_path / "n"
    env = node_env(str(d), free_port())
    started = cli("node", "start", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "started (pid" in started.stdout
    pid = _pid(d)

    status = cli("node", "status", env=env)
    assert status.returncode == 0 and f"running (pid {pid})" in status.stdout
    assert "uptime" in status.stdout and "ping" in status.stdout
    doc = json.loads(cli("node", "status", "--json", env=env).stdout)
    assert doc["running"] and doc["node"]["pid"] == pid and doc["ping_ms"] >= 0

    again = cli("node", "start", env=env)
    assert again.returncode == 1 and "already running" in again.stderr and str(pid) in again.stderr

    stopped = cli("node", "stop", env=env)
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
    assert not (d / "node.pid").exists()
    log = (d / "node.log").read_text()
    assert '"node stopped"' in log and env["HYPERCACHEIO_API_TOKEN"] not in log

    twice = cli("node", "stop", env=env)
    assert twice.returncode == 3 and "not running" in twice.stdout
    assert cli("node", "status", env=env).returncode == 3

    # a pid file left by a process that no longer exists
    (d / "node.pid").write_text("999999\n")
    stale = cli("node", "status", env=env)
    assert stale.returncode == 1 and "stale pid file" in stale.stdout
    stale_stop = cli("node", "stop", env=env)
    assert stale_stop.returncode == 3 and "stale pid file" in stale_stop.stdout
    assert not (d / "node.pid").exists()
    (d / "node.pid").write_text("999999\n")
    restarted = cli("node", "start", env=env)
    assert restarted.returncode == 0 and "stale pid file" in restarted.stdout
    new_pid = _pid(d)
    assert cli("node", "restart", env=env).returncode == 0
    assert _pid(d) != new_pid
    assert cli("node", "stop", env=env).returncode == 0


def test_kill_9_then_start_brings_the_data_back(tmp_path: Path) -> None:
    d = tmp_path / "n"
    port = free_port()
    env = node_env(str(d), port)
    assert cli("node", "start", env=env).returncode == 0
    rc = RemoteCache(f"http://127.0.0.1:{port}", env["HYPERCACHEIO_API_TOKEN"])
    for i in range(200):
        rc.set(f"k{i}", i)
    rc.incr("counter", 7)
    lock = rc.lock("held", ttl=None)
    assert lock.acquire()
    os.kill(_pid(d), signal.SIGKILL)
    assert wait_until(lambda: cli("node", "status", env=env).returncode == 1, 10)
    result = cli("node", "start", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stale pid file" in result.stdout
    assert [rc.get(f"k{i}") for i in range(200)] == list(range(200))
    assert rc.get("counter") == 7
    assert lock.owned()
    assert cli("node", "stop", env=env).returncode == 0
    rc.close()


def test_first_run_generates_token_once_and_reuses_it(tmp_path: Path) -> None:
    d = tmp_path / "fresh"
    port = free_port()
    env = node_env(str(d), port, token=None)
    proc = subprocess.Popen([sys.executable, "-m", "hypercacheio.cli", "node", "run"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        token_file = d / "node.token"
        assert wait_until(lambda: _answers(port), 15)
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.count(token) == 2 + 1  # printed once, plus in the two curl lines
    assert f"curl -H 'X-Hypercacheio-Token: {token}' -d 'hello' " \
           f"http://127.0.0.1:{port}/api/hypercacheio/cache/greeting" in out
    # the curl line works as printed (http.client stands in for curl)
    assert RemoteCache(f"http://127.0.0.1:{port}", token).url in out
    # a later start reuses the saved token and does not print it
    started = cli("node", "start", env=env)
    assert started.returncode == 0 and token not in started.stdout
    rc = RemoteCache(f"http://127.0.0.1:{port}", token)
    rc.set("greeting", b"hello")
    assert rc.get("greeting") == b"hello"
    assert cli("node", "stop", env=env).returncode == 0
    assert token not in (d / "node.log").read_text()


def _answers(port: int) -> bool:
    try:
        return RemoteCache(f"http://127.0.0.1:{port}", "", timeout=0.3).ping()["ok"] is True
    except Exception:
        return False


@pytest.mark.parametrize("token", ["changeme", ""])
def test_refuses_default_token_on_a_public_address(tmp_path: Path, token: str) -> None:
    env = node_env(str(tmp_path / "pub"), free_port(), token=token,
                   extra={"HYPERCACHEIO_NODE_LISTEN_HOST": "0.0.0.0"})
    result = cli("node", "run", env=env, timeout=20)
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "HYPERCACHEIO_API_TOKEN" in result.stderr
    start = cli("node", "start", env=env, timeout=20)
    assert start.returncode == 1 and "refusing" in start.stderr


def test_start_reports_a_node_that_cannot_start(tmp_path: Path) -> None:
    env = node_env(str(tmp_path / "bad"), free_port(),
                   extra={"HYPERCACHEIO_NODE_TLS_CERT": str(tmp_path / "missing.pem"),
                          "HYPERCACHEIO_NODE_TLS_KEY": str(tmp_path / "missing.key")})
    result = cli("node", "start", "--wait", "10", env=env)
    assert result.returncode == 1
    assert "exited at start" in result.stderr and "TLS certificate" in result.stderr


def test_help_lists_the_verbs() -> None:
    result = cli("node", "--help", env=dict(os.environ))
    for verb in ("run", "start", "stop", "status", "restart"):
        assert verb in result.stdout


def test_options_are_validated() -> None:
    from hypercacheio import ConfigError
    from hypercacheio.node.options import NodeOptions

    assert NodeOptions.from_env({"HYPERCACHEIO_NODE_RATE_LIMIT": "5"}).rate_limit == 5.0
    for env in ({"HYPERCACHEIO_NODE_MAX_VALUE_BYTES": "lots"},
                {"HYPERCACHEIO_NODE_MAX_VALUE_BYTES": "0"},
                {"HYPERCACHEIO_NODE_RATE_LIMIT": "-1"},
                {"HYPERCACHEIO_NODE_GC_INTERVAL": "0"},
                {"HYPERCACHEIO_NODE_LOG_LEVEL": "chatty"},
                {"HYPERCACHEIO_NODE_TLS_CERT": "/c.pem"}):
        with pytest.raises(ConfigError):
            NodeOptions.from_env(env)


def test_token_resolution(tmp_path: Path) -> None:
    from hypercacheio import ConfigError, Settings
    from hypercacheio.auth import resolve_token

    loopback = Settings(directory=str(tmp_path / "a"))
    token, generated = resolve_token(loopback, explicit=False)
    assert generated and len(token) >= 32
    assert resolve_token(loopback, explicit=False) == (token, False)  # reused
    assert resolve_token(loopback.replace(api_token="mine"), explicit=True) == ("mine", False)
    assert resolve_token(loopback.replace(api_token="changeme"), explicit=True)[0] == "changeme"
    public = loopback.replace(node_listen_host="0.0.0.0", api_token="changeme")
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        resolve_token(public, explicit=True)
    with pytest.raises(ConfigError):
        resolve_token(public.replace(api_token=""), explicit=True)
    assert resolve_token(public.replace(api_token="s3cret-long"), explicit=True)[0] \
        == "s3cret-long"


def test_run_on_a_busy_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        env = node_env(str(tmp_path / "busy"), busy.getsockname()[1])
        result = cli("node", "run", env=env)
    assert result.returncode == 1 and "already in use" in result.stderr


def test_start_on_a_port_held_by_another_http_server_is_one_line(tmp_path: Path) -> None:
    """Another web server answers on the port: no traceback, one line with the fix."""
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                              "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _listening(port), 10)
        env = node_env(str(tmp_path / "d"), port)
        result = cli("node", "start", "--wait", "5", env=env)
        assert result.returncode == 1
        assert "Traceback" not in result.stdout + result.stderr
        assert f"127.0.0.1:{port} is already in use by another program" in result.stderr
        assert "--port" in result.stderr
        assert not (tmp_path / "d" / "node.pid").exists()
    finally:
        other.terminate()
        other.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("verb", ["run", "start", "stop", "status", "restart"])
def test_without_the_server_extra_every_verb_says_how_to_install(tmp_path: Path,
                                                                 verb: str) -> None:
    code = ("import sys\n"
            "sys.modules['aiohttp'] = None  # as if the [server] extra were not installed\n"
            "from hypercacheio.cli import main\n"
            f"sys.argv = ['hypercacheio', 'node', {verb!r}]\n"
            "main()\n")
    env = node_env(str(tmp_path / "d"), free_port())
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("storage:")]
    assert len(lines) == 1 and "pip install 'hypercacheio[server]'" in lines[0], result.stderr


def test_status_finds_a_node_started_on_another_port_by_its_pid_file(tmp_path: Path) -> None:
    d = tmp_path / "n"
    port = free_port()
    env = node_env(str(d), 8080)  # the environment says 8080; the node runs on --port
    started = cli("node", "start", "--port", str(port), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        status = cli("node", "status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"127.0.0.1:{port}" in status.stdout
        assert f"storage: {d}" in status.stderr
    finally:
        assert cli("node", "stop", env=env).returncode == 0


def test_status_with_a_refused_token_says_so(tmp_path: Path) -> None:
    d = tmp_path / "n"
    env = node_env(str(d), free_port())
    assert cli("node", "start", env=env).returncode == 0
    try:
        wrong = dict(env, HYPERCACHEIO_API_TOKEN="not-the-token-123")
        status = cli("node", "status", env=wrong)
        assert status.returncode == 1 and "running (pid" in status.stdout
        assert "refused this host's token" in status.stdout
        assert json.loads(cli("node", "status", "--json", env=wrong).stdout)["state"] \
            == "token refused"
        assert "not-the-token-123" not in status.stdout + status.stderr
    finally:
        assert cli("node", "stop", env=env).returncode == 0
