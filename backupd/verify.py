"""``backupd verify`` and scheduled restore drills: read archives back and prove them whole.

Each archive's object is streamed back and decompressed; its size and SHA-256 (of the stored
bytes and of the tar) are checked against the catalog, and the manifest must agree with the
catalog too. A bit flip or a truncation anywhere is caught. With ``structure=True`` (restore
drills) the tar itself is walked and must be a checkpoint archive: ``config.dump`` and
``spec.dump`` present and valid JSON, a ``checkpoint/`` directory with ``inventory.img``.
Objects without a manifest in the same backends are reported as orphans.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from backupd import layout
from backupd.backends.base import Backend
from backupd.catalog import Archive, Catalog, now_utc
from backupd.errors import BackupdError, IntegrityError, StorageNotFound
from backupd.prune import find_orphans
from backupd.transfer import UnpackingReader

log = structlog.get_logger("backupd.verify")

OK, MISSING, CORRUPT, MANIFEST = "ok", "missing", "corrupt", "manifest"
_SMALL_ENTRY_LIMIT = 16 << 20


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

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status != OK]

    @property
    def clean(self) -> bool:
        return not self.problems and not any(self.orphans.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": len(self.findings),
            "ok": sum(f.status == OK for f in self.findings),
            "problems": [f.__dict__ for f in self.problems],
            "orphans": self.orphans,
            "bytes_read": self.bytes_read,
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


def check_structure(tar_stream: Any, what: str) -> None:
    """Walk a checkpoint tar (streaming) and require what every runtime's restore needs."""
    seen: dict[str, bool] = {"config.dump": False, "spec.dump": False, "checkpoint/": False,
                             "checkpoint/inventory.img": False}
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if member.isdir() and name == "checkpoint":
                    seen["checkpoint/"] = True
                elif name in ("config.dump", "spec.dump") and member.isfile():
                    if member.size > _SMALL_ENTRY_LIMIT:
                        raise IntegrityError(f"{what}: {name} is {member.size} bytes, not a checkpoint's metadata")
                    data = tar.extractfile(member)
                    try:
                        json.loads(data.read() if data else b"")
                    except ValueError:
                        raise IntegrityError(f"{what}: {name} is not valid JSON") from None
                    seen[name] = True
                elif name == "checkpoint/inventory.img" and member.isfile():
                    seen[name] = True
            # drain what tarfile left unread so the digest check sees every byte
            while tar_stream.read(1 << 20):
                pass
    except tarfile.TarError as exc:
        raise IntegrityError(f"{what}: not a readable tar ({exc})") from None
    missing = [name for name, present in seen.items() if not present]
    if missing:
        raise IntegrityError(f"{what}: not a checkpoint archive, missing {', '.join(missing)}")


def _verify_stored_only(archive: Archive, stored: Any, what: str) -> tuple[Finding, int]:
    """An encrypted archive without its identity: the stored bytes are all that can be checked."""
    digest, size = hashlib.sha256(), 0
    while chunk := stored.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    if size != archive.stored_size or digest.hexdigest() != archive.stored_sha256:
        return Finding(archive.id, archive.backend, archive.key, CORRUPT,
                       f"{what}: the stored bytes do not match the catalog (size {size} vs {archive.stored_size})"), 0
    return Finding(archive.id, archive.backend, archive.key, OK,
                   "encrypted: stored bytes verified; the tar needs --identity-file"), 0


def verify_archive(archive: Archive, backend: Backend, *, structure: bool = False,
                   identities: Sequence[Any] = ()) -> tuple[Finding, int]:
    what = f"archive {archive.id} ({backend.name}:{archive.key})"
    try:
        manifest = layout.Manifest.from_json(backend.read_bytes(layout.manifest_key(archive.key)), what)
    except StorageNotFound:
        return Finding(archive.id, backend.name, archive.key, MANIFEST, "its manifest is missing"), 0
    except BackupdError as exc:
        return Finding(archive.id, backend.name, archive.key, MANIFEST, str(exc)), 0
    for f in ("tar_sha256", "stored_sha256", "tar_size", "stored_size", "key"):
        if getattr(manifest, f) != getattr(archive, f):
            return Finding(archive.id, backend.name, archive.key, MANIFEST,
                           f"manifest and catalog disagree on {f}"), 0
    try:
        stored = backend.open(archive.key)
    except StorageNotFound:
        return Finding(archive.id, backend.name, archive.key, MISSING, "the object is gone"), 0
    if archive.encryption == "age" and not identities:
        with stored:
            return _verify_stored_only(archive, stored, what)
    try:
        with stored:
            reader = UnpackingReader(stored, what=what, tar_sha256=archive.tar_sha256,
                                     stored_sha256=archive.stored_sha256, tar_size=archive.tar_size,
                                     stored_size=archive.stored_size, encryption=archive.encryption,
                                     identities=identities)
            if structure:
                check_structure(reader, what)
            while reader.read(1 << 20):
                pass
    except IntegrityError as exc:
        return Finding(archive.id, backend.name, archive.key, CORRUPT, str(exc)), reader.tar_size
    return Finding(archive.id, backend.name, archive.key, OK), reader.tar_size


def verify(
    catalog: Catalog,
    backends: dict[str, Backend],
    archives: Sequence[Archive],
    *,
    structure: bool = False,
    orphan_grace: timedelta | None = timedelta(hours=1),
    identities: Sequence[Any] = (),
) -> VerifyReport:
    """Check ``archives``; with ``orphan_grace`` also report orphans in their backends."""
    report = VerifyReport()
    for a in archives:
        backend = backends.get(a.backend)
        if backend is None:
            report.findings.append(Finding(a.id, a.backend, a.key, MISSING, f"backend {a.backend!r} is not configured"))
            continue
        finding, read = verify_archive(a, backend, structure=structure, identities=identities)
        report.findings.append(finding)
        report.bytes_read += read
        if finding.status != OK:
            log.error("archive_verify_failed", archive_id=a.id, status=finding.status, detail=finding.detail)
    if orphan_grace is not None:
        for name in sorted({a.backend for a in archives} & backends.keys()):
            found = find_orphans(catalog, backends[name], grace=orphan_grace, now=now_utc())
            report.orphans[name] = found.orphans
    return report
