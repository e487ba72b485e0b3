"""``catalog rebuild``: recreate catalog rows from the manifests in a backend.

Backends are self-describing: every archive's manifest sits beside its object, and the
manifest's presence is what makes an archive exist. So a lost or empty catalog is rebuilt from
the manifests alone. Rebuilding is idempotent and safe against a live catalog: it only adds
archives the catalog lacks, and reports -- never "fixes" -- what disagrees, objects without a
manifest (orphans) and catalog archives whose manifest is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from backupd import layout
from backupd.backends.base import Backend
from backupd.catalog import COMMITTED, Archive, Catalog, now_utc
from backupd.errors import BackupdError

log = structlog.get_logger("backupd.rebuild")

_COMPARED = ("key", "namespace", "pod", "workload", "replica", "container", "tar_size", "stored_size", "tar_sha256",
             "stored_sha256", "policy")


@dataclass
class RebuildReport:
    backend: str
    added: list[str] = field(default_factory=list)
    agreeing: int = 0
    disagreeing: list[dict[str, Any]] = field(default_factory=list)  # archive id, field, catalog, manifest
    bad_manifests: list[dict[str, str]] = field(default_factory=list)  # key, error
    orphans: list[str] = field(default_factory=list)  # object keys without a manifest
    missing: list[str] = field(default_factory=list)  # catalog archive ids whose manifest is gone

    @property
    def clean(self) -> bool:
        return not (self.disagreeing or self.bad_manifests or self.orphans or self.missing)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "added": self.added, "agreeing": self.agreeing,
                "disagreeing": self.disagreeing, "badManifests": self.bad_manifests, "orphans": self.orphans,
                "missing": self.missing}


def archive_from_manifest(m: layout.Manifest, backend: str) -> Archive:
    return Archive(
        id=m.archive_id, state=COMMITTED, policy=m.policy, backend=backend, key=m.key, node=m.node,
        namespace=m.namespace, pod=m.pod, workload=m.workload, container=m.container, image=m.image,
        checkpoint_time=m.checkpoint_time, created_at=m.checkpoint_time, committed_at=now_utc(),
        tar_size=m.tar_size, stored_size=m.stored_size, tar_sha256=m.tar_sha256, stored_sha256=m.stored_sha256,
        compression=m.compression, encryption=m.encryption, node_tar_deleted=True, replica=m.replica,
    )


def rebuild(catalog: Catalog, backend: Backend) -> RebuildReport:
    report = RebuildReport(backend.name)
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
    existing = {a.id: a for a in catalog.list_archives(backend=backend.name, states=())}
    seen_ids = set()
    for mkey in sorted(manifests):
        try:
            manifest = layout.Manifest.from_json(backend.read_bytes(mkey), f"{backend.name}:{mkey}")
            if layout.manifest_key(manifest.key) != mkey:
                raise BackupdError(f"manifest {mkey} names another object, {manifest.key!r}")
        except BackupdError as exc:
            report.bad_manifests.append({"key": mkey, "error": str(exc)})
            continue
        seen_ids.add(manifest.archive_id)
        if manifest.key not in objects:
            report.bad_manifests.append({"key": mkey, "error": f"its object {manifest.key} is missing"})
            continue
        current = existing.get(manifest.archive_id)
        if current is None:
            catalog.add_archive(archive_from_manifest(manifest, backend.name))
            report.added.append(manifest.archive_id)
            continue
        differences = [
            {"id": current.id, "field": f, "catalog": getattr(current, f), "manifest": getattr(manifest, f)}
            for f in _COMPARED if getattr(current, f) != getattr(manifest, f)
        ]
        if current.state != COMMITTED:
            differences.append({"id": current.id, "field": "state", "catalog": current.state, "manifest": COMMITTED})
        report.disagreeing.extend(differences)
        report.agreeing += not differences
    listed_manifests = set(manifests)
    report.orphans = sorted(k for k in objects if layout.manifest_key(k) not in listed_manifests)
    report.missing = sorted(a.id for a in existing.values() if a.state == COMMITTED and a.id not in seen_ids)
    log.info("catalog_rebuilt", backend=backend.name, added=len(report.added), agreeing=report.agreeing,
             disagreeing=len(report.disagreeing), orphans=len(report.orphans), missing=len(report.missing))
    return report
