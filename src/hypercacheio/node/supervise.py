"""Process supervision of a background node: the pid file, start, stop, status.

Nothing here prints: each verb returns an :class:`Outcome` (an exit code, a message and
notes), and the CLI turns it into lines. This module does not import aiohttp, so a host
without the server extra can still find out whether a node runs.

The pid file (``DIRECTORY/node.pid`` unless configured) is held locked by the node for its
whole life, so a file left by a dead process is recognised as stale. Its first line is the
pid; once the node listens, the following lines are its listen addresses, which is how
``node status`` and ``check`` find a node started with ``--port`` or ``--host``.

Exit codes: 0 done; 1 failed (or, for ``start``, a node already runs; for ``status``, a stale
pid file or a node that does not answer); 3 not running (``stop`` and ``status``, as LSB init
scripts say).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import API_PATH, Settings
from ..errors import AuthError, HypercacheioError
from .options import LOG_FILE, NodeOptions

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STALE = 1
EXIT_NOT_RUNNING = 3

PID_LOCK_TRIES = 20  # a status check holds the pid file's lock for an instant
SERVER_EXTRA_HINT = "pip install 'hypercacheio[server]'"
TOKEN_ADVICE = ("set HYPERCACHEIO_API_TOKEN to the node's token, or unset it to use the "
                "node.token of the storage directory")


class AlreadyRunning(HypercacheioError, RuntimeError):
    """Another node holds the pid file of this storage directory."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"a node is already running ({who}, pid file {path}); "
                         "stop it first (hypercacheio node stop) or use another directory")
        self.pid = pid


def missing_server_extra() -> str | None:
    """None when the node's dependencies import; else a one-line message with the fix."""
    for module in ("aiohttp", "multidict", "msgpack"):  # what the node server imports
        try:
            __import__(module)
        except ImportError:
            return (f"the node needs the server extra ({module} is not installed): "
                    f"{SERVER_EXTRA_HINT}  (from a checkout: pip install '.[server]')")
    return None


# ---- the pid file -------------------------------------------------------------------------

def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().split()
    except (OSError, UnicodeDecodeError):
        return []


def read_pid(path: str) -> int | None:
    """The pid written in a pid file, or None if there is none or it is unreadable."""
    words = _read_lines(path)
    try:
        return int(words[0]) if words else None
    except ValueError:
        return None


def read_listen(path: str) -> list[str]:
    """The addresses a running node recorded in its pid file (``http://h:p``, ``unix:...``)."""
    return _read_lines(path)[1:]


def pid_file_locked(path: str) -> bool:
    """True while a running node holds the pid file (its lock dies with the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class PidFile:
    """The pid file, held locked for the life of the node so that a stale one is obvious."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, sleep: Callable[[float], None] = time.sleep) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(PID_LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == PID_LOCK_TRIES - 1:
                    os.close(fd)
                    raise AlreadyRunning(self.path, read_pid(self.path)) from None
                sleep(0.01)
        self._fd = fd
        self._write([])

    def record_listen(self, listen: list[str]) -> None:
        """Add the addresses the node listens on (after the pid, one a line)."""
        if self._fd is not None:
            self._write(listen)

    def _write(self, listen: list[str]) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, "".join(f"{line}\n" for line in [str(os.getpid()), *listen])
                  .encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if read_pid(self.path) == os.getpid():
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# ---- where the node is --------------------------------------------------------------------

def _loopback_for(host: str) -> str:
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def client_url(settings: Settings, options: NodeOptions, pid_path: str | None = None) -> str:
    """Where a client on this host reaches the node: the address the running node recorded
    in its pid file, else the configured one (a wildcard listen address -> loopback)."""
    for addr in read_listen(pid_path or options.pid_path(settings)):
        scheme, sep, rest = addr.partition("://")
        if sep and scheme in ("http", "https"):
            host, _, port = rest.rpartition(":")
            return f"{scheme}://{_loopback_for(host)}:{port}{API_PATH}"
    scheme = "https" if options.tls_cert else "http"
    return f"{scheme}://{_loopback_for(settings.node_listen_host)}:{settings.node_port}{API_PATH}"


@dataclass(frozen=True)
class LocalNode:
    """A node that holds the pid file of this storage directory."""

    pid: int | None
    pid_file: str
    url: str
    unix_socket: str | None = None


def find_local_node(settings: Settings, options: NodeOptions) -> LocalNode | None:
    """The node running for ``settings.directory`` (by its pid file), if any."""
    pid_path = options.pid_path(settings)
    if not pid_file_locked(pid_path):
        return None
    sockets = [a[5:] for a in read_listen(pid_path) if a.startswith("unix:")]
    return LocalNode(read_pid(pid_path), pid_path, client_url(settings, options, pid_path),
                     sockets[0] if sockets else None)


def ping(url: str, token: str | None, timeout: float = 1.0) -> dict[str, Any]:
    """The node's ``/ping`` answer. Raises HypercacheioError (or another error for a server
    that is not a node)."""
    from .client import RemoteCache
    client = RemoteCache(url, token or "", timeout=timeout, verify=False)
    try:
        return client.ping()
    finally:
        client.close()


def port_in_use(host: str, port: int) -> bool:
    """True when another program listens on ``host:port`` (a bind that the node would fail)."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    return False


def port_in_use_message(settings: Settings) -> str:
    return (f"{settings.node_listen_host}:{settings.node_port} is already in use by another "
            "program; stop it or choose another --port (HYPERCACHEIO_NODE_PORT)")


# ---- the verbs ----------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a verb did: its exit code, a one-line message, and lines said on the way."""

    code: int
    message: str
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == EXIT_OK


def child_env(settings: Settings, options: NodeOptions, log_file: str) -> dict[str, str]:
    """The environment of a background node: this one plus every resolved setting."""
    env = dict(os.environ)
    env.update(settings.to_env(token=False))
    env.update(options.replace(pid_file=options.pid_path(settings), log_file=log_file).to_env())
    return env


def tail(path: str, lines: int = 15) -> str:
    """The last lines of a log file ("" if it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def start(settings: Settings, options: NodeOptions, token: str, wait: float) -> Outcome:
    """Start a background node and wait until it answers."""
    pid_path = options.pid_path(settings)
    notes: list[str] = []
    if pid_file_locked(pid_path):
        return Outcome(EXIT_FAILED, f"already running (pid {read_pid(pid_path)}, pid file "
                                    f"{pid_path}); use `hypercacheio node restart` to restart it")
    if os.path.exists(pid_path):
        notes.append(f"removing stale pid file {pid_path} "
                     f"(pid {read_pid(pid_path)} is not running)")
        os.unlink(pid_path)
    if port_in_use(settings.node_listen_host, settings.node_port):
        return Outcome(EXIT_FAILED, f"not started: {port_in_use_message(settings)}", notes)
    log_file = options.log_file or os.path.join(settings.directory, LOG_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    offset = os.path.getsize(log_file) if os.path.exists(log_file) else 0
    cmd = [sys.executable, "-m", "hypercacheio.cli", "node", "run", "--quiet"]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=child_env(settings, options, log_file),
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + wait
    last_error = ""
    url = client_url(settings, options)
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return Outcome(EXIT_FAILED, f"the node exited at start (code {code}); "
                           f"what it said in {log_file}:\n{_since(log_file, offset)}", notes)
        url = client_url(settings, options)
        try:
            info = ping(url, token, timeout=0.5)
            if info.get("pid") == proc.pid:
                return Outcome(EXIT_OK, f"started (pid {proc.pid}) on {url}; log {log_file}",
                               notes, {"pid": proc.pid, "url": url, "log_file": log_file})
            last_error = f"another process answers on {url} (pid {info.get('pid')})"
        except Exception as exc:  # refused while starting, or another server on the port
            last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        time.sleep(0.05)
    proc.terminate()
    return Outcome(EXIT_FAILED, f"the node did not answer within {wait:g} s ({last_error}); "
                   f"stopped it; what it said in {log_file}:\n{_since(log_file, offset)}", notes)


def _since(path: str, offset: int, lines: int = 15) -> str:
    """The last lines a process appended to ``path`` after ``offset``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def stop(settings: Settings, options: NodeOptions, timeout: float, force: bool) -> Outcome:
    """SIGTERM the node and wait for it to finish."""
    pid_path = options.pid_path(settings)
    pid = read_pid(pid_path)
    if not os.path.exists(pid_path):
        return Outcome(EXIT_NOT_RUNNING, f"not running (no pid file at {pid_path})")
    if not pid_file_locked(pid_path) or pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_path)
        return Outcome(EXIT_NOT_RUNNING, f"not running: removed the stale pid file {pid_path} "
                                         f"(pid {pid} had exited)")
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return Outcome(EXIT_NOT_RUNNING, f"not running (pid {pid} is gone)")
    except PermissionError:
        return Outcome(EXIT_FAILED, f"cannot signal pid {pid}: it belongs to another user")
    while time.monotonic() - started < timeout:
        if not pid_file_locked(pid_path):
            return Outcome(EXIT_OK, f"stopped (pid {pid}) in "
                                    f"{time.monotonic() - started:.2f} s")
        time.sleep(0.05)
    if force:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return Outcome(EXIT_OK, f"killed (pid {pid}): it did not stop within {timeout:g} s")
    return Outcome(EXIT_FAILED, f"pid {pid} did not stop within {timeout:g} s; "
                                "try again with --force to kill it")


def status(settings: Settings, options: NodeOptions, token: str | None) -> Outcome:
    """Pid, address and a live ping; ``details`` holds what ``status --json`` prints."""
    pid_path = options.pid_path(settings)
    pid = read_pid(pid_path)
    url = client_url(settings, options)
    out: dict[str, Any] = {"running": False, "pid": pid, "pid_file": pid_path, "url": url,
                           "directory": settings.directory}
    if not os.path.exists(pid_path):
        out["state"] = "stopped"
        code, text = EXIT_NOT_RUNNING, (f"not running (no pid file at {pid_path}; storage "
                                        f"directory {settings.directory})")
    elif not pid_file_locked(pid_path):
        out["state"] = "stale"
        code, text = EXIT_STALE, (f"not running, but a stale pid file remains: {pid_path} "
                                  f"(pid {pid} has exited); `node start` will replace it")
    else:
        out.update(running=True, state="running")
        t0 = time.perf_counter()
        try:
            info = ping(url, token)
            out["ping_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            out["node"] = info
            code, text = EXIT_OK, f"running (pid {pid}) on {url}"
            if "pid" not in info:  # /ping answers everyone, its figures only with the token
                text += f"; no token, so no figures: {TOKEN_ADVICE}"
            elif info["pid"] != pid:
                code, text = EXIT_FAILED, (f"pid {pid} holds the pid file but pid "
                                           f"{info.get('pid')} answers on {url}")
        except AuthError:
            out["state"] = "token refused"
            code, text = EXIT_FAILED, (f"running (pid {pid}) on {url}, but it refused this "
                                       f"host's token: {TOKEN_ADVICE}")
        except Exception as exc:  # not answering, or not a node at all
            out["state"] = "not answering"
            out["error"] = str(exc)
            code, text = EXIT_FAILED, f"running (pid {pid}) but not answering: {exc}"
    out["message"] = text
    return Outcome(code, text, details=out)
