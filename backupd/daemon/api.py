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

The server that carries these answers, built for clients that misbehave, is
:mod:`backupd.daemon.http`.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode

from backupd import __version__
from backupd.catalog.store import Catalog, Cursor
from backupd.daemon.http import Answer, json_answer
from backupd.errors import BackupdError, InvalidInput
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
            return json_answer(200, openapi_document())
        if not path.startswith("/api/v1/"):
            return json_answer(404, {"error": f"no such path {path!r}"})
        if not self.authorized(auth):
            return json_answer(401, {"error": "missing or wrong bearer token"})
        try:
            if path == "/api/v1/policies":
                return json_answer(200, [stored_document(p.name, p.spec_json) for p in self.catalog.list_policies()])
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
                    return json_answer(503, {"error": "the report is not available in this build"})
                timelines = single_param(query, "timeline", ("0", "1")) == "1"
                return Answer(200, "application/json", self.report(timelines))
        except (BadRequest, InvalidInput) as exc:
            return json_answer(400, {"error": str(exc)})
        except BackupdError as exc:
            return json_answer(503, {"error": str(exc)})
        return json_answer(404, {"error": f"no such path {path!r}"})


def _page(path: str, query: dict[str, list[str]], items: list[Any], following: Cursor | None) -> Answer:
    """A page of a listing: the items as a JSON array; when more follow, the next page's cursor
    in ``X-Next-Cursor`` and its URL in ``Link: <...>; rel="next"`` (RFC 8288)."""
    if following is None:
        return json_answer(200, items)
    next_query = urlencode({**{k: v for k, v in query.items() if k != "after"}, "after": [str(following)]}, doseq=True)
    return json_answer(200, items, {"X-Next-Cursor": str(following), "Link": f'<{path}?{next_query}>; rel="next"'})
