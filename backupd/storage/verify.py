"""``backupd verify`` and scheduled restore drills: read archives back and prove them whole.

Each archive's manifest must pass the schema, agree with its key and with the catalog. Its
object is streamed back and decompressed; its size and SHA-256 (of the stored bytes and of the
tar) are checked against the catalog -- sizes as the bytes come, so a decompression bomb stops
at the declared size -- and every tar member must pass the rules restore and inspect apply
(:mod:`backupd.archive.tar`: no ``..``, absolute names, links, devices, FIFOs). A bit flip, a
truncation or a hostile member anywhere is caught (status ``corrupt``). With ``structure=True``
(the CLI's default, and restore drills) the tar must also be a checkpoint archive:
``config.dump`` and ``spec.dump`` present and valid JSON, ``checkpoint/inventory.img``.
Objects without a manifest in the same backends are reported as orphans.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from backupd.archive.tar import ScanningReader, TarScanner
from backupd.backends.base import Backend
from backupd.catalog.store import Catalog
from backupd.errors import IntegrityError, StorageNotFound
from backupd.model import Archive, now_utc
from backupd.storage.dedup.check import PackCheck, check_packs
from backupd.storage.prune import find_orphans
from backupd.storage.read import VerifiedTar, current_packs, drain, open_verified, verified_manifest

log = structlog.get_logger("backupd.verify")

OK, MISSING, CORRUPT, MANIFEST = "ok", "missing", "corrupt", "manifest"


@dataclass(frozen=True)
class Finding:
    archive_id: str
    backend: str
    key: str
    status: str  # ok | missing | corrupt | manifest
    detail: str = ""


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    orphans: dict[str, list[str]] = field(default_factory=dict)  # backend -> object keys
    bytes_read: int = 0
    packs: dict[str, PackCheck] = field(default_factory=dict)  # deduplicated backends: their packs

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status != OK]

    @property
    def clean(self) -> bool:
        return (not self.problems and not any(self.orphans.values())
                and not any(c.problems for c in self.packs.values()))

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": len(self.findings),
            "ok": sum(f.status == OK for f in self.findings),
            "problems": [f.__dict__ for f in self.problems],
            "orphans": self.orphans,
            "bytes_read": self.bytes_read,
            **({"packs": {name: c.to_json() for name, c in self.packs.items()}} if self.packs else {}),
        }


def choose_sample(archives: Sequence[Archive], sample: int | None, rng: random.Random | None = None) -> list[Archive]:
    """All archives, or ``sample`` of them at random -- always including each policy's newest."""
    if sample is None or sample >= len(archives):
        return list(archives)
    newest: dict[str, Archive] = {}
    for a in archives:
        if a.policy not in newest or a.checkpoint_time > newest[a.policy].checkpoint_time:
            newest[a.policy] = a
    chosen = list(newest.values())[:sample]
    rest = [a for a in archives if a not in chosen]
    chosen += (rng or random.Random()).sample(rest, max(0, sample - len(chosen)))
    return sorted(chosen, key=lambda a: (a.checkpoint_time, a.id))


_REQUIRED = ("config.dump", "spec.dump", "checkpoint/inventory.img")
_JSON_FILES = ("config.dump", "spec.dump")


def scan_archive(reader: VerifiedTar, what: str, *, structure: bool) -> None:
    """Read a verified stream to its end through the member rules every reader applies
    (:mod:`backupd.archive.tar`); with ``structure``, also require what every runtime's restore
    needs: ``config.dump`` and ``spec.dump`` holding JSON, ``checkpoint/inventory.img``."""
    present: set[str] = set()

    def keep(name: str) -> bool:
        if name in _REQUIRED:
            present.add(name)
        return structure and name in _JSON_FILES

    scanner = TarScanner(what, keep)
    drain(ScanningReader(reader, scanner, explain=reader.explain))
    if not structure:
        return
    missing = [name for name in _REQUIRED if name not in present]
    if missing:
        raise IntegrityError(f"{what}: not a checkpoint archive, missing {', '.join(missing)}")
    for name in _JSON_FILES:
        try:
            json.loads(scanner.files[name])
        except ValueError:
            raise IntegrityError(f"{what}: {name} is not valid JSON") from None


def verify_archive(archive: Archive, backend: Backend, *, structure: bool = False,
                   identities: Sequence[Any] = (), catalog: Catalog | None = None) -> tuple[Finding, int]:
    """Read one archive back: its manifest (schema, key, catalog), then every stored byte and,
    with an identity for encrypted ones, every tar member (:func:`scan_archive`). With
    ``catalog``, a deduplicated archive's chunks are read from the packs it uses now."""
    what = f"archive {archive.id} ({backend.name}:{archive.key})"
    try:
        manifest = verified_manifest(backend, archive)
    except IntegrityError as exc:
        return Finding(archive.id, backend.name, archive.key, MANIFEST, str(exc)), 0
    pack_ids = current_packs(catalog, archive, manifest)
    try:
        if archive.encryption == "age" and not identities and manifest.format == "dedup":
            from backupd.storage.dedup.read import verify_stored

            try:
                verify_stored(backend, archive.key, what=what, recipe_sha256=manifest.stored_sha256,
                              recipe_size=manifest.recipe_size, pack_ids=pack_ids or manifest.packs)
            except IntegrityError as exc:
                return Finding(archive.id, backend.name, archive.key, CORRUPT, str(exc)), 0
            return Finding(archive.id, backend.name, archive.key, OK,
                           "encrypted: recipe and packs verified by their digests; the tar needs --identity-file"), 0
        if archive.encryption == "age" and not identities:  # the stored bytes are all that can be checked
            with open_verified(backend, archive, manifest, stored_only=True) as stored:
                try:
                    drain(stored)
                except IntegrityError as exc:
                    return Finding(archive.id, backend.name, archive.key, CORRUPT, str(exc)), 0
            return Finding(archive.id, backend.name, archive.key, OK,
                           "encrypted: stored bytes verified; the tar needs --identity-file"), 0
        with open_verified(backend, archive, manifest, identities, pack_ids=pack_ids) as reader:
            try:
                scan_archive(reader, what, structure=structure)
            except IntegrityError as exc:
                return Finding(archive.id, backend.name, archive.key, CORRUPT, str(exc)), reader.tar_size
    except StorageNotFound:
        return Finding(archive.id, backend.name, archive.key, MISSING, "the object is gone"), 0
    return Finding(archive.id, backend.name, archive.key, OK), reader.tar_size


def verify(
    catalog: Catalog,
    backends: Mapping[str, Backend],
    archives: Sequence[Archive],
    *,
    structure: bool = False,
    orphan_grace: timedelta | None = timedelta(hours=1),
    identities: Sequence[Any] = (),
    read_data: bool = False,
    dedup_backends: Sequence[str] = (),
) -> VerifyReport:
    """Check ``archives``; with ``orphan_grace`` also report orphans in their backends.
    The packs of ``dedup_backends`` are checked too: a sample, or all with ``read_data``
    (:mod:`backupd.storage.dedup.check`)."""
    report = VerifyReport()
    for a in archives:
        backend = backends.get(a.backend)
        if backend is None:
            report.findings.append(Finding(a.id, a.backend, a.key, MISSING, f"backend {a.backend!r} is not configured"))
            continue
        finding, read = verify_archive(a, backend, structure=structure, identities=identities, catalog=catalog)
        report.findings.append(finding)
        report.bytes_read += read
        if finding.status != OK:
            log.error("archive_verify_failed", archive_id=a.id, status=finding.status, detail=finding.detail)
    for name in dedup_backends:
        if name in backends:
            report.packs[name] = check_packs(catalog, backends[name], read_data=read_data, identities=identities)
            report.bytes_read += report.packs[name].bytes_read
    if orphan_grace is not None:
        for name in sorted({a.backend for a in archives} & backends.keys()):
            found = find_orphans(catalog, backends[name], grace=orphan_grace, now=now_utc())
            report.orphans[name] = found.orphans
    return report
