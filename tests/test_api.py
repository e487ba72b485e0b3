"""The daemon's HTTP server: health, readiness, metrics, the JSON API and its OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from backupd.daemon.api import openapi_document
from backupd.model import Archive, Run
from backupd.policy.document import parse_policies

DOCUMENT = openapi_document()


def _closed(schema: Any) -> Any:
    """``schema`` with every object closed: a field the document does not describe is an error."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if "properties" in schema:
        closed.setdefault("additionalProperties", False)
    return closed


CLOSED_COMPONENTS = _closed(DOCUMENT["components"])


def documented(path: str, response: httpx.Response) -> Any:
    """The response's JSON, checked against what the OpenAPI document says ``path`` answers with
    this status: its schema (JSON Schema 2020-12, formats checked), every object closed (no
    field the document does not describe), every field required (to_json writes them all)."""
    answers = DOCUMENT["paths"][path]["get"]["responses"]
    assert str(response.status_code) in answers, f"{path} answered an undocumented {response.status_code}"
    schema = answers[str(response.status_code)]["content"]["application/json"]["schema"]
    body = response.json()
    validator = Draft202012Validator({**_closed(schema), "components": CLOSED_COMPONENTS},
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not problems, problems
    return body


POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: web}\n"
          "spec: {selector: {namespaces: [default], matchLabels: {app: web}}, schedule: '@hourly', backend: local, "
          "retention: {keepLast: 5}}\n")


@pytest.fixture
def served(app_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An App with two committed archives, its HTTP server on an ephemeral port."""
    app = app_factory()
    (p,) = parse_policies(POLICY, "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    app.runner.cycle(p)
    server = app.http_server("127.0.0.1:0")
    host, port = server.start()
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as client:
        yield app, client
    server.stop()


def test_health_readiness_and_metrics(served, sim) -> None:  # type: ignore[no-untyped-def]
    app, client = served
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    metrics = client.get("/metrics").text
    assert 'backupd_runs_total{kind="checkpoint",outcome="succeeded"} 2.0' in metrics
    assert 'backupd_archives_retained{policy="web"} 2.0' in metrics
    assert "backupd_checkpoint_duration_seconds_bucket" in metrics
    assert 'backupd_upload_duration_seconds_count{backend="local"} 2.0' in metrics
    assert ('backupd_last_success_timestamp_seconds{container="nginx",namespace="default",workload="deployment/web"}'
            in metrics)
    assert "backupd_bytes_shipped_total" in metrics and "backupd_catalog_up 1.0" in metrics


def test_readiness_names_the_failing_dependency(served, sim) -> None:  # type: ignore[no-untyped-def]
    app, client = served
    from backupd.daemon import api

    api.READY_CACHE_SECONDS = 0.0
    try:
        sim.add_fault("respond", method="GET", path="/pods", status=401, body="Unauthorized", times=None)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "kubelet:" in ready.text and "401" in ready.text
        sim.clear_faults()
        assert client.get("/readyz").status_code == 200
    finally:
        api.READY_CACHE_SECONDS = 5.0


def test_json_api_lists_what_the_catalog_holds(served) -> None:  # type: ignore[no-untyped-def]
    app, client = served
    archives = documented("/api/v1/archives", client.get("/api/v1/archives"))
    assert [a["id"] for a in archives] == [a.id for a in app.catalog.list_archives()]
    assert len(archives) == 2 and all(a["tar_sha256"] and a["committed_at"] for a in archives)
    assert client.get("/api/v1/archives", params={"workload": "deployment/web", "limit": 1}).json()[0]["workload"] \
        == "deployment/web"
    assert client.get("/api/v1/archives", params={"namespace": "nowhere"}).json() == []
    runs = documented("/api/v1/runs", client.get("/api/v1/runs", params={"kind": "checkpoint"}))
    assert len(runs) == 2 and {r["outcome"] for r in runs} == {"succeeded"}
    policies = documented("/api/v1/policies", client.get("/api/v1/policies"))
    assert policies[0]["metadata"]["name"] == "web" and "error" not in policies[0]
    # stored by an older backupd that accepted it: listed with why it is not scheduled
    app.catalog.apply_policies([("feb30", '{"schedule": "0 0 30 2 *", "backend": "local", "retention": {}}')])
    feb30 = {p["metadata"]["name"]: p for p in documented("/api/v1/policies", client.get("/api/v1/policies"))}["feb30"]
    assert feb30["spec"]["schedule"] == "0 0 30 2 *" and "spec.schedule: cron expression" in feb30["error"]
    app.catalog.delete_policy("feb30")
    report = documented("/api/v1/report", client.get("/api/v1/report", params={"timeline": "1"}))
    (workload,) = report["policies"][0]["workloads"]
    assert report["summary"]["archives"] == 2 and len(workload["timeline"]) == 2 and workload["last_success"]
    assert documented("/api/v1/report", client.get("/api/v1/report"))["policies"][0]["workloads"][0]["timeline"] == []
    bad = client.get("/api/v1/runs", params={"limit": "lots"})
    assert bad.status_code == 400 and "limit" in documented("/api/v1/runs", bad)["error"]
    weird = client.get("/api/v1/archives", params={"state": "weird"})
    assert weird.status_code == 400 and "state" in documented("/api/v1/archives", weird)["error"]
    assert client.post("/api/v1/archives").status_code == 405


def test_listings_are_pages_linked_by_a_cursor(served) -> None:  # type: ignore[no-untyped-def]
    app, client = served
    first = client.get("/api/v1/archives", params={"limit": 1, "workload": "deployment/web"})
    assert first.status_code == 200 and len(first.json()) == 1
    cursor = first.headers["X-Next-Cursor"]
    assert cursor == f"{first.json()[0]['checkpoint_time']}/{first.json()[0]['id']}"
    link = first.headers["Link"]
    assert link.startswith("</api/v1/archives?") and link.endswith('>; rel="next"')
    assert "workload=deployment%2Fweb" in link
    second = client.get(link[1:link.index(">")])
    assert second.status_code == 200 and "X-Next-Cursor" not in second.headers and "Link" not in second.headers
    assert [a["id"] for a in first.json() + second.json()] == [a.id for a in app.catalog.list_archives()]

    runs = client.get("/api/v1/runs", params={"limit": 1})
    older = client.get("/api/v1/runs", params={"limit": 1, "after": runs.headers["X-Next-Cursor"]})
    assert [r["id"] for r in runs.json() + older.json()] == [r.id for r in app.catalog.list_runs()]
    assert "X-Next-Cursor" not in older.headers

    for path, cursor in (("/api/v1/archives", "yesterday"), ("/api/v1/runs", "2026-03-01T12:00:00Z/abc")):
        bad = client.get(path, params={"after": cursor})
        assert bad.status_code == 400 and bad.json()["error"].startswith("after: "), bad.text


def test_bearer_token_guards_the_api_only(app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    (tmp_path / "token").write_text("s3cr3t-api-token\n")
    app.config.daemon.api_token_file = tmp_path / "token"
    server = app.http_server("127.0.0.1:0")
    host, port = server.start()
    try:
        with httpx.Client(base_url=f"http://{host}:{port}") as c:
            assert "bearer token" in documented("/api/v1/archives", c.get("/api/v1/archives"))["error"]
            assert c.get("/api/v1/archives", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/api/v1/archives", headers={"Authorization": "Bearer s3cr3t-api-token"}).status_code == 200
            for open_path in ("/healthz", "/metrics", "/openapi.json"):
                assert c.get(open_path).status_code == 200
                assert "s3cr3t-api-token" not in c.get(open_path).text
    finally:
        server.stop()


def test_openapi_document_validates() -> None:
    from openapi_spec_validator import validate

    doc = openapi_document()
    validate(doc)
    assert set(doc["paths"]) == {"/api/v1/policies", "/api/v1/archives", "/api/v1/runs", "/api/v1/report"}
    schemas = doc["components"]["schemas"]
    # generated from the models the API writes: every field of an Archive and a Run, and no other
    assert set(schemas["Archive"]["properties"]) == set(Archive.__dataclass_fields__)
    assert set(schemas["Run"]["properties"]) == set(Run.__dataclass_fields__)
    assert schemas["Archive"]["properties"]["checkpoint_time"] == {"type": "string", "format": "date-time",
                                                                   "title": "Checkpoint Time"}
    assert {"$ref": "#/components/schemas/PolicyDocument"} in schemas["Policy"]["anyOf"]
    assert schemas["Error"]["required"] == ["error"]
    # every object of every schema lists all its fields as required: the API writes them all
    # (but a workload's dedup fields: written only when a backend has format = "dedup")
    for name in ("Archive", "Run", "Report", "WorkloadJson", "PolicyJson", "RunJson", "ArchivePointJson"):
        optional = {"logical_bytes", "dedup_ratio"} if name == "WorkloadJson" else set()
        assert set(schemas[name]["required"]) == set(schemas[name]["properties"]) - optional, name


_paths = st.sampled_from(["/api/v1/policies", "/api/v1/archives", "/api/v1/runs", "/api/v1/report", "/api/v1/nope",
                          "/readyz", "/healthz", "/metrics", "/openapi.json"])
_names = st.sampled_from(["limit", "state", "kind", "outcome", "policy", "namespace", "pod", "workload", "container",
                          "after", "x"])
_values = st.one_of(st.text(max_size=30), st.integers(-5, 5000).map(str),
                    st.sampled_from(["committed", "failed", "checkpoint", "prune", "succeeded", "deployment/web",
                                     "2026-03-01T12:00:00Z/1", "9999-12-31T23:59:59.999999+14:00/ffff", "0001-01-01/0",
                                     "0001-01-01T00:00:00+01:00/7"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=_paths, query=st.lists(st.tuples(_names, _values), max_size=4))
def test_no_request_gets_a_server_error(served, path: str, query: list[tuple[str, str]]) -> None:  # type: ignore[no-untyped-def]
    _app, client = served
    response = client.get(path, params=query)
    assert response.status_code < 500 or (path == "/api/v1/report" and response.status_code == 503), response.text
    if path.startswith("/api/") and response.headers["content-type"] == "application/json":
        json.loads(response.text)
        if path in DOCUMENT["paths"]:
            documented(path, response)
