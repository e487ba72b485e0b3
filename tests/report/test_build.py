"""The pure report builder: statuses at their exact boundaries, workloads known only from runs,
prune removals equal to the prune plan, storage series, the JSON contract, and the renderers'
escaping."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from backupd.model import COMMITTED, DELETING, Archive, Run
from backupd.policy.document import Policy, parse_policies
from backupd.policy.schedule import Schedule
from backupd.report.build import assess, build_report
from backupd.report.html import render_html
from backupd.report.model import LATE, MISSING, OK, UNMANAGED
from backupd.report.render import render_table
from backupd.storage import layout
from backupd.storage.prune import plan_policy

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday
US = timedelta(microseconds=1)


def policy(name: str = "web", schedule: str = "@hourly", retention: str = "{keepLast: 3}") -> Policy:
    doc = (f"apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {{name: {name}}}\n"
           f"spec: {{schedule: '{schedule}', backend: local, retention: {retention}}}\n")
    return parse_policies(doc, "p.yaml")[0]


def archive(i: int, at: datetime, *, policy_name: str = "web", workload: str = "deployment/web",
            container: str = "nginx", **kw: object) -> Archive:
    aid = f"{i:016x}"
    base = Archive(id=aid, state=COMMITTED, policy=policy_name, backend="local",
                   key=layout.archive_key("default", workload.replace("/", "-"), container, at, aid), node="node-a",
                   namespace="default", pod="web-abc-1", workload=workload, container=container, image="nginx",
                   checkpoint_time=at, created_at=at, tar_size=4000, stored_size=1000 + i)
    return replace(base, **kw)  # type: ignore[arg-type]


def run(i: int, at: datetime, outcome: str = "succeeded", *, kind: str = "checkpoint", policy_name: str = "web",
        workload: str | None = "deployment/web", container: str | None = "nginx", error_kind: str | None = None,
        error: str | None = None) -> Run:
    target = workload is not None
    return Run(id=i, kind=kind, policy=policy_name, node="node-a", namespace="default" if target else None,
               pod="web-abc-1" if target else None, workload=workload, container=container, archive_id=None,
               started_at=at, finished_at=at + timedelta(seconds=2), outcome=outcome, error_kind=error_kind,
               error=error, bytes_in=0, bytes_out=0, duration_seconds=2.0)


# -- status boundaries ------------------------------------------------------------------------


def test_hourly_status_boundaries_are_exact() -> None:
    # newest archive at 10:00:05 (a run at 10:00 that took 5 s): due 11:00, grace 30 min, N=3
    newest = T0.replace(hour=10, second=5)
    schedule = Schedule.parse("@hourly")
    late_after = T0.replace(hour=11, minute=30)
    missing_after = T0.replace(hour=13, minute=30)
    assert assess(schedule, newest, late_after, 3) == (OK, T0.replace(hour=11), late_after, missing_after)
    assert assess(schedule, newest, late_after + US, 3)[0] == LATE
    assert assess(schedule, newest, missing_after, 3)[0] == LATE
    assert assess(schedule, newest, missing_after + US, 3)[0] == MISSING
    # N=1: the first missed run is already MISSING after the grace
    assert assess(schedule, newest, late_after + US, 1)[0] == MISSING
    assert assess(schedule, None, late_after, 3) == (MISSING, None, None, None)


def test_interval_schedule_boundaries() -> None:
    newest = T0
    schedule = Schedule.parse("@every 30s")
    assert assess(schedule, newest, T0 + timedelta(seconds=45), 3)[0] == OK
    assert assess(schedule, newest, T0 + timedelta(seconds=45) + US, 3)[0] == LATE
    assert assess(schedule, newest, T0 + timedelta(seconds=105), 3)[0] == LATE
    assert assess(schedule, newest, T0 + timedelta(seconds=105) + US, 3)[0] == MISSING


def test_weekday_cron_is_not_late_over_the_weekend() -> None:
    # Mon-Fri at 09:00: the archive of Friday is fresh until Monday 09:00 + half a day
    friday = datetime(2026, 3, 6, 9, 0, 3, tzinfo=UTC)
    schedule = Schedule.parse("0 9 * * mon-fri")  # names: APScheduler 3 numbers days from Monday
    sunday = datetime(2026, 3, 8, 20, 0, tzinfo=UTC)
    status, due, late_after, missing_after = assess(schedule, friday, sunday, 3)
    assert status == OK and due == datetime(2026, 3, 9, 9, 0, tzinfo=UTC)
    assert late_after == datetime(2026, 3, 9, 21, 0, tzinfo=UTC)
    assert missing_after == datetime(2026, 3, 11, 21, 0, tzinfo=UTC)  # Mon, Tue, Wed runs missed


def test_workload_statuses_in_a_report() -> None:
    p = policy()
    now = T0.replace(hour=12)
    archives = [
        archive(1, now - timedelta(minutes=20)),                                   # OK
        archive(2, now - timedelta(hours=2), workload="deployment/api"),           # LATE
        archive(3, now - timedelta(hours=5), workload="statefulset/db", container="pg"),  # MISSING
        archive(4, now - timedelta(hours=1), state=DELETING),                      # ignored: not committed
    ]
    runs = [
        run(10, now - timedelta(hours=1), "failed", workload="deployment/batch", container="worker",
            error_kind="CheckpointFailed", error="checkpointing of default/batch-1/worker failed (boom)"),
        run(11, now - timedelta(hours=2), "failed", workload="deployment/batch", container="worker",
            error_kind="CheckpointFailed", error="earlier"),
    ]
    report = build_report([p], archives, runs, now)
    got = {(w.workload, w.container): (w.status, w.failing, w.archives) for w in report.workloads()}
    assert got == {
        ("deployment/web", "nginx"): (OK, False, 1),
        ("deployment/api", "nginx"): (LATE, False, 1),
        ("statefulset/db", "pg"): (MISSING, False, 1),
        ("deployment/batch", "worker"): (MISSING, True, 0),
    }
    batch = next(w for w in report.workloads() if w.workload == "deployment/batch")
    assert batch.last_failure is not None and batch.last_failure.id == 10  # the latest of the two
    assert batch.reason == "no archive: every run failed (CheckpointFailed)"
    assert report.policies[0].status == MISSING
    assert report.summary()["missing"] == 2 and report.summary()["failing"] == 1


def test_failing_means_the_latest_run_failed() -> None:
    p = policy()
    now = T0.replace(hour=12)
    archives = [archive(1, now - timedelta(minutes=10))]
    recovered = build_report([p], archives, [
        run(1, now - timedelta(hours=1), "failed", error_kind="KubeletTimeout", error="x"),
        run(2, now - timedelta(minutes=10)),
    ], now)
    w = next(recovered.workloads())
    assert not w.failing and w.status == OK and w.last_failure is not None and w.last_success is not None
    broken = build_report([p], archives, [
        run(2, now - timedelta(minutes=10)),
        run(3, now - timedelta(minutes=1), "failed", error_kind="KubeletTimeout", error="x"),
    ], now)
    w = next(broken.workloads())
    assert w.failing and w.status == OK  # the recovery point is still fresh


def test_next_run_follows_the_schedule() -> None:
    p = policy(schedule="@hourly")
    now = T0.replace(hour=12, minute=10)
    report = build_report([p], [], [run(1, T0.replace(hour=12, second=1))], now)
    assert report.policies[0].next_run == T0.replace(hour=13)
    # the daemon was down for hours: the next run is the first fire after now
    report = build_report([p], [], [run(1, T0.replace(hour=3))], now)
    assert report.policies[0].next_run == T0.replace(hour=13)


# -- retention, storage, unmanaged ------------------------------------------------------------


def test_prune_removals_are_the_prune_plan() -> None:
    p = policy(retention="{keepLast: 2, keepDaily: 2}")
    archives = [archive(i, T0 + timedelta(hours=6 * i)) for i in range(12)]
    archives.append(archive(50, T0 + timedelta(hours=1), pinned=True))
    now = T0 + timedelta(hours=66, minutes=10)
    report = build_report([p], archives, [], now)
    w = next(report.workloads())
    planned = {a.id for plan in plan_policy(p, archives) for a in plan.remove}
    assert {a.id for a in w.prune_remove} == planned and planned
    decisions = {d.archive.id: d.reasons for plan in plan_policy(p, archives) for d in plan.decisions}
    assert {pt.id: pt.reasons for pt in w.timeline} == decisions
    assert [pt.time for pt in w.timeline] == sorted(pt.time for pt in w.timeline)  # oldest first
    pinned = next(pt for pt in w.timeline if pt.id == f"{50:016x}")
    assert pinned.keep and "pinned" in pinned.reasons
    assert report.summary()["prune_remove_bytes"] == sum(a.stored_size or 0 for a in archives if a.id in planned)


def test_storage_series_is_cumulative_over_kept_and_doomed_archives() -> None:
    p = policy()
    archives = [archive(i, T0 + timedelta(hours=i)) for i in range(4)]
    archives.append(archive(9, T0 + timedelta(hours=1), workload="deployment/api"))  # same moment as #1
    report = build_report([p], archives, [], T0 + timedelta(hours=4))
    series = [(s.time, s.stored_bytes) for s in report.policies[0].storage]
    assert series == [
        (T0, 1000),
        (T0 + timedelta(hours=1), 1000 + 1001 + 1009),
        (T0 + timedelta(hours=2), 4012),
        (T0 + timedelta(hours=3), 5015),
    ]
    assert series[-1][1] == report.policies[0].stored_bytes


def test_archives_of_a_deleted_policy_are_unmanaged() -> None:
    now = T0.replace(hour=5)
    report = build_report([policy()], [archive(1, T0, policy_name="old")], [], now)
    assert [(p.name, p.managed, p.status) for p in report.policies] == [("web", True, OK), ("old", False, UNMANAGED)]
    w = next(report.workloads())
    assert w.status == UNMANAGED and not w.prune_remove and w.timeline[0].reasons == ("no policy",)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="stale_intervals must be at least 1, got 0"):
        build_report([], [], [], T0, stale_intervals=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        build_report([], [], [], datetime(2026, 1, 1))


# -- the JSON contract and the renderers -----------------------------------------------------


def test_json_field_names_are_the_documented_contract() -> None:
    p = policy()
    now = T0.replace(hour=3)
    report = build_report([p], [archive(1, T0.replace(hour=2, minute=59)), archive(2, T0)],
                          [run(1, T0.replace(hour=2, minute=59)),
                           run(2, T0.replace(hour=1), "failed", error_kind="KubeletTimeout", error="timed out"),
                           run(3, T0.replace(hour=3), kind="prune", workload=None, container=None)], now)
    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc) == {"format", "generated_at", "stale_intervals", "summary", "policies"}
    assert doc["format"] == "backupd.report/v1" and doc["generated_at"] == "2026-03-02T03:00:00Z"
    assert set(doc["summary"]) == {"policies", "workloads", "ok", "late", "missing", "unmanaged", "failing",
                                   "archives", "stored_bytes", "prune_remove_archives", "prune_remove_bytes"}
    pol = doc["policies"][0]
    assert set(pol) == {"name", "managed", "schedule", "timezone", "backend", "period_seconds", "status", "archives",
                        "stored_bytes", "next_run", "last_success", "last_failure", "last_prune", "last_verify",
                        "prune", "storage", "workloads", "error"}
    assert pol["period_seconds"] == 3600 and pol["last_prune"]["kind"] == "prune" and pol["last_verify"] is None
    w = pol["workloads"][0]
    assert set(w) == {"policy", "namespace", "workload", "replica", "container", "status", "reason", "failing",
                      "archives", "stored_bytes", "oldest", "newest", "recovery_point_age_seconds", "due_at",
                      "late_after", "missing_after", "next_run", "last_success", "last_failure", "prune", "timeline",
                      "timeline_complete"}
    assert w["recovery_point_age_seconds"] == 60 and w["status"] == "OK" and w["newest"] == "2026-03-02T02:59:00Z"
    assert set(w["last_failure"]) == {"id", "kind", "outcome", "policy", "namespace", "pod", "workload", "container",
                                      "node", "started_at", "finished_at", "error_kind", "error"}
    assert set(w["timeline"][0]) == {"id", "time", "stored_size", "pinned", "keep", "reasons"}
    assert set(w["prune"]) == {"remove_archives", "remove_bytes", "remove"}


HOSTILE = 'x"><script>alert(1)</script><img src=//evil.example/a.png>'


def test_html_escapes_everything_from_the_cluster_and_loads_nothing() -> None:
    p = policy()
    now = T0.replace(hour=3)
    archives = [archive(1, T0, workload=f"deployment/{HOSTILE}", container="c&<b>")]
    runs = [run(2, T0.replace(hour=2), "failed", workload=f"deployment/{HOSTILE}", container="c&<b>",
                error_kind="CheckpointFailed", error=f"failed ({HOSTILE})")]
    page = render_html(build_report([p], archives, runs, now))
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "c&amp;&lt;b&gt;" in page
    assert not re.search(r"<[a-z][^<>]*\s(src|href)\s*=", page, re.IGNORECASE)  # no tag loads or links anything
    assert "default-src 'none'" in page  # and the page itself forbids loading any
    assert page.count('class="timeline"') == 1 and 'role="img"' in page and "<desc" in page
    assert ">Logical</th>" not in page  # the dedup columns only where a backend deduplicates


def test_table_names_statuses_failures_and_removals() -> None:
    p = policy(retention="{keepLast: 1}")
    now = T0.replace(hour=6)
    archives = [archive(1, T0.replace(hour=1)), archive(2, T0.replace(hour=2))]
    runs = [run(3, T0.replace(hour=5), "failed", error_kind="KubeletUnreachable", error="connection refused")]
    text = render_table(build_report([p], archives, runs, now))
    assert text.startswith("retention report at 2026-03-02 06:00:00Z: 1 workload(s): 0 OK, 0 LATE, 1 MISSING "
                           "(1 failing)")
    assert "next prune removes 1 (1001 B)" in text
    assert re.search(r"MISSING!\s+default\s+deployment/web\s+nginx\s+2\s+", text)
    assert "last run failed 2026-03-02 05:00:00Z KubeletUnreachable: connection refused" in text
