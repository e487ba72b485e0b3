"""Garbage collection of the deduplicated format: packs no archive uses, removed in two phases;
mostly-dead packs repacked.

Pruning and deleting remove archives (their recipes and manifests); the packs they used stay,
since later archives share their chunks. A pack is removed only through these states (the
catalog's ``packs.state``), one collection at a time per backend (a lease)::

    stored --(mark: no archive uses it, created more than `grace` ago)--> unused
    unused --(a commit counted on it)--> stored                    (Catalog.commit_dedup_archive)
    unused --(sweep: marked more than `grace` ago, still used by no archive)--> deleting
    deleting --> object deleted --> row dropped

The two phases are restic's two-phase prune in the catalog: ``known()`` stops offering an
``unused`` pack's chunks the moment it is marked, and a writer that was told about them before
the mark has ``grace`` to commit (its commit takes the pack back, in the same transaction as
the row). ``unused -> deleting`` and that commit lock the same rows, so exactly one of them
wins: either the archive is committed and the pack stays, or the pack goes and the commit is
refused (the archive fails; nothing committed ever names a deleted pack). Young packs -- those
of writers still uploading, whose archives are not committed yet -- are never marked.

A crash anywhere leaves ``deleting`` rows that the next collection finishes first. Pack
objects the catalog never recorded (a crash between a pack's put and its row) are removed once
older than ``grace`` -- unless a manifest in the backend names them (a catalog being rebuilt).

Then, third, packs that archives still use but whose live chunks are fewer than
``repack_below`` of them are repacked (:mod:`backupd.storage.dedup.repack`): their live chunks
are copied into new packs, the archives moved to those, and the old packs become ``unused``
-- the two phases above delete them a grace period later::

    stored --(repack: live chunks copied, archives moved to the new packs)--> unused

An encrypted backend's packs can be read only with ``identities`` (``backupd gc
--identity-file``); without them the repack is skipped and reported, not failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from backupd.backends.base import Backend
from backupd.catalog.store import PACK_DELETING, PACK_MISSING, PACK_STORED, PACK_UNUSED, Catalog, PackRecord
from backupd.errors import BackupdError, LeaseHeld
from backupd.storage import layout
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.check import id_schemes
from backupd.storage.dedup.commit import ROOT
from backupd.storage.dedup.ids import ChunkIds
from backupd.storage.dedup.repack import DEFAULT_BUDGET, RepackResult, candidates, repack
from backupd.storage.prune import release_dead_leases

log = structlog.get_logger("backupd.gc")

LEASE_TTL = timedelta(minutes=30)


@dataclass
class GcReport:
    backend: str
    dry_run: bool
    marked: list[str] = field(default_factory=list)  # pack ids now unused (phase one)
    deleted: list[str] = field(default_factory=list)  # pack ids whose objects and rows are gone
    bytes_freed: int = 0
    orphans_deleted: list[str] = field(default_factory=list)  # pack keys the catalog never recorded
    packs: int = 0  # packs of the backend in the catalog before this collection
    repack: RepackResult = field(default_factory=RepackResult)
    error: BackupdError | None = None

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "dry_run": self.dry_run, "packs": self.packs, "marked": self.marked,
                "deleted": self.deleted, "bytes_freed": self.bytes_freed, "orphans_deleted": self.orphans_deleted,
                "repack": self.repack.to_json(), "error": str(self.error) if self.error else None}


def collect(catalog: Catalog, backend: Backend, *, grace: timedelta, now: datetime, holder: str,
            dry_run: bool = False, repack_below: float = 0.0, identities: Sequence[Any] = (),
            recipients: Sequence[Any] = (), ids: Sequence[ChunkIds] = (),
            repack_budget: int = DEFAULT_BUDGET) -> GcReport:
    """One collection of ``backend``'s packs (see the module docstring). Raises
    :class:`LeaseHeld` when another process is collecting this backend.

    ``repack_below``: packs whose live share is below it are repacked (0: none); their new
    packs are sealed for ``recipients`` (the backend's), the old ones read with
    ``identities``, their chunks checked against their ids (SHA-256, keyed with each id key
    the identities decrypt from the backend, or with one of ``ids``: the backend's configured
    id key) -- :mod:`backupd.storage.dedup.repack`."""
    report = GcReport(backend.name, dry_run)
    current = catalog.list_packs(backend.name)
    report.packs = len(current)

    def to_repack() -> list[tuple[PackRecord, int]]:
        if repack_below <= 0:
            return []
        report.repack.candidates, chosen = candidates(catalog, backend, created_before=now - grace,
                                                      below=repack_below, budget=repack_budget)
        if chosen and recipients and not identities:
            report.repack.skipped = (f"{report.repack.candidates} pack(s) to repack, but backend {backend.name!r} "
                                     "is encrypted: run `backupd gc --identity-file FILE` to repack them")
            return []
        return chosen

    if dry_run:
        _plan(report, current, grace=grace, now=now)
        chosen = to_repack()
        report.repack.repacked = [p.pack_id for p, _live in chosen]
        report.repack.bytes_read = sum(p.stored_size for p, _live in chosen)
        return report
    lease = f"gc/{backend.name}"
    if not catalog.acquire_lease(lease, holder, LEASE_TTL) and not (
        release_dead_leases(catalog) and catalog.acquire_lease(lease, holder, LEASE_TTL)
    ):  # a lease of a killed collector on this host is freed rather than waited for
        raise LeaseHeld(f"another process is collecting the packs of backend {backend.name!r}; try again later")
    try:
        # a crash's leftovers, and packs found gone that no archive uses
        _delete(catalog, backend, [p for p in current if p.state == PACK_DELETING
                                   or (p.state == PACK_MISSING and not p.archives)], report)
        _delete(catalog, backend, catalog.doom_unused_packs(backend.name, marked_before=now - grace), report)
        report.marked = [p.pack_id for p in catalog.mark_unused_packs(backend.name, created_before=now - grace,
                                                                        now=now)]
        report.orphans_deleted = _remove_unrecorded(catalog, backend, grace=grace, now=now)
        chosen = to_repack()
        if chosen:
            def renew() -> None:
                if not catalog.acquire_lease(lease, holder, LEASE_TTL):
                    raise LeaseHeld(f"the lease of the collection of backend {backend.name!r} was lost while "
                                    "repacking; the next collection goes on")

            # the id schemes chunks are checked against: SHA-256, the keys the identities
            # decrypt from their copies in the backend, and the key the caller holds
            schemes = [*id_schemes(backend, identities), *ids]
            repack(catalog, backend, chosen, now=now, result=report.repack, identities=identities,
                   recipients=recipients, ids=schemes, renew=renew)
    finally:
        catalog.release_lease(lease, holder)
    if report.repack.skipped:
        log.info("repack_skipped", backend=backend.name, reason=report.repack.skipped)
    log.info("gc_finished", backend=backend.name, packs=report.packs, marked=len(report.marked),
             deleted=len(report.deleted), bytes_freed=report.bytes_freed, orphans=len(report.orphans_deleted),
             repacked=len(report.repack.repacked), repack_kept=len(report.repack.kept),
             repack_read=report.repack.bytes_read, repack_written=report.repack.bytes_written)
    return report


def _plan(report: GcReport, current: list[PackRecord], *, grace: timedelta, now: datetime) -> None:
    for p in current:
        if p.state == PACK_DELETING or (p.state == PACK_UNUSED and not p.archives and p.marked_at is not None
                                        and p.marked_at < now - grace):
            report.deleted.append(p.pack_id)
            report.bytes_freed += p.stored_size
        elif p.state == PACK_STORED and not p.archives and p.created_at < now - grace:
            report.marked.append(p.pack_id)


def _delete(catalog: Catalog, backend: Backend, doomed: list[PackRecord], report: GcReport) -> None:
    """Objects first, then rows: a crash in between leaves ``deleting`` rows to finish."""
    if not doomed:
        return
    backend.delete_many([p.key for p in doomed])
    catalog.drop_pack_rows(backend.name, [p.pack_id for p in doomed])
    report.deleted.extend(p.pack_id for p in doomed)
    report.bytes_freed += sum(p.stored_size for p in doomed)
    for p in doomed:
        log.info("pack_deleted", backend=backend.name, key=p.key, stored_size=p.stored_size)


def _remove_unrecorded(catalog: Catalog, backend: Backend, *, grace: timedelta, now: datetime) -> list[str]:
    """Pack objects older than ``grace`` that the catalog has no row for and no manifest names."""
    recorded = {p.key for p in catalog.list_packs(backend.name)}
    candidates = [o.key for o in backend.list(f"{ROOT}{packs.PACKS_DIR}")
                  if o.key.endswith(".pack") and o.key not in recorded and now - o.modified >= grace]
    if not candidates:
        return []
    named = _packs_named_by_manifests(backend)
    orphans = [k for k in candidates if k.rsplit("/", 1)[-1].removesuffix(".pack") not in named]
    if orphans:
        backend.delete_many(orphans)
        log.info("pack_orphans_removed", backend=backend.name, count=len(orphans))
    return orphans


def _packs_named_by_manifests(backend: Backend) -> set[str]:
    named: set[str] = set()
    for info in backend.list(""):
        parsed = layout.parse_key(info.key)
        if parsed is None or not parsed.is_manifest:
            continue
        try:
            named.update(layout.read_manifest(backend, info.key).packs)
        except BackupdError:
            continue  # unreadable or hostile: reported by verify and rebuild, names nothing here
    return named
