"""The report from the catalog's aggregates (``load_report``) says what the report computed from
every archive and run (``build_report``) says, on SQLite and PostgreSQL; it reads a group's
newest archives only; and no stored policy, however broken, makes it fail."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert

from backupd.catalog.schema import ArchiveRow, PolicyRow, RunRow
from backupd.catalog.store import Catalog
from backupd.model import FAILED, RUN_FAILED, SUCCEEDED, replica_identity
from backupd.policy.document import parse_policies
from backupd.report.build import STORAGE_POINTS, TIMELINE_POINTS, build_report
from backupd.report.html import render_html
from backupd.report.load import load_report
from backupd.report.model import UNMANAGED
from backupd.report.render import render_table
from tests.report.test_build import archive, policy

T0 = datetime(2026, 3, 2, tzinfo=UTC)
NOW = T0 + timedelta(days=30)

RETENTIONS = ["{keepLast: 3}", "{keepLast: 2, keepDaily: 2}", "{keepDaily: 3}", "{keepLast: 120}",
              "{keepWithin: 2d}", "{keepLast: 1, keepWithinHourly: 12h, maxTotalBytes: 30000}", "{keepHourly: -1}",
              "{keepWeekly: 2, keepMonthly: 1}"]


def store(catalog: Catalog, policies: list, archives: list, runs: list) -> None:
    with catalog.session() as s:
        for table in (ArchiveRow, RunRow, PolicyRow):
            s.execute(delete(table))
        if archives:
            s.execute(insert(ArchiveRow), [{f: getattr(a, f) for f in a.__dataclass_fields__} for a in archives])
        if runs:
            s.execute(insert(RunRow), [{f: getattr(r, f) for f in r.__dataclass_fields__} for r in runs])
    catalog.apply_policies([(p.name, p.canonical_json()) for p in policies])


@st.composite
def catalogs(draw):  # type: ignore[no-untyped-def]
    """Policies (one may be gone: its archives are unmanaged), groups of up to a few hundred
    archives at random spacings (ties, pinned ones, failed rows), runs of several pods."""
    names = ["web", "db", "gone"]
    policies = [policy(n, retention=draw(st.sampled_from(RETENTIONS))) for n in names[:2]]
    archives, runs = [], []
    i = 0
    for name in names:
        for workload in draw(st.lists(st.sampled_from(["deployment/a", "statefulset/b", "daemonset/c"]),
                                      unique=True, max_size=2)):
            count = draw(st.sampled_from([1, 5, 40, 130, 260]))
            step = draw(st.sampled_from([timedelta(minutes=20), timedelta(hours=1), timedelta(hours=7)]))
            for k in range(count):
                at = T0 + step * (k // draw(st.sampled_from([1, 1, 1, 2])))  # ties now and then
                pod = draw(st.sampled_from(["p-0", "p-1"]))  # two replicas of a StatefulSet or DaemonSet
                archives.append(archive(i, at, policy_name=name, workload=workload, stored_size=1000 + i % 97,
                                        pinned=draw(st.integers(0, 40)) == 0, pod=pod, node=f"node-{pod}",
                                        replica=replica_identity(workload.partition("/")[0], pod, f"node-{pod}"),
                                        state=FAILED if draw(st.integers(0, 50)) == 0 else "committed"))
                i += 1
            for pod in draw(st.lists(st.sampled_from(["p-0", "p-1"]), unique=True, max_size=2)):
                for k in range(draw(st.integers(0, 3))):
                    outcome = draw(st.sampled_from([SUCCEEDED, RUN_FAILED]))
                    runs.append(_run(len(runs) + 1, T0 + timedelta(hours=3 * k), outcome, name, workload, pod))
        if draw(st.booleans()):  # a cycle that failed before any container: a run without a target
            runs.append(_run(len(runs) + 1, T0 + timedelta(hours=5), RUN_FAILED, name, None, None))
        runs.append(_run(len(runs) + 1, T0 + timedelta(hours=6), draw(st.sampled_from([SUCCEEDED, RUN_FAILED])),
                         name, None, None, kind="prune"))
    return policies, archives, runs


def _run(i: int, at: datetime, outcome: str, name: str, workload: str | None, pod: str | None,
         kind: str = "checkpoint"):  # type: ignore[no-untyped-def]
    from tests.report.test_build import run

    r = run(i, at, outcome, kind=kind, policy_name=name, workload=workload, container="nginx" if workload else None,
            error_kind="CheckpointFailed" if outcome == RUN_FAILED else None)
    return replace(r, pod=pod, node=f"node-{pod}", namespace="default" if workload else None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(catalogs())
def test_the_report_from_aggregates_is_the_report_from_every_row(catalog: Catalog, drawn) -> None:  # type: ignore[no-untyped-def]
    policies, archives, runs = drawn
    store(catalog, policies, archives, runs)
    from_catalog = load_report(catalog, now=NOW)
    from_rows = build_report(policies, catalog.list_archives(states=()), catalog.list_runs(limit=10_000), NOW)
    for mine, theirs in zip(from_catalog.policies, from_rows.policies, strict=True):
        committed = [a for a in archives if a.policy == mine.name and a.state == "committed"]
        if len(committed) > STORAGE_POINTS:  # bucketed on each side by its own arithmetic: compare what counts
            total, steps = 0, {}
            for a in sorted(committed, key=lambda a: a.checkpoint_time):
                total += a.stored_size
                steps[a.checkpoint_time] = total
            assert all(steps[p.time] == p.stored_bytes for p in mine.storage)  # exact at every step
            assert len(mine.storage) <= STORAGE_POINTS + 1 and mine.storage[-1].stored_bytes == total
            mine, theirs = replace(mine, storage=()), replace(theirs, storage=())
        assert mine == theirs
    assert from_catalog.summary() == from_rows.summary()


def test_a_long_history_is_read_from_its_newest_archives(catalog: Catalog) -> None:
    p = policy(retention="{keepLast: 3, keepDaily: 2}")
    archives = [archive(i, T0 + timedelta(minutes=30 * i), pinned=i in (7, 4000)) for i in range(5000)]
    store(catalog, [p], archives, [])
    report = load_report(catalog, now=NOW)
    (w,) = report.workloads()
    assert w.archives == 5000 and len(w.timeline) == TIMELINE_POINTS and not w.timeline_complete
    assert w.timeline[-1].time == archives[-1].checkpoint_time
    kept = 3 + 1 + 2  # keepLast 3, the newest of the day before, and the two pinned ones
    assert w.remove_archives == 5000 - kept
    pinned_bytes = archives[7].stored_size + archives[4000].stored_size
    assert w.remove_bytes == sum(a.stored_size for a in archives) - pinned_bytes - sum(
        pt.stored_size for pt in w.timeline if pt.keep)
    whole = build_report([p], archives, [], NOW)  # the storage curves are bucketed by each side's arithmetic
    assert [replace(x, storage=()) for x in report.policies] == [replace(x, storage=()) for x in whole.policies]


BROKEN = {
    "never-fires": '{"schedule": "0 0 30 2 *", "backend": "local", "retention": {"keepLast": 3}}',
    "no-such-backend": '{"schedule": "@hourly", "backend": "tape", "retention": {"keepLast": 3}}',
    "unknown-field": '{"schedule": "@hourly", "backend": "local", "retention": {"keepLast": 3}, "colour": "red"}',
    "keeps-nothing": '{"schedule": "@hourly", "backend": "local", "retention": {}}',
    "not-json": '{"schedule": ',
    "bad-zone": '{"schedule": "@hourly", "backend": "local", "retention": {"keepLast": 3}, "timezone": "Mars/Base"}',
}


def test_no_stored_policy_makes_the_report_fail(app_factory, db_url: str) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(db_url)
    good = parse_policies("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: good}\n"
                          "spec: {schedule: '@hourly', backend: local, retention: {keepLast: 3}}\n", "p.yaml")[0]
    app.catalog.apply_policies([(good.name, good.canonical_json()), *BROKEN.items()])
    for i, name in enumerate(["good", *BROKEN]):
        app.catalog.add_archive(replace(archive(i, T0 + timedelta(hours=i), policy_name=name), key=f"k/{name}"))
    report = load_report(app.catalog, now=NOW)
    by_name = {p.name: p for p in report.policies}
    assert set(by_name) == {"good", *BROKEN}
    assert by_name["good"].error is None and by_name["good"].managed
    problems = {name: by_name[name].error for name in BROKEN}
    assert "never fires" in problems["never-fires"] and "0 0 30 2 *" in problems["never-fires"]
    assert all(problems[n] for n in BROKEN if n != "no-such-backend"), problems
    # the report needs no backend: a policy naming one this daemon lacks is still reported in full
    assert problems["no-such-backend"] is None and by_name["no-such-backend"].managed
    for name in set(BROKEN) - {"no-such-backend"}:
        (w,) = by_name[name].workloads
        assert by_name[name].status == UNMANAGED and w.status == UNMANAGED and "cannot be applied" in w.reason
        assert w.archives == 1 and w.remove_archives == 0
    assert "Mars/Base" in render_html(report) and report.to_json()["summary"]["policies"] == 1 + len(BROKEN)

    server = app.http_server("127.0.0.1:0")
    host, port = server.start()
    try:
        answer = httpx.get(f"http://{host}:{port}/api/v1/report", timeout=30)
        listed = httpx.get(f"http://{host}:{port}/api/v1/policies", timeout=30)
    finally:
        server.stop()
    assert listed.status_code == 200, listed.text
    documents = {d["metadata"]["name"]: d for d in listed.json()}
    assert documents["good"]["spec"]["schedule"] == "@hourly" and "error" not in documents["good"]
    assert "keep rule" in documents["keeps-nothing"]["error"]
    assert answer.status_code == 200, answer.text
    assert {p["name"]: p["error"] for p in answer.json()["policies"]}["never-fires"] == problems["never-fires"]


def test_each_replica_is_a_workload_of_its_own(catalog: Catalog) -> None:
    """A StatefulSet's two pods: one fresh, one whose checkpoints fail -- two rows, two statuses."""
    p = policy(schedule="@hourly")
    now = T0 + timedelta(hours=6)

    def replica(i: int, pod: str, at: datetime):  # type: ignore[no-untyped-def]
        return archive(i, at, workload="statefulset/db", container="pg", pod=pod, replica=pod)

    archives = [replica(1, "db-0", now - timedelta(minutes=20)), replica(2, "db-1", now - timedelta(hours=5))]
    runs = [replace(_run(1, now - timedelta(minutes=20), SUCCEEDED, "web", "statefulset/db", "db-0"), container="pg"),
            replace(_run(2, now - timedelta(minutes=19), RUN_FAILED, "web", "statefulset/db", "db-1"), container="pg")]
    store(catalog, [p], archives, runs)
    report = load_report(catalog, now=now)
    assert report == build_report([p], archives, runs, now)
    got = {w.replica: (w.status, w.failing, w.archives) for w in report.workloads()}
    assert got == {"db-0": ("OK", False, 1), "db-1": ("MISSING", True, 1)}
    assert [w["replica"] for w in report.to_json()["policies"][0]["workloads"]] == ["db-0", "db-1"]
    table = render_table(report)
    assert "REPLICA" in table and re.search(r"MISSING!\s+default\s+statefulset/db\s+db-1\s+pg\s+1\s", table)
    assert "default/statefulset/db[db-1]/pg" in render_html(report)
