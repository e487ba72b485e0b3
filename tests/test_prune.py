"""Pruning: plans per workload, the delete protocol under injected crashes, leases, orphans,
node-local clean-up, pins, and `retention simulate` on restic's golden data."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.backends.memory import MemoryBackend
from backupd.backends.wrappers import Fault, FaultInjectingBackend
from backupd.catalog.store import Catalog
from backupd.cli import cli
from backupd.errors import LeaseHeld, StorageUnavailable
from backupd.model import COMMITTED, DELETING, FAILED, PENDING, Archive
from backupd.policy.document import parse_policies
from backupd.storage import layout
from backupd.storage.prune import Pruner, find_orphans, plan_policy, remove_orphans

T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
SHARED = Path(os.environ.get("BACKUPD_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")


def policy(retention: str = "{keepLast: 2}", name: str = "web"):  # type: ignore[no-untyped-def]
    doc = (f"apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {{name: {name}}}\n"
           f"spec: {{schedule: '@hourly', backend: mem, retention: {retention}}}\n")
    return parse_policies(doc, "p.yaml")[0]


def archive(i: int, *, pod: str = "web-aaa-1", workload: str = "deployment/web", container: str = "nginx",
            hours: float | None = None, **kw: object) -> Archive:
    t = T0 + timedelta(hours=i if hours is None else hours)
    aid = f"{i:016x}"
    key = layout.archive_key("default", workload.replace("/", "-"), container, t, aid)
    base = Archive(id=aid, state=COMMITTED, policy="web", backend="mem", key=key, node="node-a",
                   namespace="default", pod=pod, workload=workload, container=container, image="nginx",
                   checkpoint_time=t, created_at=t, tar_size=1000, stored_size=100, tar_sha256="a" * 64,
                   stored_sha256="b" * 64)
    return replace(base, **kw)  # type: ignore[arg-type]


def store(catalog: Catalog, backend: MemoryBackend, archives: list[Archive]) -> None:
    for a in archives:
        catalog.add_archive(a)
        backend.put_bytes(a.key, b"zstd bytes of " + a.id.encode())
        backend.put_bytes(layout.manifest_key(a.key), b"{}")


def consistent(catalog: Catalog, backend: MemoryBackend) -> None:
    """Nothing listed without its object; every object is an archive or accounted for."""
    listed = catalog.list_archives()
    keys = {o.key for o in backend.list()}
    for a in listed:
        assert a.key in keys and layout.manifest_key(a.key) in keys, f"{a.id} listed but missing"
    accounted = {a.key for a in catalog.list_archives(states=(COMMITTED, DELETING, PENDING))}
    for key in keys:
        if not key.endswith(".json"):
            assert key in accounted, f"object {key} not accounted for"


def test_plan_groups_by_workload_not_pod() -> None:
    # a rollout: pods change names, the workload stays; keepLast 2 applies across them
    archives = [archive(i, pod=f"web-rs{i // 2}-x") for i in range(5)]
    archives.append(archive(9, workload="statefulset/db", container="postgres", pod="db-0"))
    plans = plan_policy(policy(), archives)
    assert [(p.workload, p.container, len(p.decisions)) for p in plans] == [
        ("deployment/web", "nginx", 5), ("statefulset/db", "postgres", 1)]
    web = plans[0]
    assert [d.archive.id for d in web.decisions if d.keep] == [f"{4:016x}", f"{3:016x}"]
    assert all(d.reasons == ("last",) for d in web.decisions if d.keep)
    assert all(d.reasons == ("no rule",) for d in web.decisions if not d.keep)


def test_each_replica_is_its_own_group() -> None:
    # issue 13: db-1's archive 5 ms newer than db-0's must not cost db-0 its newest archive
    ms5 = 5 / 3_600_000
    db = [archive(2 * h + r, workload="statefulset/db", container="postgres", pod=f"db-{r}", replica=f"db-{r}",
                  hours=h + r * ms5) for h in range(3) for r in (0, 1)]
    plans = plan_policy(policy("{keepDaily: 7}"), db)
    assert [(p.workload, p.replica, p.container) for p in plans] == [
        ("statefulset/db", "db-0", "postgres"), ("statefulset/db", "db-1", "postgres")]
    newest = {p.replica: p.decisions[0] for p in plans}  # decisions are newest first
    assert {r: (d.archive.id, d.keep, d.reasons) for r, d in newest.items()} == {
        "db-0": (f"{4:016x}", True, ("daily",)), "db-1": (f"{5:016x}", True, ("daily",))}
    # a DaemonSet with keepLast 1 keeps one archive per node, across its pods' rollout names
    agent = [archive(i, workload="daemonset/agent", container="agent", pod=f"agent-{i}", replica=f"node-{i % 2}")
             for i in range(6)]
    plans = plan_policy(policy("{keepLast: 1}"), agent)
    assert {p.replica: [a.id for a in p.archives if a not in p.remove] for p in plans} == {
        "node-0": [f"{4:016x}"], "node-1": [f"{5:016x}"]}


def test_pinned_and_size_cap() -> None:
    archives = [archive(i, stored_size=100) for i in range(6)]
    archives[0] = replace(archives[0], pinned=True)
    plan = plan_policy(policy("{keepLast: 4, maxTotalBytes: 300}"), archives)[0]
    kept = {d.archive.id: d.reasons for d in plan.decisions if d.keep}
    assert kept[f"{0:016x}"] == ("pinned",)
    # the pinned one counts toward the cap but is never removed; the newest is never removed
    assert len(kept) == 3 and f"{5:016x}" in kept
    assert any(d.reasons == ("size cap",) for d in plan.decisions if not d.keep)


Rig = tuple[Catalog, MemoryBackend]


@pytest.fixture
def rig(catalog: Catalog) -> Rig:
    backend = MemoryBackend("mem")
    return catalog, backend


def test_prune_deletes_manifest_object_and_row(rig: Rig) -> None:
    catalog, backend = rig
    store(catalog, backend, [archive(i) for i in range(5)])
    pruner = Pruner(catalog, {"mem": backend})
    dry = pruner.prune(policy(), dry_run=True)
    assert len(dry.removals) == 3 and len(catalog.list_archives()) == 5  # dry run changes nothing
    result = pruner.prune(policy())
    assert [a.id for a in result.deleted] == [a.id for a in dry.removals]  # exactly the dry-run plan
    assert len(catalog.list_archives()) == 2
    assert len(list(backend.list())) == 4
    assert result.bytes_freed == 300
    (run,) = catalog.list_runs(kind="prune")
    assert run.outcome == "succeeded" and run.bytes_in == 300
    consistent(catalog, backend)


@pytest.mark.parametrize(
    ("keys", "after", "left_objects"),
    [
        ("*.json", False, 10),      # before the manifests are deleted
        ("*.json", True, 7),        # after the manifests, before the objects
        ("*.tar.zst", False, 7),    # before the objects
        ("*.tar.zst", True, 4),     # after the objects, before the rows
    ],
)
def test_a_crash_at_each_delete_step_is_finished_by_the_next_prune(
    rig: Rig, keys: str, after: bool, left_objects: int,
) -> None:
    catalog, inner = rig
    store(catalog, inner, [archive(i) for i in range(5)])
    crash = Fault("delete_many", key=keys, error=StorageUnavailable("crash"), after=after)
    flaky = FaultInjectingBackend(inner, [crash])
    result = Pruner(catalog, {"mem": flaky}).prune(policy())
    assert result.error is not None
    assert len(list(inner.list())) == left_objects
    assert len(catalog.list_archives(states=(DELETING,))) == 3
    assert len(catalog.list_archives()) == 2  # the doomed are no longer listed
    consistent(catalog, inner)
    assert find_orphans(catalog, inner, grace=timedelta(0), now=T0 + timedelta(days=1)).orphans == []
    again = Pruner(catalog, {"mem": inner}).prune(policy())
    assert again.error is None and len(again.resumed) == 3
    assert catalog.list_archives(states=(DELETING,)) == []
    assert len(list(inner.list())) == 4
    consistent(catalog, inner)


def test_a_crash_between_marking_and_deleting_rows(rig: Rig) -> None:
    """Rows marked deleting and nothing else done (the process died right after the UPDATE)."""
    catalog, backend = rig
    store(catalog, backend, [archive(i) for i in range(3)])
    catalog.set_state([f"{0:016x}"], DELETING, expect=COMMITTED)
    consistent(catalog, backend)
    result = Pruner(catalog, {"mem": backend}).prune(policy("{keepLast: 5}"))
    assert [a.id for a in result.resumed] == [f"{0:016x}"]
    assert len(list(backend.list())) == 4
    consistent(catalog, backend)


def test_two_daemons_never_prune_the_same_policy_at_once(rig: Rig) -> None:
    catalog, backend = rig
    store(catalog, backend, [archive(i) for i in range(5)])
    assert catalog.acquire_lease("prune/web", "other-daemon", timedelta(minutes=5))
    with pytest.raises(LeaseHeld, match="another backupd is pruning policy 'web'"):
        Pruner(catalog, {"mem": backend}, holder="me").prune(policy())
    assert len(catalog.list_archives()) == 5
    # a killed holder's lease lapses on its own
    assert catalog.acquire_lease("prune/web", "other-daemon", timedelta(seconds=-1))
    assert len(Pruner(catalog, {"mem": backend}, holder="me").prune(policy()).deleted) == 3


def test_orphans_are_found_and_removed_after_grace(rig: Rig) -> None:
    catalog, backend = rig
    store(catalog, backend, [archive(0)])
    orphan = layout.archive_key("default", "deployment-web", "nginx", T0, "00000000000000aa")
    backend.put_bytes(orphan, b"no manifest")
    inflight = archive(7, state=PENDING)
    catalog.add_archive(inflight)
    backend.put_bytes(inflight.key, b"uploading")
    backend.put_bytes("foreign/object.txt", b"not ours")
    now = datetime.now(UTC)
    assert find_orphans(catalog, backend, grace=timedelta(hours=1), now=now).orphans == []  # young
    report = remove_orphans(catalog, backend, grace=timedelta(0), now=now + timedelta(seconds=1))
    assert report.removed == [orphan]
    assert backend.stat(inflight.key) is not None and backend.stat("foreign/object.txt") is not None


def test_failed_rows_are_cleaned_with_their_leftover_objects(rig: Rig) -> None:
    catalog, backend = rig
    failed = archive(1, state=FAILED, created_at=T0)
    catalog.add_archive(failed)
    backend.put_bytes(failed.key, b"partial")
    result = Pruner(catalog, {"mem": backend}, clock=lambda: T0 + timedelta(hours=2)).prune(policy())
    assert result.failed_rows_removed == 1
    assert catalog.list_archives(states=(FAILED,)) == [] and list(backend.list()) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hours=st.lists(st.integers(min_value=0, max_value=24 * 60), min_size=1, max_size=40),
    pins=st.sets(st.integers(min_value=0, max_value=39), max_size=5),
    rules=st.sampled_from(["{keepLast: 3}", "{keepDaily: 3, keepWeekly: 2}", "{keepHourly: 5, keepMonthly: 1}",
                           "{keepWithin: 2d}", "{keepLast: 1, maxTotalBytes: 250}"]),
)
def test_dry_run_and_real_run_agree_and_keep_newest_and_pins(tmp_path_factory, hours, pins, rules) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.open(f"sqlite:///{tmp_path_factory.mktemp('db') / 'c.db'}")
    catalog.upgrade()
    backend = MemoryBackend("mem")
    archives = [archive(i, hours=h, pinned=i in pins) for i, h in enumerate(hours)]
    store(catalog, backend, archives)
    pruner = Pruner(catalog, {"mem": backend})
    planned = {a.id for a in pruner.prune(policy(rules), dry_run=True).removals}
    result = pruner.prune(policy(rules))
    assert {a.id for a in result.deleted} == planned
    remaining = {a.id for a in catalog.list_archives()}
    newest = max(archives, key=lambda a: (a.checkpoint_time, -int(a.id, 16)))
    assert newest.id in remaining or any(a.checkpoint_time == newest.checkpoint_time and a.id in remaining
                                         for a in archives)
    assert {a.id for a in archives if a.pinned} <= remaining
    consistent(catalog, backend)
    catalog.close()


def test_stale_node_tars_are_swept_but_kept_ones_stay(app_factory, sim) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    (p,) = parse_policies("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: db}\n"
                          "spec: {selector: {namespaces: [shop], containers: [postgres]}, schedule: '@hourly', "
                          "backend: local, retention: {keepLast: 5}, keepOnNode: 1}\n", "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    app.runner.cycle(p)
    kept = next(sim.checkpoint_dir.glob("checkpoint-*.tar"))
    crashed = sim.checkpoint_dir / "checkpoint-db-0_shop-postgres-2026-01-01T00:00:00Z.tar"
    crashed.write_bytes(b"left by a crash")
    outside = sim.checkpoint_dir.parent / "precious.tar"
    outside.write_bytes(b"not in the checkpoint dir")
    link = sim.checkpoint_dir / "checkpoint-evil_shop-x-2026-01-01T00:00:00Z.tar"
    link.symlink_to(outside)
    old = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    for f in (kept, crashed):
        os.utime(f, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    removed = app.pipeline.sweep_node(timedelta(hours=24))
    assert removed == [crashed.name]
    assert kept.exists() and outside.exists() and link.is_symlink()
    assert app.pipeline.sweep_node(timedelta(0)) == []  # 0 disables the sweep


def test_daemon_prunes_after_each_cycle(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    (p,) = parse_policies("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: db}\n"
                          "spec: {selector: {namespaces: [shop], containers: [postgres]}, schedule: '@hourly', "
                          "backend: local, retention: {keepLast: 2}}\n", "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    for _ in range(4):
        app.after_cycle(p, app.runner.cycle(p))
    assert len(app.catalog.list_archives()) == 2
    files = [f for f in Path(app.config.backends[0].path).rglob("*") if f.is_file()]
    assert len(files) == 4  # two objects, two manifests


def test_pinned_archives_survive_retention_until_unpinned(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    (p,) = parse_policies("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: db}\n"
                          "spec: {selector: {namespaces: [shop], containers: [postgres]}, schedule: '@hourly', "
                          "backend: local, retention: {keepLast: 1}}\n", "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    first = app.runner.cycle(p).outcomes[0].archive
    app.catalog.set_pinned(first.id[:8], True)
    for _ in range(2):
        app.after_cycle(p, app.runner.cycle(p))
    remaining = app.catalog.list_archives()
    assert first.id in {a.id for a in remaining} and len(remaining) == 2
    app.catalog.set_pinned(first.id, False)
    app.after_cycle(p, app.runner.cycle(p))
    assert first.id not in {a.id for a in app.catalog.list_archives()}


GOLDEN = SHARED / "fixtures" / "restic-policy"


@pytest.mark.skipif(not (GOLDEN / "policies.json").is_file(), reason=f"restic golden fixtures not at {GOLDEN}")
def test_restic_golden_policies_through_retention_simulate(tmp_path: Path) -> None:
    snapshots = json.loads((GOLDEN / "snapshots.json").read_text())
    policies = json.loads((GOLDEN / "policies.json").read_text())
    times = tmp_path / "times.json"
    times.write_text(json.dumps([s["time"] for s in snapshots]))
    checked = 0
    for i, pol in enumerate(policies):
        if pol.get("tags") or not any(v not in (None, 0) for k, v in pol.items() if k != "tags"):
            continue
        args = ["retention", "simulate", "--input", str(times), "--now", "2030-01-01T00:00:00Z"]
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            if pol[name]:
                args += [f"--keep-{name}", str(pol[name])]
        for name in ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly"):
            if pol[name]:
                args += [f"--keep-{name.replace('_', '-')}", pol[name]]
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, (i, out.output)
        got = json.loads(out.output)
        golden = json.loads((GOLDEN / "golden" / f"policy_keep_snapshots_{i}").read_text())
        expected = Counter(s["time"] for s in golden["keep"] or [])
        assert Counter(k["time"] for k in got["keep"]) == expected, f"policy {i}"
        assert len(got["keep"]) + len(got["remove"]) == len(snapshots)
        checked += 1
    assert checked == 36
