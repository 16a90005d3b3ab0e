"""How RemoteCache moves one request: a keep-alive pool of sockets, one request at a time each.

Two interchangeable transports with one method, ``request(method, target, headers, body)``:

* ``FastTransport``: plain sockets (TCP with TCP_NODELAY, a unix socket, or TLS) whose
  responses are parsed by httptools (llhttp, the parser of Node.js). A GET costs a few
  microseconds of Python besides the round trip. Used when httptools is installed.
* ``Urllib3Transport``: urllib3's connection pool. Used otherwise.

Both raise ``TransportError`` (an ``OSError``; ``TimeoutError`` for a timeout) for anything
network-shaped; the client turns those into ``NodeUnavailable``.

Resending: a request marked idempotent (GET, DELETE, a SET of a given value) is sent once
more when a kept-alive connection turns out to be closed before any byte of the answer came
back. Any other request (incr, add, touch, lock acquire/extend/release, pull) is never sent
twice: it goes only on a pooled connection the peer has not closed (checked with a
zero-timeout ``select`` before sending; FastTransport also wants it idle for less than
REUSE_IDLE_MAX), else on a new one; when the node closes without answering it anyway, the
error says the outcome is unknown.

FastTransport earns its place over urllib3: ``benchmarks/bench_node.py --transport both
--n 3000 --pin --wrk-rounds 0`` (2 CPUs, 127.0.0.1, two runs) measured its p50 at 0.42-0.61x
urllib3's for every operation (GET 78 us against 171 us over TCP, 68 against 159 over a unix
socket; SET, ADD, INCR and LOCK+UNLOCK 0.55-0.61x).
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import Any, NamedTuple

try:
    import httptools
except ImportError:  # pragma: no cover - the urllib3 transport serves instead
    httptools = None  # type: ignore[assignment]

try:
    import urllib3
except ImportError:  # pragma: no cover - the library works without it
    urllib3 = None  # type: ignore[assignment]


RECV_BYTES = 65536  # below malloc's mmap threshold: no map/unmap per read
# Up to this size a request is sent with the kernel's per-call send timeout; a larger one
# under Python's timeout, which bounds the whole sendall().
KERNEL_TIMEOUT_SEND_MAX = 65536
# A request that must not be sent twice goes on a pooled connection only if it has been idle
# for less than this (seconds): far below any server's keep-alive limit, so the server will
# not close it while the request travels.
REUSE_IDLE_MAX = 1.0
UNKNOWN_OUTCOME = ("the node closed the connection without answering; the request was not "
                   "resent, so whether the node applied it is unknown")


class TransportError(OSError):
    """The node could not be reached, closed the connection, or sent no valid HTTP."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


class Target(NamedTuple):
    """Where the node is: host and port (TCP or TLS), or a unix socket path."""

    host: str
    port: int
    unix_socket: str | None = None
    tls: ssl.SSLContext | None = None


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """A client TLS context: verified by default, a CA file path, or (False) unverified."""
    ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_header_value(name: str, value: str) -> str:
    """Refuse a header value that could end the header early (CR, LF, NUL) or is not ASCII."""
    if not value.isascii() or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name} must be printable ASCII without line breaks")
    return value


# The node answers with the same few header names: each decoded and lower-cased once.
_HEADER_NAMES: dict[bytes, str] = {}
HEADER_NAMES_MAX = 256


class _Reader:
    """httptools callbacks collecting one response."""

    __slots__ = ("headers", "chunks", "done", "keep_alive", "parser")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.done = False
        self.keep_alive = False
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_HEADER_NAMES) < HEADER_NAMES_MAX:
                _HEADER_NAMES[name] = key
        self.headers[key] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True
        # llhttp answers keep-alive only until the parser moves past the message.
        self.keep_alive = self.parser.should_keep_alive()


class _Conn:
    """A kept-alive connection and its response parser, which llhttp resets after each
    complete message, so that one serves every answer on the connection."""

    __slots__ = ("sock", "reader", "parser", "idle_since")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle_since = 0.0
        self.reader = _Reader()
        self.parser = self.reader.parser = httptools.HttpResponseParser(self.reader)


class FastTransport:
    """Keep-alive sockets with httptools parsing; safe to share between threads."""

    def __init__(self, target: Target, timeout: float, maxsize: int = 8) -> None:
        if httptools is None:  # pragma: no cover
            raise ImportError("FastTransport needs httptools")
        self.target = target
        self.timeout = timeout
        self.maxsize = maxsize
        host = target.host if ":" not in target.host else f"[{target.host}]"
        self._host_line = f"Host: {host}:{target.port}\r\n".encode("ascii")
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self.connections_made = 0
        # (headers, their items, encoded): one tuple, replaced whole (threads share it).
        self._headers_cache: tuple[dict[str, str] | None, list[tuple[str, str]], bytes] = (
            None, [], b"")
        _TRANSPORTS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's sockets are not ours (nor is its lock's state)."""
        self._idle = []
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        t = self.target
        if t.unix_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(t.unix_socket)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((t.host, t.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.tls is not None:
                sock = t.tls.wrap_socket(sock, server_hostname=t.host)
        if t.tls is None and self.timeout and self.timeout > 0:
            _kernel_timeouts(sock, self.timeout)
        self.connections_made += 1
        return sock

    def _checkout(self) -> tuple[_Conn, bool]:
        """An idle connection (reused=True), or a new one.

        An idle connection the server has closed meanwhile shows up as an EOF before any
        byte of the answer; ``request`` then sends an idempotent request once more on a new
        connection.
        """
        # A fork empties the pool in the child (``_after_fork``): no getpid() per request.
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return _Conn(self._connect()), False

    def _checkout_safe(self) -> _Conn:
        """A connection for a request that must not be sent twice: a pooled one only if it
        was idle for less than REUSE_IDLE_MAX and the peer has not closed it (a socket with
        nothing to say between requests is not readable), else a new one."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if now - conn.idle_since < REUSE_IDLE_MAX and not _readable(conn.sock):
                return conn
            conn.sock.close()
        return _Conn(self._connect())

    def _checkin(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.sock.close()

    def _header_lines(self, headers: dict[str, str]) -> bytes:
        """The encoded header lines; those of the last headers seen are reused as they are."""
        items = list(headers.items())
        cached = self._headers_cache
        if headers is cached[0] and items == cached[1]:
            return cached[2]
        block = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in items)
        self._headers_cache = (headers, items, block)
        return block

    def request(self, method: str, target: str, headers: dict[str, str],
                body: bytes | None = None, idempotent: bool = True) -> Response:
        """Send one request and read its answer; TransportError (or TimeoutError) if not."""
        payload = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._host_line
        if headers:
            payload += self._header_lines(headers)
        if body is not None or method in ("POST", "PUT"):
            payload += b"Content-Length: %d\r\n\r\n" % len(body or b"")
            if body:
                payload += body
        else:
            payload += b"\r\n"
        if not idempotent:
            try:
                return self._exchange(self._checkout_safe(), payload)
            except _StaleConnection:
                raise TransportError(UNKNOWN_OUTCOME) from None
        conn, reused = self._checkout()
        try:
            return self._exchange(conn, payload)
        except _StaleConnection:
            if not reused:
                raise TransportError("the node closed the connection without answering") \
                    from None
        # The server closed an idle connection as we reused it (or went away): the request
        # is idempotent, so sending it once more on a new connection is safe.
        try:
            return self._exchange(_Conn(self._connect()), payload)
        except _StaleConnection:
            raise TransportError("the node closed the connection without answering, "
                                 "twice (it may be restarting or dying)") from None

    def _exchange(self, conn: _Conn, payload: bytes) -> Response:
        sock, reader, parser = conn.sock, conn.reader, conn.parser
        reader.headers = {}
        reader.chunks = []
        reader.done = False
        received = 0
        try:
            if len(payload) <= KERNEL_TIMEOUT_SEND_MAX or sock.gettimeout() is not None:
                sock.sendall(payload)
            else:
                sock.settimeout(self.timeout)  # the whole sendall() within the timeout
                try:
                    sock.sendall(payload)
                finally:
                    sock.settimeout(None)
            while not reader.done:
                data = sock.recv(RECV_BYTES)
                if not data:
                    if received == 0:
                        raise _StaleConnection
                    raise TransportError("the node closed the connection mid-response")
                received += len(data)
                parser.feed_data(data)
        except _StaleConnection:
            sock.close()
            raise
        except (OSError, httptools.HttpParserError) as exc:
            sock.close()
            if isinstance(exc, OSError) and received == 0 and isinstance(
                    exc, (ConnectionResetError, BrokenPipeError)):
                raise _StaleConnection from exc
            if isinstance(exc, BlockingIOError):  # SO_RCVTIMEO / SO_SNDTIMEO ran out
                raise TimeoutError("timed out") from exc
            if isinstance(exc, OSError):
                raise
            raise TransportError(f"the node sent a response that is not valid HTTP: {exc}") \
                from exc
        except BaseException:
            sock.close()
            raise
        # The answer first: once checked in, another thread may reuse the reader and parser.
        body = reader.chunks[0] if len(reader.chunks) == 1 else b"".join(reader.chunks)
        response = Response(parser.get_status_code(), reader.headers, body)
        if reader.keep_alive:
            self._checkin(conn)
        else:
            sock.close()
        return response

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.close()


def _readable(sock: socket.socket) -> bool:
    """True if an idle connection has something to read: the peer closed it (EOF, reset) or
    sent bytes nobody asked for; either way it cannot carry a request."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed or beyond select's range: do not trust it
        return True


def _kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    """Blocking mode with the timeout kept by the kernel (SO_RCVTIMEO, SO_SNDTIMEO).

    A socket in Python's timeout mode polls before every send and recv: two system calls
    more per request than a blocking one whose reads and writes the kernel itself times out
    (as EAGAIN, which ``_exchange`` reports as a timeout). Plain TCP and unix sockets only.
    """
    seconds = max(timeout, 0.001)  # 0 would mean: wait for ever
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    except OSError:  # not supported here: keep Python's timeout
        return
    sock.settimeout(None)


_TRANSPORTS: weakref.WeakSet[FastTransport] = weakref.WeakSet()


def _forked() -> None:
    for transport in list(_TRANSPORTS):
        transport._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _StaleConnection(Exception):
    """The connection was closed before any byte of the answer came back."""


class Urllib3Transport:
    """The same contract over urllib3's pool (used without httptools)."""

    def __init__(self, target: Target, timeout: float, maxsize: int = 8) -> None:
        if urllib3 is None:  # pragma: no cover
            raise ImportError("RemoteCache needs httptools or urllib3: "
                              "pip install 'hypercacheio[client]'")
        self.target = target
        t = urllib3.Timeout(connect=timeout, read=timeout)
        # urllib3 itself resends nothing: ``request`` decides (idempotent requests only).
        # Before reusing a pooled connection urllib3 checks that the peer has not closed it.
        options: dict[str, Any] = {"maxsize": maxsize, "block": False, "timeout": t}
        self._pool: urllib3.HTTPConnectionPool
        if target.unix_socket:
            self._pool = _unix_pool(target.unix_socket, **options)
        elif target.tls is not None:
            self._pool = urllib3.HTTPSConnectionPool(target.host, target.port,
                                                     ssl_context=target.tls, **options)
        else:
            self._pool = urllib3.HTTPConnectionPool(target.host, target.port, **options)

    @property
    def connections_made(self) -> int:
        return int(self._pool.num_connections)

    def request(self, method: str, target: str, headers: dict[str, str],
                body: bytes | None = None, idempotent: bool = True) -> Response:
        """Send one request and read its answer; TransportError (or TimeoutError) if not."""
        try:
            return self._send(method, target, headers, body)
        except _Dropped as exc:
            if not idempotent:
                raise TransportError(f"{UNKNOWN_OUTCOME} ({exc.__cause__})") from exc
        try:  # a pooled connection the node closed as we sent: once more, idempotent only
            return self._send(method, target, headers, body)
        except _Dropped as exc:
            raise TransportError(f"the node closed the connection without answering, twice "
                                 f"({exc.__cause__})") from exc

    def _send(self, method: str, target: str, headers: dict[str, str],
              body: bytes | None) -> Response:
        try:
            resp = self._pool.urlopen(method, target, body=body, headers=headers,
                                      retries=False, redirect=False, preload_content=True)
        except urllib3.exceptions.ProtocolError as exc:  # closed, reset or cut short
            raise _Dropped from exc
        except (urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
            raise TransportError(str(exc)) from exc
        return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                        resp.data)

    def close(self) -> None:
        self._pool.close()


class _Dropped(Exception):
    """urllib3 saw the connection closed or reset (before or during the answer)."""


def _unix_pool(socket_path: str, **options: Any) -> urllib3.HTTPConnectionPool:
    """A urllib3 pool whose connections go to a unix domain socket (the host is ignored)."""
    from urllib3.connection import HTTPConnection

    class UnixConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
                sock.settimeout(timeout)
                sock.connect(socket_path)
            except OSError:
                sock.close()
                raise
            return sock

    class UnixPool(urllib3.HTTPConnectionPool):
        ConnectionCls = UnixConnection

    return UnixPool("localhost", **options)


def make_transport(target: Target, timeout: float, maxsize: int = 8,
                   kind: str | None = None) -> FastTransport | Urllib3Transport:
    """The fast transport when httptools is there (or ``kind`` says which)."""
    kind = kind or ("fast" if httptools is not None else "urllib3")
    if kind == "fast":
        return FastTransport(target, timeout, maxsize)
    if kind == "urllib3":
        return Urllib3Transport(target, timeout, maxsize)
    raise ValueError(f"transport must be 'fast' or 'urllib3', got {kind!r}")
