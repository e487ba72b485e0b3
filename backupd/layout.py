"""Storage layout and manifests. Pure: names and JSON, no IO.

Every backend stores, under its own prefix::

    <namespace>/<workload>/<container>/<UTC yyyymmddThhmmssZ>-<archive id>.tar.zst
    <namespace>/<workload>/<container>/<UTC yyyymmddThhmmssZ>-<archive id>.json

The object is written first, the manifest after it. **The manifest's presence is what makes an
archive exist**: an object without a manifest is an orphan (an interrupted commit), and
``catalog rebuild`` recreates the catalog from manifests alone. Objects are plain standard
formats (zstd frames, optionally age) so a restore works without backupd.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from backupd.errors import IntegrityError
from backupd.workload import recorded_replica

FORMAT_VERSION = 1
ARCHIVE_SUFFIXES = (".tar.zst", ".tar.zst.age")
MANIFEST_SUFFIX = ".json"
_KEY_RE = re.compile(
    r"^(?P<namespace>[a-z0-9][-a-z0-9]*)/(?P<workload>[a-z]+-[^/]+)/(?P<container>[a-z0-9][-a-z0-9]*)/"
    r"(?P<stamp>\d{8}T\d{6}Z)-(?P<id>[0-9a-f]{16})(?P<suffix>\.tar\.zst(?:\.age)?|\.json)$"
)


def new_archive_id() -> str:
    return secrets.token_hex(8)


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def archive_key(
    namespace: str, workload_segment: str, container: str, checkpoint_time: datetime, archive_id: str,
    *, encrypted: bool = False,
) -> str:
    suffix = ARCHIVE_SUFFIXES[1] if encrypted else ARCHIVE_SUFFIXES[0]
    return f"{namespace}/{workload_segment}/{container}/{_stamp(checkpoint_time)}-{archive_id}{suffix}"


def manifest_key(key: str) -> str:
    for suffix in ARCHIVE_SUFFIXES[::-1]:
        if key.endswith(suffix):
            return key[: -len(suffix)] + MANIFEST_SUFFIX
    raise ValueError(f"not an archive key: {key!r}")


@dataclass(frozen=True)
class ParsedKey:
    namespace: str
    workload_segment: str
    container: str
    stamp: str
    archive_id: str
    is_manifest: bool


def parse_key(key: str) -> ParsedKey | None:
    """Recognise a layout key; ``None`` for anything else (foreign objects are left alone)."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    return ParsedKey(
        m["namespace"], m["workload"], m["container"], m["stamp"], m["id"], m["suffix"] == MANIFEST_SUFFIX
    )


@dataclass(frozen=True)
class Manifest:
    """What a backend knows about an archive without the catalog."""

    archive_id: str
    key: str
    node: str
    namespace: str
    pod: str
    workload: str
    container: str
    image: str
    checkpoint_time: datetime
    tar_size: int
    stored_size: int
    tar_sha256: str
    stored_sha256: str
    compression: str
    encryption: str
    policy: str
    backupd_version: str
    format_version: int = FORMAT_VERSION
    #: the pod's labels when it was checkpointed (restores recreate them); absent in old manifests
    labels: dict[str, str] = field(default_factory=dict)
    #: the pod's replica identity (backupd.workload.replica_of); derived when absent (old manifests)
    replica: str = ""

    def to_json(self) -> bytes:
        d = asdict(self)
        d["checkpoint_time"] = self.checkpoint_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            d: dict[str, Any] = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            version = d.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"unsupported format_version {version!r}")
            known = {f.name for f in fields(cls)}
            d = {k: v for k, v in d.items() if k in known}
            if "replica" not in d:
                d["replica"] = recorded_replica(*(str(d.get(k, "")) for k in ("workload", "pod", "node")))
            d["checkpoint_time"] = datetime.fromisoformat(d["checkpoint_time"])
            if not isinstance(d.get("labels", {}), dict):
                raise ValueError("labels must be an object")
            m = cls(**d)
            for name in ("tar_size", "stored_size", "format_version"):
                if not isinstance(getattr(m, name), int) or getattr(m, name) < 0:
                    raise ValueError(f"{name} must be a non-negative integer")
            for name in ("tar_sha256", "stored_sha256"):
                if not re.fullmatch(r"[0-9a-f]{64}", getattr(m, name)):
                    raise ValueError(f"{name} is not a SHA-256 hex digest")
            return m
        except (ValueError, TypeError, KeyError) as exc:
            raise IntegrityError(f"manifest {where} is not valid: {exc}") from None
