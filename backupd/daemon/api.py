"""The daemon's HTTP server: health, readiness, Prometheus metrics and a read-only JSON API.

=================  ========================================================================
``/healthz``       200 while the process serves requests (liveness)
``/readyz``        200 when the catalog answers with the current schema and the kubelet
                   answers; 503 with the failing check otherwise (results cached a few seconds
                   so probes do not hammer the kubelet)
``/metrics``       Prometheus text exposition
``/openapi.json``  the OpenAPI 3.1 document of the JSON API
``/api/v1/...``    ``policies``, ``archives``, ``runs``, ``report`` (read-only JSON)
=================  ========================================================================

With ``daemon.api_token_file`` set, ``/api/v1/*`` requires ``Authorization: Bearer <token>``;
health, readiness, metrics and the OpenAPI document stay open (probes and scrapers carry no
secrets). Query parameters are validated: bad values get a 400 with a JSON error, never a 500.

The server is built for clients that misbehave (:class:`_Server`): idle and slow connections
cost a socket, not a thread; a connection that has not sent a whole request
``daemon.http_timeout_seconds`` after connecting (or after its previous answer) is closed;
threads are bounded (one selector thread, ``HTTP_WORKERS`` workers) and so are open
connections (``daemon.http_max_connections``) and keep-alive; every error is one structlog
line, a client that went away a debug line.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog
from pydantic import BaseModel, Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode

from backupd import __version__
from backupd.catalog.store import Catalog, Cursor
from backupd.config import DEFAULT_HTTP_MAX_CONNECTIONS, DEFAULT_HTTP_TIMEOUT_SECONDS
from backupd.errors import BackupdError, ConfigError, InvalidInput
from backupd.metrics import Metrics
from backupd.model import (
    ARCHIVE_STATES,
    COMMITTED,
    RUN_FAILED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    Archive,
    Run,
)
from backupd.policy.document import PolicyDocument, RefusedPolicy, stored_document
from backupd.report.model import RetentionReportJson

log = structlog.get_logger("backupd.api")

READY_CACHE_SECONDS = 5.0


class BadRequest(Exception):
    pass


def limit_param(query: dict[str, list[str]], default: int = 100) -> int:
    """The ``limit`` query parameter: 1 to 1000, ``default`` when absent."""
    raw = query.get("limit", [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be an integer, got {raw!r}") from None
    if not 1 <= value <= 1000:
        raise BadRequest(f"limit must be between 1 and 1000, got {value}")
    return value


def cursor_param(query: dict[str, list[str]], *, numeric_id: bool = False) -> Cursor | None:
    """The ``after`` query parameter: a listing's page cursor, None when absent."""
    text = single_param(query, "after")
    return Cursor.parse(text, "after", numeric_id=numeric_id) if text is not None else None


def single_param(query: dict[str, list[str]], name: str, choices: tuple[str, ...] | None = None) -> str | None:
    """The query parameter ``name`` (its last value when repeated), None when absent; one of
    ``choices`` when they are given."""
    values = query.get(name)
    if not values:
        return None
    value = values[-1]
    if choices is not None and value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


RUN_KINDS = ("checkpoint", "prune", "verify", "delete")
RUN_OUTCOMES = (RUNNING, SUCCEEDED, RUN_FAILED, SKIPPED)


class ApiError(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="What is wrong, naming the offending value")


#: What each answer of the API is, by component name: the OpenAPI schemas are generated from
#: these types (the JSON the API writes comes from them too: ``Archive.to_json``,
#: ``Run.to_json``, :func:`~backupd.policy.document.stored_document`, and
#: ``RetentionReport.to_json``, which mypy holds to its TypedDict).
COMPONENTS: dict[str, tuple[Any, JsonSchemaMode]] = {
    "Archive": (Archive, "serialization"),
    "Run": (Run, "serialization"),
    # validation: PolicySpec's serializer (it leaves the default groupBy out) hides its fields
    "Policy": (PolicyDocument | RefusedPolicy, "validation"),
    "Report": (RetentionReportJson, "serialization"),
    "Error": (ApiError, "serialization"),
}
SCHEMA_REF = "#/components/schemas/{model}"


class _EveryFieldWritten(GenerateJsonSchema):
    """Serialization schemas that require every field: ``to_json`` writes them all, defaults too."""

    def field_is_required(self, field: Any, total: bool) -> bool:
        if field.get("type") == "typed-dict-field" and field.get("required") is False:
            return False  # NotRequired: written only sometimes (the report's dedup fields)
        return self.mode == "serialization" or super().field_is_required(field, total)


def component_schemas() -> dict[str, Any]:
    """The JSON Schemas of :data:`COMPONENTS`, and of the models they refer to, by name."""
    schemas: dict[str, Any] = {}
    for name, (shape, mode) in COMPONENTS.items():
        schema = TypeAdapter(shape).json_schema(mode=mode, ref_template=SCHEMA_REF, schema_generator=_EveryFieldWritten)
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = {**schema, "title": name}
    return schemas


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the JSON API (its schemas are JSON Schema 2020-12)."""
    text = {"type": "string"}

    def param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    def json_of(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}

    def array_of(component: str) -> dict[str, Any]:
        return {"type": "array", "items": {"$ref": SCHEMA_REF.format(model=component)}}

    limit = param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Most rows to return.")
    error = json_of({"$ref": SCHEMA_REF.format(model="Error")}, "Invalid query")
    unauthorized = json_of({"$ref": SCHEMA_REF.format(model="Error")}, "Missing or wrong bearer token")
    unavailable = json_of({"$ref": SCHEMA_REF.format(model="Error")}, "The catalog cannot answer")

    after = param("after", text, "Start after this page cursor: the X-Next-Cursor of the previous page, "
                  "which is also `<time>/<id>` of its last item (checkpoint_time of archives, started_at of runs).")
    next_page = {
        "X-Next-Cursor": {"description": "Present when more items follow: pass it as `after` for the next page.",
                          "schema": text},
        "Link": {"description": 'Present when more items follow: `<URL of the next page>; rel="next"` (RFC 8288).',
                 "schema": text},
    }

    def listing(component: str, description: str, params: list[dict[str, Any]]) -> dict[str, Any]:
        return {"get": {"summary": description, "parameters": params, "security": [{"bearer": []}, {}],
                        "description": "One page (`limit` items at most) of a keyset-paginated listing: the "
                                       "X-Next-Cursor and Link headers lead to the next page; their absence means "
                                       "this is the last one. Pages stay consistent while items are added.",
                        "responses": {"200": json_of(array_of(component), description, headers=next_page),
                                      "400": error, "401": unauthorized, "503": unavailable}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "backupd", "version": __version__,
                 "description": "Read-only API of the backupd daemon: policies, archives, runs, report."},
        "paths": {
            "/api/v1/policies": {"get": {
                "summary": "Checkpoint policies", "security": [{"bearer": []}, {}],
                "responses": {"200": json_of(array_of("Policy"), "Policies as applied (CheckpointPolicy documents)"),
                              "401": unauthorized, "503": unavailable}}},
            "/api/v1/archives": listing("Archive", "Archives in the catalog, oldest first", [
                param("policy", text, "Only this policy."), param("namespace", text, "Only this namespace."),
                param("pod", text, "Only this pod name or replica (as `backupd list --pod`)."),
                param("replica", text, "Only this replica: a StatefulSet pod, a DaemonSet pod's node."),
                param("workload", text, "e.g. deployment/web"),
                param("container", text, "Only this container."),
                param("state", {"type": "string", "enum": list(ARCHIVE_STATES)}, "Archive state (default committed)."),
                limit, after]),
            "/api/v1/runs": listing("Run", "Runs, newest first", [
                param("policy", text, "Only this policy."),
                param("kind", {"type": "string", "enum": list(RUN_KINDS)}, "Run kind."),
                param("outcome", {"type": "string", "enum": list(RUN_OUTCOMES)}, "Outcome."),
                limit, after]),
            "/api/v1/report": {"get": {
                "summary": "The retention report (as `backupd report --output json`)", "security": [{"bearer": []}, {}],
                "description": "The daemon's last report, refreshed every minute (`generated_at` says when it was "
                               "computed). Without `timeline=1` its workloads' `timeline` and `prune.remove` are "
                               "empty: the archive points are most of a big report's bytes.",
                "parameters": [param("timeline", {"type": "string", "enum": ["0", "1"]},
                                     "1: list each workload's newest archives with the next prune's decision.")],
                "responses": {"200": json_of({"$ref": SCHEMA_REF.format(model="Report")}, "Report"),
                              "401": unauthorized, "503": unavailable}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": component_schemas(),
        },
    }


class Api:
    """Routes and their data; the server below only does HTTP."""

    def __init__(
        self,
        catalog: Catalog,
        metrics: Metrics,
        *,
        token: str | None = None,
        kubelet_probe: Callable[[], None] | None = None,
        report: Callable[[bool], bytes] | None = None,
    ) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self.token = token
        self.kubelet_probe = kubelet_probe
        self.report = report
        self._ready: tuple[float, list[str]] | None = None
        self._ready_lock = threading.Lock()

    def readiness(self) -> list[str]:
        """Problems that make the daemon unready; empty when ready. Cached briefly."""
        with self._ready_lock:
            if self._ready and time.monotonic() - self._ready[0] < READY_CACHE_SECONDS:
                return self._ready[1]
        problems = []
        try:
            self.catalog.check_schema()
        except BackupdError as exc:
            problems.append(f"catalog: {exc}")
        if self.kubelet_probe is not None:
            try:
                self.kubelet_probe()
            except BackupdError as exc:
                problems.append(f"kubelet: {exc}")
        with self._ready_lock:
            self._ready = (time.monotonic(), problems)
        return problems

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode()
        return header is not None and hmac.compare_digest(header.encode(), expected)

    def handle(self, path: str, query: dict[str, list[str]], auth: str | None) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET: :meth:`answer` without its headers."""
        status, content_type, body, _headers = self.answer(path, query, auth)
        return status, content_type, body

    def answer(self, path: str, query: dict[str, list[str]], auth: str | None) -> Answer:
        """The answer to a GET, with its extra headers (a listing's next page)."""
        if path == "/healthz":
            return Answer(200, "text/plain; charset=utf-8", b"ok\n")
        if path == "/readyz":
            problems = self.readiness()
            body = "ok\n" if not problems else "".join(f"{p}\n" for p in problems)
            return Answer(200 if not problems else 503, "text/plain; charset=utf-8", body.encode())
        if path == "/metrics":
            return Answer(200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.exposition())
        if path == "/openapi.json":
            return _json(200, openapi_document())
        if not path.startswith("/api/v1/"):
            return _json(404, {"error": f"no such path {path!r}"})
        if not self.authorized(auth):
            return _json(401, {"error": "missing or wrong bearer token"})
        try:
            if path == "/api/v1/policies":
                return _json(200, [stored_document(p.name, p.spec_json) for p in self.catalog.list_policies()])
            if path == "/api/v1/archives":
                state = single_param(query, "state", ARCHIVE_STATES) or COMMITTED
                archives, following = self.catalog.archive_page(
                    policy=single_param(query, "policy"), namespace=single_param(query, "namespace"),
                    pod_or_replica=single_param(query, "pod"), replica=single_param(query, "replica"),
                    workload=single_param(query, "workload"), container=single_param(query, "container"),
                    states=(state,),
                    limit=limit_param(query), after=cursor_param(query),
                )
                return _page(path, query, [a.to_json() for a in archives], following)
            if path == "/api/v1/runs":
                limit = limit_param(query)
                runs = self.catalog.list_runs(
                    policy=single_param(query, "policy"), kind=single_param(query, "kind", RUN_KINDS),
                    outcome=single_param(query, "outcome", RUN_OUTCOMES), limit=limit + 1,
                    after=cursor_param(query, numeric_id=True),
                )
                following = Cursor.of_run(runs[limit - 1]) if len(runs) > limit else None
                return _page(path, query, [r.to_json() for r in runs[:limit]], following)
            if path == "/api/v1/report":
                if self.report is None:
                    return _json(503, {"error": "the report is not available in this build"})
                timelines = single_param(query, "timeline", ("0", "1")) == "1"
                return Answer(200, "application/json", self.report(timelines))
        except (BadRequest, InvalidInput) as exc:
            return _json(400, {"error": str(exc)})
        except BackupdError as exc:
            return _json(503, {"error": str(exc)})
        return _json(404, {"error": f"no such path {path!r}"})


class Answer(NamedTuple):
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = {}


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, "application/json", json.dumps(value, default=str).encode(), headers or {})


def _page(path: str, query: dict[str, list[str]], items: list[Any], following: Cursor | None) -> Answer:
    """A page of a listing: the items as a JSON array; when more follow, the next page's cursor
    in ``X-Next-Cursor`` and its URL in ``Link: <...>; rel="next"`` (RFC 8288)."""
    if following is None:
        return _json(200, items)
    next_query = urlencode({**{k: v for k, v in query.items() if k != "after"}, "after": [str(following)]}, doseq=True)
    return _json(200, items, {"X-Next-Cursor": str(following), "Link": f'<{path}?{next_query}>; rel="next"'})


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
        self._answer(_json(code, {"error": message or HTTPStatus(code).phrase}))

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        try:
            answer = self.server.api.answer(url.path, parse_qs(url.query), self.headers.get("Authorization"))
        except Exception:
            log.exception("api_error", path=url.path)
            answer = _json(500, {"error": "internal error"})
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body nobody reads must not be taken for the next request
        if answer.status == 401:
            answer = answer._replace(headers={**answer.headers, "WWW-Authenticate": 'Bearer realm="backupd"'})
        self._answer(answer)

    def _not_allowed(self) -> None:
        self.close_connection = True  # its body, if any, is never read
        self._answer(_json(405, {"error": "read-only API: only GET"}, {"Allow": "GET"}))

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
