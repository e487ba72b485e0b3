"""``catalog rebuild``: recreate catalog rows from the manifests in a backend.

Backends are self-describing: every archive's manifest sits beside its object, and the
manifest's presence is what makes an archive exist. So a lost or empty catalog is rebuilt from
the manifests alone. Rebuilding is idempotent and safe against a live catalog: it only adds
archives the catalog lacks, and reports -- never "fixes" -- what disagrees, objects without a
manifest (orphans) and catalog archives whose manifest is gone.

The backend is not trusted (RELIABILITY.md, "Trust model of the backend"). A manifest is
catalogued only if it passes the schema and agrees with the key it sits beside
(:meth:`~backupd.storage.layout.Manifest.read`): one planted under ``evil/...`` that claims to be of
namespace ``shop`` is reported, never catalogued, so it can neither become ``restore
--latest`` of ``shop`` nor push ``shop``'s real archives out of retention. One bad manifest
(not JSON, too large, a naive time, a huge integer) is reported and skipped; the rest goes on.
An archive id found in two manifests is catalogued from neither, unless the catalog already
holds it at exactly one of their keys.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from backupd.backends.base import Backend
from backupd.catalog.store import Catalog
from backupd.errors import IntegrityError, ManifestInvalid, ManifestKeyMismatch, StorageNotFound
from backupd.model import COMMITTED, Archive, now_utc
from backupd.storage import layout
from backupd.storage.dedup import moved
from backupd.storage.dedup.rebuild import rebuild_packs

log = structlog.get_logger("backupd.rebuild")

_COMPARED = ("backend", "key", "namespace", "pod", "workload", "replica", "container", "tar_size", "stored_size",
             "tar_sha256", "stored_sha256", "encryption", "policy")


@dataclass
class RebuildReport:
    backend: str
    added: list[str] = field(default_factory=list)
    agreeing: int = 0
    disagreeing: list[dict[str, Any]] = field(default_factory=list)  # archive id, field, catalog, manifest
    bad_manifests: list[dict[str, str]] = field(default_factory=list)  # key, error
    key_disagreements: list[dict[str, str]] = field(default_factory=list)  # key, field, in_key, in_manifest
    duplicate_ids: list[dict[str, Any]] = field(default_factory=list)  # id, keys (manifest keys)
    orphans: list[str] = field(default_factory=list)  # object keys without a manifest
    missing: list[str] = field(default_factory=list)  # catalog archive ids whose manifest is gone
    packs_added: int = 0  # deduplicated format: packs recorded from their own indexes
    corrupt_packs: list[dict[str, str]] = field(default_factory=list)  # key, error

    @property
    def clean(self) -> bool:
        return not (self.disagreeing or self.bad_manifests or self.key_disagreements or self.duplicate_ids
                    or self.orphans or self.missing or self.corrupt_packs)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "added": self.added, "agreeing": self.agreeing,
                "disagreeing": self.disagreeing, "bad_manifests": self.bad_manifests,
                "key_disagreements": self.key_disagreements, "duplicate_ids": self.duplicate_ids,
                "orphans": self.orphans, "missing": self.missing,
                # deduplicated backends only: packs recorded from their indexes, and bad ones
                **({"packs_added": self.packs_added, "corrupt_packs": self.corrupt_packs}
                   if self.packs_added or self.corrupt_packs else {})}


def archive_from_manifest(m: layout.Manifest, backend: str) -> Archive:
    return Archive(**m.archive_facts(), state=COMMITTED, backend=backend, created_at=m.checkpoint_time,
                   committed_at=now_utc(), node_tar_deleted=True)


def _read(backend: Backend, mkey: str, report: RebuildReport) -> layout.Manifest | None:
    """The manifest at ``mkey``, or None with the reason added to the report."""
    try:
        return layout.read_manifest(backend, mkey)
    except StorageNotFound:
        report.bad_manifests.append({"key": mkey, "error": "deleted while the catalog was being rebuilt"})
    except ManifestInvalid as exc:
        report.bad_manifests.append({"key": mkey, "error": str(exc)})
    except ManifestKeyMismatch as exc:
        report.key_disagreements.extend({"key": mkey, "field": f, "in_key": k, "in_manifest": m}
                                        for f, k, m in exc.disagreements)
    return None


def _record_packs_used(catalog: Catalog, backend: Backend, m: layout.Manifest, report: RebuildReport,
                       current: Callable[[list[str]], list[str]]) -> bool:
    """The packs a deduplicated archive uses, recorded for garbage collection: those its
    manifest names, or -- for one a repack emptied and deleted -- the packs its chunks were
    moved to (``current``); an archive naming a pack the backend lacks is reported and not
    catalogued. Which chunks of them it uses is not known here: every one counts as used."""
    try:
        catalog.commit_dedup_archive(m.archive_id, backend.name, current(m.packs))
        return True
    except IntegrityError as exc:
        catalog.delete_archive_row(m.archive_id)
        report.bad_manifests.append({"key": layout.manifest_key(m.key), "error": str(exc)})
        return False


def rebuild(catalog: Catalog, backend: Backend, *, identities: Sequence[Any] = ()) -> RebuildReport:
    """``identities``: to read the indexes of encrypted packs (deduplicated format)."""
    report = RebuildReport(backend.name)
    packs = rebuild_packs(catalog, backend, identities=identities)
    report.packs_added, report.corrupt_packs = len(packs.added), packs.corrupt
    recorded = {p.pack_id for p in catalog.list_packs(backend.name)}
    notes: dict[str, list[str]] | None = None

    def packs_now(pack_ids: list[str]) -> list[str]:
        nonlocal notes
        if all(p in recorded for p in pack_ids):
            return pack_ids
        if notes is None:  # one listing of the notes, when a manifest names a pack that is gone
            notes = moved.all_notes(backend)
        found = notes
        return moved.follow(pack_ids, present=recorded.__contains__, notes=lambda p: found.get(p, []))

    objects: set[str] = set()
    manifests: list[str] = []
    for info in backend.list(""):
        parsed = layout.parse_key(info.key)
        if parsed is None:
            continue
        if parsed.is_manifest:
            manifests.append(info.key)
        else:
            objects.add(info.key)
    catalogued = {a.id: a for a in catalog.list_archives(states=())}  # ids are unique across backends
    by_id: dict[str, list[layout.Manifest]] = defaultdict(list)
    for mkey in sorted(manifests):
        manifest = _read(backend, mkey, report)
        if manifest is None:
            continue
        if manifest.key not in objects:
            report.bad_manifests.append({"key": mkey, "error": f"its object {manifest.key} is missing"})
            continue
        by_id[manifest.archive_id].append(manifest)
    for archive_id, found in by_id.items():
        current = catalogued.get(archive_id)
        if len(found) > 1:
            # Which one is real cannot be told from the bucket; the catalog may know.
            report.duplicate_ids.append({"id": archive_id, "keys": [layout.manifest_key(m.key) for m in found]})
            found = [m for m in found if current and (current.backend, current.key) == (backend.name, m.key)]
            if not found:
                continue
        (manifest,) = found
        if current is None:
            catalog.add_archive(archive_from_manifest(manifest, backend.name))
            if manifest.format == "dedup" and not _record_packs_used(catalog, backend, manifest, report, packs_now):
                continue
            report.added.append(archive_id)
            continue
        stored = archive_from_manifest(manifest, backend.name)
        differences = [{"id": current.id, "field": f, "catalog": getattr(current, f), "manifest": getattr(stored, f)}
                       for f in _COMPARED if getattr(current, f) != getattr(stored, f)]
        if current.state != COMMITTED:
            differences.append({"id": current.id, "field": "state", "catalog": current.state, "manifest": COMMITTED})
        report.disagreeing.extend(differences)
        report.agreeing += not differences
    listed_manifests = set(manifests)
    report.orphans = sorted(k for k in objects if layout.manifest_key(k) not in listed_manifests)
    # an archive whose manifest is there but bad is reported above, not as missing
    report.missing = sorted(a.id for a in catalogued.values()
                            if a.backend == backend.name and a.state == COMMITTED
                            and layout.manifest_key(a.key) not in listed_manifests)
    log.info("catalog_rebuilt", backend=backend.name, added=len(report.added), agreeing=report.agreeing,
             disagreeing=len(report.disagreeing), bad_manifests=len(report.bad_manifests),
             key_disagreements=len(report.key_disagreements), duplicate_ids=len(report.duplicate_ids),
             orphans=len(report.orphans), missing=len(report.missing))
    return report
