"""The node process: logging, the listening sites, signals and a clean stop.

The pid file and the start/stop of a background node are in ``supervise.py``.

``run`` serves until SIGTERM or SIGINT, then stops accepting, lets in-flight requests
finish (up to ``shutdown_timeout``), stops the collector, checkpoints and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import os
import signal
import ssl
import stat
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import Settings
from ..errors import ConfigError
from ..store import Store
from .connections import ConnectionGate, connection_cap, raise_open_file_limit
from .gc import Collector
from .options import NodeOptions
from .routing import build_app
from .state import NodeState, store_call
from .supervise import AlreadyRunning, PidFile, pid_file_locked, read_pid

if TYPE_CHECKING:
    from ..replication.mesh import Mesh
    from ..replication.push import Pusher

__all__ = ["AlreadyRunning", "configure_logging", "pid_file_locked", "read_pid", "run", "serve"]

log = logging.getLogger("hypercacheio.node")

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


SWITCH_INTERVAL_SECONDS = 0.001  # the GIL hand-over bound in a node (see serve)

# TEST ONLY (the cluster fault suite's clock skew, tests/cluster/nemesis.py): seconds added
# to this node's wall clock, as a host whose clock is off by that much would have: expiry,
# hybrid-logical-clock versions and lock leases all follow it. Not a configuration setting
# (never documented as one); unset or 0 in every real deployment.
TEST_CLOCK_OFFSET_ENV = "HYPERCACHEIO_TEST_CLOCK_OFFSET"


def clock_for_tests(environ: Mapping[str, str] | None = None) -> Callable[[], float]:
    """``time.time``, or ``time.time() + offset`` under ``HYPERCACHEIO_TEST_CLOCK_OFFSET``
    (test only). Raises ConfigError for a value that is not a finite number of seconds."""
    raw = (os.environ if environ is None else environ).get(TEST_CLOCK_OFFSET_ENV, "").strip()
    if not raw:
        return time.time
    try:
        offset = float(raw)
    except ValueError:
        offset = math.nan
    if not math.isfinite(offset):
        raise ConfigError(f"{TEST_CLOCK_OFFSET_ENV}={raw!r} is not a number of seconds; it is "
                          "a test-only clock offset: unset it (or give e.g. 1.5 or -0.5)")
    if offset == 0:
        return time.time
    log.warning("test-only clock offset in effect: this node's clock runs %+.3f s off",
                offset, extra={"clock_offset": offset})

    def skewed() -> float:
        return time.time() + offset
    return skewed


def open_store(settings: Settings) -> Store:
    return Store(settings.directory, busy_timeout=settings.busy_timeout,
                 max_bytes=settings.max_bytes, max_entries=settings.max_entries,
                 cull_frequency=settings.cull_frequency, clustered=settings.clustered,
                 allow_network_fs=settings.allow_network_fs, clock=clock_for_tests())


async def serve(settings: Settings, options: NodeOptions, token: str, *, version: str,
                stop: asyncio.Event | None = None,
                on_ready: Callable[[NodeState], None] | None = None) -> None:
    """Serve the API until ``stop`` is set (or SIGTERM/SIGINT arrives), then shut down."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    ssl_ctx = _ssl_context(options)
    fd_limit = raise_open_file_limit()
    _quiet_server_header()
    store = open_store(settings)
    state = NodeState(store, settings, options, token, version=version)
    app = build_app(state)
    # keepalive_timeout: an idle keep-alive connection closes after this many seconds.
    runner = web.AppRunner(app, handle_signals=False, access_log=logging.getLogger(
        "aiohttp.access") if options.access_log else None,
        shutdown_timeout=options.shutdown_timeout, keepalive_timeout=options.idle_timeout)
    collector = state.collector = Collector(store, options.gc_interval)
    await runner.setup()
    servers: list[asyncio.AbstractServer] = []
    try:
        assert runner.server is not None
        gate = ConnectionGate(runner.server, state,
                              connection_cap(options.max_connections, fd_limit),
                              options.read_timeout)
        if settings.active_active:
            # before the API listens: a request answered in between would take the
            # standalone path (a lock or an add granted locally, a write of a new store
            # not yet marked multi-writer, so never streamed), found by tests/cluster
            state.mesh = _mesh(state, token)
            await loop.run_in_executor(None, state.mesh.start)
        scheme = "https" if ssl_ctx else "http"
        tcp = await loop.create_server(gate, settings.node_listen_host, settings.node_port,
                                       ssl=ssl_ctx, backlog=1024, reuse_address=True)
        servers.append(tcp)
        state.listen.append(f"{scheme}://{_bound(tcp, settings)}")
        if settings.node_socket:
            _remove_stale_socket(settings.node_socket)
            servers.append(await loop.create_unix_server(gate, settings.node_socket,
                                                         backlog=1024))
            os.chmod(settings.node_socket, 0o660)
            state.listen.append(f"unix:{settings.node_socket}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        collector.start()
        if settings.role == "primary" and settings.secondary_urls:
            state.replication = _pusher(state, token)
            await state.replication.start()
        # What start-up allocated lives as long as the node: keep it out of the cyclic
        # collector's full passes, which would otherwise walk it (a tail-latency cost).
        gc.collect()
        gc.freeze()
        # The API's loop, the mesh's loop and their worker threads share one GIL: a thread
        # woken by a frame or a request waits up to this long for a busy one to yield it
        # (Python's default, 5 ms, is a whole lag budget of the mesh).
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
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
        for server in servers:
            server.close()  # stop listening
        await runner.cleanup()  # waits for in-flight requests
        await collector.stop()
        if state.replication is not None:
            await state.replication.stop()
        if state.mesh is not None:
            await loop.run_in_executor(None, state.mesh.stop)
        try:
            store.checkpoint("TRUNCATE")
        except Exception as exc:  # a reader may hold the WAL; the next start will do it
            log.warning("final checkpoint skipped: %s", exc)
        store.close()
        if settings.node_socket:
            with contextlib.suppress(OSError):
                os.unlink(settings.node_socket)
        log.info("node stopped", extra={"uptime": round(state.uptime(), 3)})


def _pusher(state: NodeState, token: str) -> Pusher:
    """The primary's push to its secondaries (replication/push.py)."""
    from ..replication.push import Pusher

    settings = state.settings
    return Pusher(state.store, settings.secondary_urls, token=token, timeout=settings.timeout,
                  call=functools.partial(store_call, state))


def _mesh(state: NodeState, token: str) -> Mesh:
    """Active-active replication with the peers (replication/mesh.py)."""
    from ..replication.mesh import Mesh

    return Mesh(state.store, state.settings, token)


def _bound(server: asyncio.AbstractServer, settings: Settings) -> str:
    sockets = getattr(server, "sockets", None) or []
    if sockets:
        host, port = sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{settings.node_listen_host}:{settings.node_port}"


def _quiet_server_header() -> None:
    """Answer ``Server: hypercacheio`` instead of aiohttp's, which names the aiohttp and
    Python versions (aiohttp sets the header on every response unless one is given; it
    reads this module constant each time, so this costs nothing per request)."""
    from aiohttp import web_response

    if hasattr(web_response, "SERVER_SOFTWARE"):
        web_response.SERVER_SOFTWARE = "hypercacheio"


def run(settings: Settings, options: NodeOptions, token: str, *, version: str,
        on_ready: Callable[[NodeState], None] | None = None) -> None:
    """Run the node in this process until it is told to stop. Raises AlreadyRunning."""
    pid_file = PidFile(options.pid_path(settings))
    pid_file.acquire()

    def ready(state: NodeState) -> None:
        pid_file.record_listen(state.listen)  # how `node status` and `check` find it
        if on_ready is not None:
            on_ready(state)

    try:
        main = serve(settings, options, token, version=version, on_ready=ready)
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
