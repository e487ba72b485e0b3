"""The daemon's HTTP server, built for clients that misbehave.

Idle and slow connections cost a socket, not a thread: one selector thread watches every open
connection and hands a connection to one of ``HTTP_WORKERS`` workers only once a whole request
head has arrived. A connection that has not sent a whole request ``daemon.http_timeout_seconds``
after connecting (or after its previous answer) is closed; open connections
(``daemon.http_max_connections``) and keep-alive requests are bounded; every error is one
structlog line, a client that went away a debug line. What is answered is :class:`~backupd.daemon.api.Api`'s.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import structlog

from backupd.config import DEFAULT_HTTP_MAX_CONNECTIONS, DEFAULT_HTTP_TIMEOUT_SECONDS
from backupd.errors import ConfigError

if TYPE_CHECKING:
    from backupd.daemon.api import Api

log = structlog.get_logger("backupd.api")


class Answer(NamedTuple):
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = {}


def json_answer(status: int, value: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, "application/json", json.dumps(value, default=str).encode(), headers or {})


class _Handler(BaseHTTPRequestHandler):
    """One request whose head the server loop has already read in full (``conn.buffer``);
    answers it on the connection's socket. Never blocks on reading: only the answer's write
    can wait (up to the server's timeout) on a client that does not read."""

    server: _Server  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def __init__(self, conn: _Connection, server: _Server) -> None:
        self.conn = conn
        super().__init__(conn.sock, conn.peer, server)  # type: ignore[arg-type]  # runs setup, handle, finish

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(bytes(self.conn.buffer))
        self.wfile = _SocketWriter(self.conn.sock)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        # what the client sent after this request (pipelining) is the start of the next one
        self.conn.buffer = bytearray(self.rfile.read())

    def finish(self) -> None:
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # access logs would drown the run_finished lines; errors are logged by the server

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # send_error below logs what the stdlib would print here

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests, unsupported methods, oversized headers: a JSON error, as every
        other answer (the stdlib's is an HTML page, without a status line for garbage it takes
        for HTTP/0.9, which backupd does not speak)."""
        # the client's problem, not the daemon's; its request line is not logged (it may hold anything)
        log.debug("http_bad_request", peer=_peer(self.conn), status=code)
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        self._answer(json_answer(code, {"error": message or HTTPStatus(code).phrase}))

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        try:
            answer = self.server.api.answer(url.path, parse_qs(url.query), self.headers.get("Authorization"))
        except Exception:
            log.exception("api_error", path=url.path)
            answer = json_answer(500, {"error": "internal error"})
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body nobody reads must not be taken for the next request
        if answer.status == 401:
            answer = answer._replace(headers={**answer.headers, "WWW-Authenticate": 'Bearer realm="backupd"'})
        self._answer(answer)

    def _not_allowed(self) -> None:
        self.close_connection = True  # its body, if any, is never read
        self._answer(json_answer(405, {"error": "read-only API: only GET"}, {"Allow": "GET"}))

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    def _answer(self, answer: Answer) -> None:
        if self.conn.served + 1 >= KEEPALIVE_REQUESTS:
            self.close_connection = True
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)


class _SocketWriter(io.BufferedIOBase):
    """``sendall`` each write: the socket's timeout bounds the whole write, not each piece."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


#: threads that answer requests; idle and slow clients never hold one (see _Server)
HTTP_WORKERS = 4
#: the request line and headers of one request at most (the API takes no request bodies)
MAX_REQUEST_HEAD = 16 * 1024
#: requests answered on one kept-alive connection before it is closed
KEEPALIVE_REQUESTS = 100

# A client that went away or stopped reading: its problem, worth a debug line, not a traceback.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: tuple[str, int]
    deadline: float  # the complete head of the next request must be in by then
    buffer: bytearray = field(default_factory=bytearray)
    served: int = 0
    busy: bool = False  # a worker is answering on it

    def head_complete(self) -> bool:
        return b"\r\n\r\n" in self.buffer or b"\n\n" in self.buffer


class _Server:
    """The HTTP server: one selector thread and a small pool of workers.

    The selector thread accepts connections and reads request heads without blocking, so a
    client that connects and sends nothing, or trickles a request, costs a socket and no
    thread. Only a complete request head goes to a worker (``HTTP_WORKERS`` threads), which
    answers it and hands the connection back for the next request (keep-alive, at most
    ``KEEPALIVE_REQUESTS`` per connection). A connection is closed when its next request is not
    complete ``timeout`` seconds after it connected or got its previous answer. At most
    ``max_connections`` are open: past that the longest-waiting idle one is closed for the
    newcomer, and while every open connection is being answered new ones wait in the listen
    backlog.
    """

    def __init__(self, address: tuple[str, int], api: Api, *, timeout: float = DEFAULT_HTTP_TIMEOUT_SECONDS,
                 max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS, workers: int = HTTP_WORKERS) -> None:
        self.api = api
        self.timeout = timeout
        self.max_connections = max_connections
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = socket.create_server(address, family=family, backlog=128)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self._selector = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._returned: queue.SimpleQueue[tuple[_Connection, bool]] = queue.SimpleQueue()
        self._open: set[_Connection] = set()  # touched by the selector thread only
        self._listening = False
        self._stop = threading.Event()

    # -- the selector thread --------------------------------------------------------------

    def serve_forever(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen(True)
        try:
            while not self._stop.is_set():
                for key, _events in self._selector.select(timeout=self._until_next_deadline()):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    else:
                        self._read(key.data)
                self._expire()
                if not self._listening and len(self._open) < self.max_connections:
                    self._listen(True)
        finally:
            for conn in [c for c in self._open if not c.busy]:  # server_close() closes the others
                self._close(conn)

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self.listener, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._selector.unregister(self.listener)
        self._listening = on

    def _until_next_deadline(self) -> float:
        waiting = [c.deadline for c in self._open if not c.busy]
        return max(0.0, min(waiting) - time.monotonic()) if waiting else 1.0

    def _accept(self) -> None:
        while True:
            full = len(self._open) >= self.max_connections
            if full and all(c.busy for c in self._open):
                self._listen(False)  # every connection is being answered: the rest wait in the backlog
                return
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: log it, keep serving the connections we have
                log.warning("http_accept_failed", error=str(exc))
                return
            if full:
                self._evict()
            sock.setblocking(False)
            conn = _Connection(sock, peer[:2], time.monotonic() + self.timeout)
            self._open.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> None:
        oldest = min((c for c in self._open if not c.busy), key=lambda c: c.deadline)
        log.debug("http_connection_evicted", peer=_peer(oldest), reason="max_connections")
        self._close(oldest)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("http_client_gone", peer=_peer(conn), error=type(exc).__name__)
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        if conn.head_complete():
            self._dispatch(conn)
        elif len(conn.buffer) > MAX_REQUEST_HEAD:
            log.debug("http_request_too_large", peer=_peer(conn), bytes=len(conn.buffer))
            with contextlib.suppress(OSError):
                conn.sock.send(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
            self._close(conn)

    def _dispatch(self, conn: _Connection) -> None:
        self._selector.unregister(conn.sock)
        conn.busy = True
        self._pool.submit(self._work, conn)

    def _take_back(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                conn, keep = self._returned.get_nowait()
            except queue.Empty:
                break
            conn.busy = False
            if not keep or self._stop.is_set():
                self._close(conn, registered=False)
                continue
            conn.deadline = time.monotonic() + self.timeout
            if conn.head_complete():  # a pipelined request already arrived
                conn.busy = True
                self._pool.submit(self._work, conn)
            else:
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._open if not c.busy and c.deadline <= now]:
            log.debug("http_connection_timed_out", peer=_peer(conn),
                      waiting_for="the rest of a request" if conn.buffer else "a request")
            self._close(conn)

    def _close(self, conn: _Connection, *, registered: bool = True) -> None:
        if registered and not conn.busy:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        self._open.discard(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    # -- the workers ----------------------------------------------------------------------

    def _work(self, conn: _Connection) -> None:
        keep = False
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(self.timeout)
            handler = _Handler(conn, self)
            conn.served += 1
            keep = not handler.close_connection and conn.served < KEEPALIVE_REQUESTS
            conn.sock.setblocking(False)
        except _CLIENT_GONE as exc:
            log.debug("http_client_gone", peer=_peer(conn), error=type(exc).__name__)
        except Exception:
            log.exception("http_error", peer=_peer(conn))
        finally:
            self._returned.put((conn, keep))
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def shutdown(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def server_close(self) -> None:
        """After the selector thread ended: let answers in progress finish, close the rest."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in list(self._open):
            self._close(conn, registered=False)
        self._selector.close()
        for sock in (self.listener, self._wake_r, self._wake_w):
            sock.close()


def _peer(conn: _Connection) -> str:
    host, port = conn.peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"daemon.http_listen: expected host:port, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class HttpServer:
    """The API on a background thread; ``start()`` returns the bound (host, port).

    ``timeout``: seconds a connection may take to send a complete request (from connecting, or
    from its previous answer); ``max_connections``: open connections at most (see _Server).
    """

    def __init__(self, api: Api, listen: str, *, timeout: float = DEFAULT_HTTP_TIMEOUT_SECONDS,
                 max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS) -> None:
        self.api = api
        self.address = parse_listen(listen)
        self.timeout = timeout
        self.max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        try:
            self._server = _Server(self.address, self.api, timeout=self.timeout, max_connections=self.max_connections)
        except OSError as exc:
            raise ConfigError(f"daemon.http_listen: cannot listen on {self.address[0]}:{self.address[1]}: "
                              f"{exc.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        log.info("http_listening", address=f"{host}:{port}")
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server.server_close()
