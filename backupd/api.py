"""The daemon's HTTP server: health, readiness, Prometheus metrics and a read-only JSON API.

=================  ========================================================================
``/healthz``       200 while the process serves requests (liveness)
``/readyz``        200 when the catalog answers with the current schema and the kubelet
                   answers; 503 with the failing check otherwise (results cached a few seconds
                   so probes do not hammer the kubelet)
``/metrics``       Prometheus text exposition
``/openapi.json``  the OpenAPI 3.0 document of the JSON API
``/api/v1/...``    ``policies``, ``archives``, ``runs``, ``report`` (read-only JSON)
=================  ========================================================================

With ``daemon.api_token_file`` set, ``/api/v1/*`` requires ``Authorization: Bearer <token>``;
health, readiness, metrics and the OpenAPI document stay open (probes and scrapers carry no
secrets). Query parameters are validated: bad values get a 400 with a JSON error, never a 500.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from backupd import __version__
from backupd.catalog import ARCHIVE_STATES, COMMITTED, Catalog
from backupd.errors import BackupdError, ConfigError
from backupd.metrics import Metrics
from backupd.policy import Policy

log = structlog.get_logger("backupd.api")

READY_CACHE_SECONDS = 5.0


class BadRequest(Exception):
    pass


def _limit(query: dict[str, list[str]], default: int = 100) -> int:
    raw = query.get("limit", [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be an integer, got {raw!r}") from None
    if not 1 <= value <= 1000:
        raise BadRequest(f"limit must be between 1 and 1000, got {value}")
    return value


def _one(query: dict[str, list[str]], name: str, choices: tuple[str, ...] | None = None) -> str | None:
    values = query.get(name)
    if not values:
        return None
    value = values[-1]
    if choices is not None and value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": "string", "nullable": True}
RUN_KINDS = ("checkpoint", "prune", "verify", "delete")


def openapi_document() -> dict[str, Any]:
    def param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    limit = param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Most rows to return.")
    error = {"description": "Invalid query", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    unauthorized = {"description": "Missing or wrong bearer token",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    def listing(ref: str, description: str, params: list[dict[str, Any]]) -> dict[str, Any]:
        return {"get": {"summary": description, "parameters": params, "security": [{"bearer": []}, {}],
                        "responses": {"200": {"description": description, "content": {"application/json": {
                            "schema": {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}}}},
                                      "400": error, "401": unauthorized}}}

    archive_props = {name: _STRING for name in ("id", "state", "policy", "backend", "key", "node", "namespace", "pod",
                                                "workload", "replica", "container", "image", "compression",
                                                "encryption")}
    archive_props.update({name: {"type": "string", "format": "date-time", "nullable": True}
                          for name in ("checkpoint_time", "created_at", "committed_at")})
    archive_props.update({name: {"type": "integer", "nullable": True} for name in ("tar_size", "stored_size")})
    archive_props.update({"tar_sha256": _NULLABLE_STRING, "stored_sha256": _NULLABLE_STRING, "pinned": {"type": "boolean"},
                          "node_path": _NULLABLE_STRING, "node_tar_deleted": {"type": "boolean"},
                          "error": _NULLABLE_STRING})
    run_props: dict[str, Any] = {"id": {"type": "integer"}, "kind": _STRING, "outcome": _STRING, "node": _STRING}
    run_props.update({name: _NULLABLE_STRING for name in ("policy", "namespace", "pod", "workload", "container",
                                                          "archive_id", "error_kind", "error")})
    run_props.update({"started_at": {"type": "string", "format": "date-time"},
                      "finished_at": {"type": "string", "format": "date-time", "nullable": True},
                      "bytes_in": {"type": "integer"}, "bytes_out": {"type": "integer"},
                      "duration_seconds": {"type": "number", "nullable": True}})
    return {
        "openapi": "3.0.3",
        "info": {"title": "backupd", "version": __version__,
                 "description": "Read-only API of the backupd daemon: policies, archives, runs, report."},
        "paths": {
            "/api/v1/policies": {"get": {
                "summary": "Checkpoint policies", "security": [{"bearer": []}, {}],
                "responses": {"200": {"description": "Policies as applied (CheckpointPolicy documents)", "content": {
                    "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Policy"}}}}},
                              "401": unauthorized}}},
            "/api/v1/archives": listing("Archive", "Archives in the catalog, oldest first", [
                param("policy", _STRING, "Only this policy."), param("namespace", _STRING, "Only this namespace."),
                param("pod", _STRING, "Only this pod name or replica (as `backupd list --pod`)."),
                param("replica", _STRING, "Only this replica: a StatefulSet pod, a DaemonSet pod's node."),
                param("workload", _STRING, "e.g. deployment/web"),
                param("container", _STRING, "Only this container."),
                param("state", {"type": "string", "enum": list(ARCHIVE_STATES)}, "Archive state (default committed)."),
                limit]),
            "/api/v1/runs": listing("Run", "Runs, newest first", [
                param("policy", _STRING, "Only this policy."),
                param("kind", {"type": "string", "enum": list(RUN_KINDS)}, "Run kind."),
                param("outcome", {"type": "string", "enum": ["running", "succeeded", "failed", "skipped"]}, "Outcome."),
                limit]),
            "/api/v1/report": {"get": {
                "summary": "The retention report (as `backupd report --output json`)", "security": [{"bearer": []}, {}],
                "responses": {"200": {"description": "Report", "content": {"application/json": {"schema": {
                    "type": "object"}}}}, "401": unauthorized, "503": error}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": _STRING}, "required": ["error"]},
                "Policy": {"type": "object", "properties": {
                    "apiVersion": _STRING, "kind": _STRING, "metadata": {"type": "object"}, "spec": {"type": "object"}}},
                "Archive": {"type": "object", "properties": archive_props},
                "Run": {"type": "object", "properties": run_props},
            },
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
        report: Callable[[], dict[str, Any]] | None = None,
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
        """(status, content type, body) for a GET."""
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            problems = self.readiness()
            body = "ok\n" if not problems else "".join(f"{p}\n" for p in problems)
            return (200 if not problems else 503), "text/plain; charset=utf-8", body.encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.exposition()
        if path == "/openapi.json":
            return _json(200, openapi_document())
        if not path.startswith("/api/v1/"):
            return _json(404, {"error": f"no such path {path!r}"})
        if not self.authorized(auth):
            return _json(401, {"error": "missing or wrong bearer token"})
        try:
            if path == "/api/v1/policies":
                return _json(200, [Policy.from_spec_json(p.name, p.spec_json).to_document()
                                   for p in self.catalog.list_policies()])
            if path == "/api/v1/archives":
                state = _one(query, "state", ARCHIVE_STATES) or COMMITTED
                archives = self.catalog.list_archives(
                    policy=_one(query, "policy"), namespace=_one(query, "namespace"),
                    pod_or_replica=_one(query, "pod"), replica=_one(query, "replica"),
                    workload=_one(query, "workload"), container=_one(query, "container"), states=(state,),
                )
                return _json(200, [a.to_json() for a in archives[: _limit(query)]])
            if path == "/api/v1/runs":
                runs = self.catalog.list_runs(
                    policy=_one(query, "policy"), kind=_one(query, "kind", RUN_KINDS),
                    outcome=_one(query, "outcome", ("running", "succeeded", "failed", "skipped")), limit=_limit(query),
                )
                return _json(200, [r.to_json() for r in runs])
            if path == "/api/v1/report":
                if self.report is None:
                    return _json(503, {"error": "the report is not available in this build"})
                return _json(200, self.report())
        except BadRequest as exc:
            return _json(400, {"error": str(exc)})
        except BackupdError as exc:
            return _json(503, {"error": str(exc)})
        return _json(404, {"error": f"no such path {path!r}"})


def _json(status: int, value: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value, default=str).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # access logs would drown the run_finished lines; errors are logged below

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        try:
            status, ctype, body = self.server.api.handle(url.path, parse_qs(url.query), self.headers.get("Authorization"))
        except Exception:
            log.exception("api_error", path=url.path)
            status, ctype, body = _json(500, {"error": "internal error"})
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="backupd"')
        self.end_headers()
        self.wfile.write(body)

    def _not_allowed(self) -> None:
        body = json.dumps({"error": "read-only API: only GET"}).encode()
        self.send_response(405)
        self.send_header("Allow", "GET")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: Api) -> None:
        self.api = api
        super().__init__(address, _Handler)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"daemon.http_listen: expected host:port, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class HttpServer:
    """The API on a background thread; ``start()`` returns the bound (host, port)."""

    def __init__(self, api: Api, listen: str) -> None:
        self.api = api
        self.address = parse_listen(listen)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        try:
            self._server = _Server(self.address, self.api)
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
            self._server.server_close()
