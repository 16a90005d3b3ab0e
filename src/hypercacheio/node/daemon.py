"""The node process: logging, the pid file, the listening sites, signals and a clean stop.

``run`` serves until SIGTERM or SIGINT, then stops accepting, lets in-flight requests
finish (up to ``shutdown_timeout``), stops the collector, checkpoints and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import json
import logging
import os
import signal
import ssl
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import Settings
from ..errors import ConfigError, HypercacheioError
from ..store import Store
from .api import NodeState, build_app
from .gc import Collector
from .options import NodeOptions

log = logging.getLogger("hypercacheio.node")

PID_LOCK_TRIES = 20  # a status check holds the pid file's lock for an instant


class AlreadyRunning(HypercacheioError, RuntimeError):
    """Another node holds the pid file of this storage directory."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"a node is already running ({who}, pid file {path}); "
                         "stop it first (hypercacheio node stop) or use another directory")
        self.pid = pid


# ---- logging ------------------------------------------------------------------------------

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for name, value in vars(record).items():
            if name not in _RESERVED and not name.startswith("_"):
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs an unparsable request as an error with a traceback; it is the client's
    fault, answered with 400, so it becomes one info line (without the raw bytes, which
    could hold a token)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = str(exc.message).splitlines()[0] if exc.message else "unparsable"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed HTTP request answered %s: %s", (exc.code,
                                                                                  reason)
            record.exc_info = record.exc_text = None
        return True


def configure_logging(options: NodeOptions) -> None:
    """Structured logs to ``options.log_file`` or, without one, to stderr."""
    handler: logging.Handler
    if options.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(options.log_file)), exist_ok=True)
        handler = logging.FileHandler(options.log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(options.log_level)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    logging.getLogger("aiohttp.access").setLevel(
        logging.INFO if options.access_log else logging.WARNING)


# ---- the pid file -------------------------------------------------------------------------

def read_pid(path: str) -> int | None:
    """The pid written in a pid file, or None if there is none or it is unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


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
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if read_pid(self.path) == os.getpid():
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# ---- serving --------------------------------------------------------------------------------

def _ssl_context(options: NodeOptions) -> ssl.SSLContext | None:
    if not options.tls_cert or not options.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {options.tls_cert} and key "
                          f"{options.tls_key}: {exc}") from exc
    return ctx


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"the unix socket path {path} exists and is not a socket; "
                          "remove it or choose another HYPERCACHEIO_NODE_SOCKET")
    os.unlink(path)  # we hold the pid file: no live node of ours owns it


def open_store(settings: Settings) -> Store:
    return Store(settings.directory, busy_timeout=settings.busy_timeout,
                 max_bytes=settings.max_bytes, max_entries=settings.max_entries,
                 cull_frequency=settings.cull_frequency, clustered=settings.clustered,
                 allow_network_fs=settings.allow_network_fs)


async def serve(settings: Settings, options: NodeOptions, token: str, *, version: str,
                stop: asyncio.Event | None = None,
                on_ready: Callable[[NodeState], None] | None = None) -> None:
    """Serve the API until ``stop`` is set (or SIGTERM/SIGINT arrives), then shut down."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    ssl_ctx = _ssl_context(options)
    store = open_store(settings)
    state = NodeState(store, settings, options, token, version=version)
    app = build_app(state)
    runner = web.AppRunner(app, handle_signals=False, access_log=logging.getLogger(
        "aiohttp.access") if options.access_log else None,
        shutdown_timeout=options.shutdown_timeout)
    collector = Collector(state, options.gc_interval)
    await runner.setup()
    try:
        scheme = "https" if ssl_ctx else "http"
        tcp = web.TCPSite(runner, settings.node_listen_host, settings.node_port,
                          ssl_context=ssl_ctx, backlog=1024, reuse_address=True)
        await tcp.start()
        state.listen.append(f"{scheme}://{_bound(tcp, settings)}")
        if settings.node_socket:
            _remove_stale_socket(settings.node_socket)
            unix = web.UnixSite(runner, settings.node_socket, backlog=1024)
            await unix.start()
            os.chmod(settings.node_socket, 0o660)
            state.listen.append(f"unix:{settings.node_socket}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        collector.start()
        # What start-up allocated lives as long as the node: keep it out of the cyclic
        # collector's full passes, which would otherwise walk it (a tail-latency cost).
        gc.collect()
        gc.freeze()
        log.info("node listening", extra={"listen": state.listen, "node_id": store.node_id,
                                          "directory": settings.directory,
                                          "version": version})
        if on_ready is not None:
            on_ready(state)
        await stop.wait()
        log.info("node stopping: finishing in-flight requests")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()  # stops listening, waits for in-flight requests
        await collector.stop()
        try:
            store.checkpoint("TRUNCATE")
        except Exception as exc:  # a reader may hold the WAL; the next start will do it
            log.warning("final checkpoint skipped: %s", exc)
        store.close()
        if settings.node_socket:
            with contextlib.suppress(OSError):
                os.unlink(settings.node_socket)
        log.info("node stopped", extra={"uptime": round(state.uptime(), 3)})


def _bound(site: web.TCPSite, settings: Settings) -> str:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    if sockets:
        host, port = sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{settings.node_listen_host}:{settings.node_port}"


def run(settings: Settings, options: NodeOptions, token: str, *, version: str,
        on_ready: Callable[[NodeState], None] | None = None) -> None:
    """Run the node in this process until it is told to stop. Raises AlreadyRunning."""
    pid_file = PidFile(options.pid_path(settings))
    pid_file.acquire()
    try:
        main = serve(settings, options, token, version=version, on_ready=on_ready)
        factory = _loop_factory()
        if factory is not None and hasattr(asyncio, "Runner"):
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(main)
        else:
            asyncio.run(main)
    finally:
        pid_file.release()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (it serves HTTP faster), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
