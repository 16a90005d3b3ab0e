"""Real node daemons for tests: a subprocess on 127.0.0.1, a free port, a temporary directory."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from hypercacheio import RemoteCache

PREFIX = "/api/hypercacheio"
TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_env(directory: str, port: int, token: str | None = TOKEN,
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a node (or a CLI call) for ``directory`` on ``port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERCACHEIO_")}
    env.update({
        "HYPERCACHEIO_SQLITE_PATH": directory,
        "HYPERCACHEIO_NODE_LISTEN_HOST": "127.0.0.1",
        "HYPERCACHEIO_NODE_PORT": str(port),
        "HYPERCACHEIO_NODE_LOG_FILE": os.path.join(directory, "node.log"),
        "PYTHONUNBUFFERED": "1",
    })
    if token is not None:
        env["HYPERCACHEIO_API_TOKEN"] = token
    env.update(extra or {})
    return env


def cli(*args: str, env: Mapping[str, str], timeout: float = 30.0
        ) -> subprocess.CompletedProcess[str]:
    """Run ``hypercacheio ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "hypercacheio.cli", *args], env=dict(env),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class Node:
    """A node daemon running ``hypercacheio node run`` in a subprocess."""

    def __init__(self, directory: str, *, token: str = TOKEN, unix_socket: str | None = None,
                 tls: tuple[str, str] | None = None,
                 extra_env: Mapping[str, str] | None = None,
                 nofile: int | None = None) -> None:
        self.directory = directory
        self.token = token
        self.port = free_port()
        self.unix_socket = unix_socket
        extra = dict(extra_env or {})
        if unix_socket:
            extra["HYPERCACHEIO_NODE_SOCKET"] = unix_socket
        self.tls = tls
        if tls:
            extra["HYPERCACHEIO_NODE_TLS_CERT"], extra["HYPERCACHEIO_NODE_TLS_KEY"] = tls
        self.env = node_env(directory, self.port, token, extra)
        self.log_file = self.env["HYPERCACHEIO_NODE_LOG_FILE"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.nofile = nofile  # the soft open-file limit the node starts with (None: ours)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}{PREFIX}"

    def start(self, timeout: float = 15.0) -> Node:
        if self.proc is not None and self.proc.poll() is None:
            # a second process would orphan the first (nothing would ever stop it)
            raise RuntimeError(f"node on {self.directory} is already running; stop it first")
        os.makedirs(self.directory, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hypercacheio.cli", "node", "run", "--quiet"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.directory, "node.stderr"), "ab"),  # noqa: SIM115
            preexec_fn=self._limits if self.nofile is not None else None)
        if not wait_until(self._answers, timeout):
            self.kill()
            raise RuntimeError(f"node did not answer on {self.url}; log:\n{self.log()}")
        return self

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, hard))

    def metric(self, name: str) -> float:
        """One figure of ``/metrics`` (``hypercacheio_NAME``)."""
        text = self.request("GET", "/metrics")[2].decode()
        for line in text.splitlines():
            if line.startswith(f"hypercacheio_{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}; log:\n{self.log()}")
        try:
            status, _, _ = self.request("GET", "/ping", token=None, timeout=0.5)
            return status == 200
        except OSError:
            return False

    def log(self) -> str:
        text = ""
        for name in (self.log_file, os.path.join(self.directory, "node.stderr")):
            try:
                with open(name, encoding="utf-8", errors="replace") as fh:
                    text += fh.read()
            except OSError:
                pass
        return text

    def client(self, **kwargs: Any) -> RemoteCache:
        return RemoteCache(self.url, self.token, **kwargs)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, token: str | None = TOKEN,
                timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request (as curl would send it): status, headers, body."""
        conn: http.client.HTTPConnection
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            sent = dict(headers or {})
            if token is not None:
                sent.setdefault("X-Hypercacheio-Token", self.token if token == TOKEN else token)
            conn.request(method, PREFIX + path, body=body, headers=sent)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None, token: str | None = TOKEN,
             timeout: float = 5.0) -> tuple[int, Any]:
        status, hdrs, data = self.request(method, path, body, headers, token, timeout)
        assert hdrs.get("content-type", "").startswith("application/json"), (status, data)
        return status, json.loads(data)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the node and wait for it to exit; returns its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.kill()
