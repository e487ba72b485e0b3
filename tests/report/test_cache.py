"""The daemon's last report (backupd.report.cache) and ``/api/v1/report`` answering from it."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import httpx

from backupd.model import rfc3339
from backupd.policy.document import parse_policies
from backupd.report.build import build_report
from backupd.report.cache import ReportCache
from backupd.report.model import RetentionReport
from tests.report.test_build import T0, archive, policy


class Reports:
    """Real reports of a growing catalog: each computation sees one more archive and an hour later."""

    def __init__(self) -> None:
        self.computed = 0

    def __call__(self) -> RetentionReport:
        self.computed += 1
        archives = [archive(i, T0 + timedelta(hours=i)) for i in range(self.computed + 1)]
        return build_report([policy()], archives, [], T0 + timedelta(hours=self.computed))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_last_report_is_served_until_a_refresh_replaces_it() -> None:
    compute, clock = Reports(), Clock()
    cache = ReportCache(compute, max_age=timedelta(minutes=5), clock=clock)
    assert not cache.read_within(timedelta(minutes=10))
    first = cache.report()  # none yet: computed for this read
    assert compute.computed == 1 and not cache.read_within(timedelta(minutes=10))  # what the API reads is the JSON
    cache.json()
    assert cache.read_within(timedelta(minutes=10))
    clock.now += 60
    assert cache.report() is first and compute.computed == 1
    refreshed = cache.refresh()
    assert compute.computed == 2 and cache.report() is refreshed
    assert refreshed.generated_at == first.generated_at + timedelta(hours=1)
    clock.now += 11 * 60
    assert not cache.read_within(timedelta(minutes=10))  # nobody read it: the tick may skip it


def test_a_report_older_than_max_age_is_computed_again_for_the_reader() -> None:
    compute, clock = Reports(), Clock()
    cache = ReportCache(compute, max_age=timedelta(minutes=5), clock=clock)
    cache.report()
    clock.now += 5 * 60
    cache.report()
    assert compute.computed == 1
    clock.now += 1
    assert cache.report().generated_at == T0 + timedelta(hours=2) and compute.computed == 2


def test_a_refresh_serialises_the_forms_read_lately() -> None:
    compute, clock = Reports(), Clock()
    cache = ReportCache(compute, clock=clock)
    cache.json(timelines=True)
    clock.now += 11 * 60
    cache.json()  # the report is older than max_age: computed again
    report = cache.refresh(serialise_read_within=timedelta(minutes=10))
    assert cache.serialised() and not cache.serialised(timelines=True)  # not read in the last 10 minutes
    assert json.loads(cache.json())["generated_at"] == "2026-03-02T03:00:00Z" == rfc3339(report.generated_at)
    assert compute.computed == 3


def test_the_json_is_the_reports_with_or_without_timelines_and_serialised_once() -> None:
    compute = Reports()
    cache = ReportCache(compute)
    report = cache.refresh()
    short = cache.json()
    assert short is cache.json()  # serialised once per report
    assert json.loads(short) == report.to_json(timelines=False)
    full = json.loads(cache.json(timelines=True))
    assert full == report.to_json()
    [workload] = full["policies"][0]["workloads"]
    assert len(workload["timeline"]) == 2 and workload["timeline_complete"]
    [without] = json.loads(short)["policies"][0]["workloads"]
    assert without["timeline"] == [] and without["prune"]["remove"] == [] and not without["timeline_complete"]
    # everything else is the same report: counts, statuses, prune totals
    for key in ("archives", "stored_bytes", "status", "reason", "newest"):
        assert without[key] == workload[key]
    assert without["prune"]["remove_archives"] == workload["prune"]["remove_archives"]
    cache.refresh()
    assert json.loads(cache.json())["generated_at"] == "2026-03-02T02:00:00Z"


def test_concurrent_first_readers_share_one_computation() -> None:
    started, release = threading.Event(), threading.Event()
    compute = Reports()

    def slow() -> RetentionReport:
        started.set()
        release.wait(10)
        return compute()

    cache = ReportCache(slow)
    results: list[RetentionReport] = []
    readers = [threading.Thread(target=lambda: results.append(cache.report())) for _ in range(4)]
    for reader in readers:
        reader.start()
    assert started.wait(10)
    release.set()
    for reader in readers:
        reader.join(10)
    assert compute.computed == 1 and len(results) == 4 and all(r is results[0] for r in results)


POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: web}\n"
          "spec: {selector: {namespaces: [default], matchLabels: {app: web}}, schedule: '@hourly', backend: local, "
          "retention: {keepLast: 5}}\n")


def test_the_api_answers_from_the_daemons_last_report(app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    (p,) = parse_policies(POLICY, "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    app.runner.cycle(p)
    server = app.http_server("127.0.0.1:0")
    host, port = server.start()
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
            first = client.get("/api/v1/report").json()
            [workload] = first["policies"][0]["workloads"]
            assert workload["archives"] == 2 and workload["timeline"] == []
            full = client.get("/api/v1/report", params={"timeline": "1"}).json()
            assert full["generated_at"] == first["generated_at"]
            assert [a["keep"] for a in full["policies"][0]["workloads"][0]["timeline"]] == [True, True]
            bad = client.get("/api/v1/report", params={"timeline": "yes"})
            assert bad.status_code == 400 and "timeline" in bad.json()["error"]

            app.runner.cycle(p)  # a new archive: the API still serves the last report ...
            assert client.get("/api/v1/report").json()["policies"][0]["workloads"][0]["archives"] == 2
            app.refresh_report()  # ... until the daemon's tick refreshes it (it was read: someone wants it)
            second = client.get("/api/v1/report").json()
            assert second["policies"][0]["workloads"][0]["archives"] == 4
            assert second["generated_at"] > first["generated_at"]
            # the CLI's report is computed fresh, and is the same report
            assert app.report().to_json(timelines=False)["summary"] == second["summary"]
    finally:
        server.stop()
