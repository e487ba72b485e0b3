"""Repacking mostly-dead packs: live chunks copied into new packs, archives moved to them, the
old packs deleted a grace period later -- and every archive still restores byte for byte,
through the catalog, through the repack notes (no catalog), after a catalog rebuild and with
the standalone script."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from backupd.app import App
from backupd.backends.base import Backend, ObjectInfo, Readable
from backupd.backends.wrappers import Wrapper
from backupd.catalog.store import PACK_STORED, PACK_UNUSED
from backupd.model import now_utc
from backupd.simulator.server import NodeSimulator
from backupd.storage.dedup.gc import collect
from backupd.storage.dedup.moved import all_notes
from backupd.storage.dedup.pack import list_packs
from backupd.storage.prune import delete_archives
from backupd.storage.verify import verify
from tests import policies
from tests.dedup.conftest import dedup_app, encrypted_dedup_app, read_all

GRACE = timedelta(hours=6)
#: every pack with a dead chunk (how much of the first cycle's packs the second uses depends on
#: which pod's checkpoint the simulator answers first)
BELOW = 1.0


def gc(app: App, now: Any, backend: Backend | None = None, **options: Any) -> Any:
    return collect(app.catalog, backend or app.backends["local"], grace=GRACE, now=now, holder="test",
                   repack_below=BELOW, **options)


def two_cycles_then_the_first_deleted(app: App) -> list[Any]:
    """Four archives (two pods, two checkpoints each); the first cycle's are deleted, so the
    packs they wrote are used only for the pages the second cycle did not change."""
    policy = policies.apply(app, policies.web_policy(keep_on_node=10))
    for _ in range(2):
        assert not app.runner.cycle(policy).failed
    archives = app.catalog.list_archives()
    delete_archives(app.catalog, app.backends, archives[:2])
    return archives


def restores(app: App, sim: NodeSimulator, **options: Any) -> None:
    for a in app.catalog.list_archives():
        assert read_all(app, a, **options) == (sim.checkpoint_dir / a.node_path).read_bytes()


def stored_bytes(app: App) -> int:
    return sum(p.stored_size for p in app.catalog.list_packs("local"))


def test_repack_reclaims_space_and_every_archive_restores(app: App, sim: NodeSimulator, tmp_path: Path,
                                                          kind: dict[str, object]) -> None:
    two_cycles_then_the_first_deleted(app)
    backend = app.backends["local"]
    before = stored_bytes(app)
    later = now_utc() + GRACE + timedelta(minutes=1)
    plan = gc(app, later, dry_run=True)
    done = gc(app, later)
    repack = done.repack
    assert repack.candidates and sorted(repack.repacked) == sorted(plan.repack.repacked)
    assert len(repack.repacked) == repack.candidates and repack.written and repack.kept == []
    assert repack.skipped is None
    assert repack.bytes_written < repack.bytes_read
    states = {p.pack_id: (p.state, p.archives) for p in app.catalog.list_packs("local")}
    assert all(states[old] == (PACK_UNUSED, 0) for old in repack.repacked)
    assert all(states[new][0] == PACK_STORED and states[new][1] for new in repack.written)
    assert set(all_notes(backend)) == set(repack.repacked)
    # after the swap: the old packs are still there for readers that located chunks in them
    restores(app, sim)
    restores(app, sim, catalog=app.catalog)
    # a grace period later the sweep deletes them; everything restores from the new packs
    swept = gc(app, later + GRACE + timedelta(minutes=1))
    assert set(repack.repacked) <= set(swept.deleted) and swept.repack.repacked == []
    assert stored_bytes(app) < before
    assert set(list_packs(backend)) == {p.key for p in app.catalog.list_packs("local")}
    assert not set(repack.repacked) & {p.pack_id for p in app.catalog.list_packs("local")}
    restores(app, sim, catalog=app.catalog)  # through archive_packs
    restores(app, sim)  # through the notes of the packs the manifests name
    archives = app.catalog.list_archives()
    assert verify(app.catalog, app.backends, archives, structure=True, read_data=True,
                  dedup_backends=["local"]).clean
    # a lost catalog is rebuilt through the notes too
    from backupd.storage.rebuild import rebuild

    lost = dedup_app(tmp_path, sim, f"sqlite:///{tmp_path / 'rebuilt.db'}", **kind)
    try:
        report = rebuild(lost.catalog, lost.backends["local"])
        assert report.clean and len(report.added) == 2, report.to_json()
        assert {p.pack_id for p in lost.catalog.list_packs("local")} == {p.pack_id for p in
                                                                          app.catalog.list_packs("local")}
        for a in lost.catalog.list_archives():
            assert sorted(lost.catalog.archive_pack_ids(a.id)) == sorted(app.catalog.archive_pack_ids(a.id))
            assert hashlib.sha256(read_all(lost, a, catalog=lost.catalog)).hexdigest() == a.tar_sha256
    finally:
        lost.close()
    if kind or shutil.which("zstd") is None:
        return  # the standalone script reads a directory: the filesystem backend's
    script = Path(__file__).resolve().parents[2] / "tools" / "restore-dedup.py"
    for a in archives:
        out = tmp_path / f"{a.id}.tar"
        ran = subprocess.run([sys.executable, "-S", "-E", str(script), str(tmp_path / "backend"), a.key, "-o",
                              str(out)], capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr
        assert out.read_bytes() == (sim.checkpoint_dir / a.node_path).read_bytes()


class BeforeTheFirstNote(Wrapper):
    """The backend, with ``hook`` run once just before the repack puts its first note: between
    the new packs being stored and the catalog's swap."""

    def __init__(self, inner: Backend, hook: Any) -> None:
        super().__init__(inner)
        self.hook = hook

    def put(self, key: str, source: Readable) -> ObjectInfo:
        if key.startswith("dedup/moved/") and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return self.inner.put(key, source)


def test_a_checkpoint_reviving_a_dead_chunk_keeps_the_old_pack(fs_app: App, sim: NodeSimulator) -> None:
    """While the repack copies the live chunks, a checkpoint whose pages are those of a deleted
    archive commits: it reuses chunks that were dead in the old pack. The swap sees them used
    and leaves that pack as it is; nothing it holds is lost, at once or after the sweep."""
    app = fs_app
    first, *_ = two_cycles_then_the_first_deleted(app)
    (pod,) = [p for p in app.kubelet.pods() if p.name == first.pod]
    (container,) = [c for c in pod.containers if c.name == first.container]
    policy = app.load_policy("web")
    revived: list[Any] = []

    def checkpoint_again() -> None:  # the deleted archive's tar, committed again by the real pipeline
        revived.append(app.pipeline.commit(policy, pod, container, Path(first.node_path), now_utc()))

    later = now_utc() + GRACE + timedelta(minutes=1)
    done = gc(app, later, BeforeTheFirstNote(app.backends["local"], checkpoint_again))
    assert revived and revived[0].state == "committed"
    kept = {k["pack"]: k["reason"] for k in done.repack.kept}
    assert kept and all("used now" in why for why in kept.values())
    packs = {p.pack_id: p for p in app.catalog.list_packs("local")}
    assert all(packs[pack_id].state == PACK_STORED for pack_id in kept)
    assert packs[next(iter(kept))].archives >= 2  # the revived archive's row is there
    swept = gc(app, later + GRACE + timedelta(minutes=1))
    assert not set(kept) & set(swept.deleted)
    restores(app, sim)
    restores(app, sim, catalog=app.catalog)


def test_encrypted_backends_repack_only_with_the_identity(tmp_path: Path, sim: NodeSimulator) -> None:
    app, ident = encrypted_dedup_app(tmp_path, sim)
    try:
        two_cycles_then_the_first_deleted(app)
        recipients = [ident.to_public()]
        later = now_utc() + GRACE + timedelta(minutes=1)
        # the daemon holds only the recipients: it cannot read the packs
        blind = gc(app, later, recipients=recipients)
        assert blind.repack.candidates and blind.repack.repacked == [] and blind.error is None
        assert "--identity-file" in (blind.repack.skipped or "")
        done = gc(app, later, recipients=recipients, identities=[ident])
        assert len(done.repack.repacked) == blind.repack.candidates and done.repack.kept == []
        keys = {p.pack_id: p.key for p in app.catalog.list_packs("local")}
        for new in done.repack.written:
            assert (tmp_path / "backend" / keys[new]).read_bytes().startswith(b"age-encryption.org/v1")
        gc(app, later + GRACE + timedelta(minutes=1))
        archives = app.catalog.list_archives()
        # without the identity, verify checks the packs each archive uses now by their names
        assert verify(app.catalog, app.backends, archives).clean
        for a in archives:
            assert read_all(app, a, [ident]) == (sim.checkpoint_dir / a.node_path).read_bytes()
            assert read_all(app, a, [ident], catalog=app.catalog) == (sim.checkpoint_dir / a.node_path).read_bytes()
    finally:
        app.close()


def test_no_repack_when_disabled_or_live_enough_and_a_damaged_pack_is_kept(fs_app: App, tmp_path: Path) -> None:
    app = fs_app
    two_cycles_then_the_first_deleted(app)
    later = now_utc() + GRACE + timedelta(minutes=1)
    found = app.catalog.repack_candidates("local", created_before=later - GRACE, below=1)
    emptiest = min(live.bit_count() / p.chunk_count for p, live in found)
    for below in (0.0, emptiest):  # off; at the emptiest pack's live share (only those below it go)
        done = collect(app.catalog, app.backends["local"], grace=GRACE, now=later, holder="test",
                       repack_below=below)
        assert done.repack.candidates == 0 and done.repack.written == []
    assert all_notes(app.backends["local"]) == {}
    # a candidate damaged in the backend is not copied (nor its damage): it stays, for verify
    damaged = tmp_path / "backend" / found[0][0].key
    damaged.chmod(0o600)
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    done = gc(app, later)
    assert [k["pack"] for k in done.repack.kept] == [found[0][0].pack_id]
    assert "does not match its name" in done.repack.kept[0]["reason"]
    assert done.repack.repacked == [p.pack_id for p, _live in found[1:]]
    assert {p.pack_id: p.state for p in app.catalog.list_packs("local")}[found[0][0].pack_id] == PACK_STORED


def test_notes_are_followed_through_later_repacks_and_loops_end() -> None:
    from backupd.storage.dedup.moved import MAX_HOPS, follow

    a, b, c, d, e, f = (ch * 64 for ch in "abcdef")
    notes = {a: [b], b: [c, d, f], e: [e]}  # a -> b -> (c, d, f gone); a planted note of e to itself
    present = {c, d}.__contains__
    assert follow([a], present=present, notes=lambda p: notes.get(p, [])) == [c, d]
    assert follow([c, a], present=present, notes=lambda p: notes.get(p, [])) == [c, d]
    # gone, and no note leads anywhere: its reader reports it missing
    assert follow([e, f], present=present, notes=lambda p: notes.get(p, [])) == [e, f]
    chain = {f"{n:064x}": [f"{n + 1:064x}"] for n in range(100)}
    for end, found in ((MAX_HOPS, f"{MAX_HOPS:064x}"), (MAX_HOPS + 1, f"{0:064x}")):
        assert follow([f"{0:064x}"], present=lambda p, end=end: p == f"{end:064x}",
                      notes=lambda p: chain.get(p, [])) == [found]
