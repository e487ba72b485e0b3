"""Garbage collection of packs: two phases a grace period apart; nothing an archive uses is
ever deleted, and every archive left restores byte for byte."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from backupd.app import App
from backupd.catalog.store import PACK_STORED, PACK_UNUSED
from backupd.model import now_utc
from backupd.simulator.server import NodeSimulator
from backupd.storage.dedup.gc import collect
from backupd.storage.dedup.pack import list_packs
from backupd.storage.prune import delete_archives
from tests import policies
from tests.dedup.conftest import read_all

GRACE = timedelta(hours=6)


def gc(app: App, now):  # type: ignore[no-untyped-def]
    return collect(app.catalog, app.backends["local"], grace=GRACE, now=now, holder="test")


def assert_all_restore(app: App, sim: NodeSimulator) -> None:
    for a in app.catalog.list_archives():
        assert read_all(app, a) == (sim.checkpoint_dir / a.node_path).read_bytes()


def test_packs_of_deleted_archives_go_in_two_phases(app: App, sim: NodeSimulator, tmp_path: Path) -> None:
    policy = policies.apply(app, policies.web_policy(keep_on_node=10))
    assert not app.runner.cycle(policy).failed
    backend = app.backends["local"]
    old = set(list_packs(backend, "dedup/"))
    now = now_utc()
    assert gc(app, now).marked == []  # every pack is used
    delete_archives(app.catalog, app.backends, app.catalog.list_archives())
    young = gc(app, now)
    assert young.marked == [] and young.deleted == []  # created less than the grace ago
    later = now + GRACE + timedelta(minutes=1)
    plan = collect(app.catalog, backend, grace=GRACE, now=later, holder="test", dry_run=True)
    first = gc(app, later)
    assert first.marked and sorted(first.marked) == sorted(plan.marked) and first.deleted == []
    assert {p.key for p in app.catalog.list_packs("local", states=(PACK_UNUSED,))} == old
    assert set(list_packs(backend, "dedup/")) == old  # phase one deletes nothing
    # unused packs are not offered to writers: the next checkpoints store their chunks anew
    assert not app.runner.cycle(policy).failed
    new = set(list_packs(backend, "dedup/")) - old
    assert new and all(p.state == PACK_STORED for p in app.catalog.list_packs("local") if p.key in new)
    second = gc(app, later + GRACE + timedelta(minutes=1))
    assert sorted(second.deleted) == sorted(first.marked) and second.bytes_freed > 0
    assert set(list_packs(backend, "dedup/")) == new == {p.key for p in app.catalog.list_packs("local")}
    assert_all_restore(app, sim)


def test_a_commit_takes_back_a_pack_marked_unused_meanwhile(app: App, sim: NodeSimulator) -> None:
    """A writer told about a pack's chunks before the mark commits after it: the pack stays."""
    policy = policies.apply(app, policies.web_policy(keep_on_node=10))
    assert not app.runner.cycle(policy).failed
    archives = app.catalog.list_archives()
    packs_of = {a.id: set(app.catalog.archive_pack_ids(a.id)) for a in archives}
    # the two pods' writers run side by side, so either may reuse the other's packs: delete the
    # one with a pack of its own
    first, other = next((a, b) for a, b in (archives, archives[::-1]) if packs_of[a.id] - packs_of[b.id])
    used = {p.pack_id for p in app.catalog.list_packs("local")}
    delete_archives(app.catalog, app.backends, [first])
    later = now_utc() + GRACE + timedelta(minutes=1)
    marked = gc(app, later).marked
    assert marked
    # the remaining archive's row is committed again as a writer that used every pack would
    app.catalog.commit_dedup_archive(other.id, "local", sorted(used))
    assert all(p.state == PACK_STORED for p in app.catalog.list_packs("local"))
    assert gc(app, later + GRACE + timedelta(minutes=1)).deleted == []
    assert_all_restore(app, sim)


def test_packs_lost_behind_backupds_back_are_never_counted_on_again(app: App, sim: NodeSimulator) -> None:
    """A bucket emptied (or a pack deleted) outside backupd: the next checkpoint finds the
    packs it would reuse gone and fails; the one after stores everything anew and restores."""
    policy = policies.apply(app, policies.web_policy(keep_on_node=10))
    assert not app.runner.cycle(policy).failed
    backend = app.backends["local"]
    lost = list_packs(backend, "dedup/")
    backend.delete_many(lost)
    failed = app.runner.cycle(policy)
    assert failed.failed and all(o.run.error_kind == "IntegrityError" for o in failed.outcomes)
    assert "gone from backend" in (failed.outcomes[0].run.error or "")
    assert {p.state for p in app.catalog.list_packs("local") if p.key in lost} == {"missing"}
    assert not app.runner.cycle(policy).failed
    newest = sorted(app.catalog.list_archives(), key=lambda a: a.checkpoint_time)[-2:]
    for a in newest:
        assert read_all(app, a) == (sim.checkpoint_dir / a.node_path).read_bytes()
