"""Storage layout and manifests: names and JSON (pure), and :func:`read_manifest`, the one way a
manifest is read from a backend.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from backupd.errors import ManifestInvalid, ManifestKeyMismatch, validation_problems
from backupd.model import DNS_LABEL, DNS_SUBDOMAIN, KINDS, Archive, Workload, recorded_replica, rfc3339

if TYPE_CHECKING:
    from backupd.backends.base import Backend

FORMAT_VERSION = 1
ARCHIVE_SUFFIXES = (".tar.zst", ".tar.zst.age")
#: the object of a deduplicated archive (``format = "dedup"``) is its recipe; its chunks are in
#: packs under ``dedup/`` (:mod:`backupd.storage.dedup`)
RECIPE_SUFFIXES = (".recipe", ".recipe.age")
OBJECT_SUFFIXES = ARCHIVE_SUFFIXES + RECIPE_SUFFIXES
MANIFEST_SUFFIX = ".json"
#: a manifest is a few KiB (its pod labels are most of it); anything larger is not read
MAX_MANIFEST_BYTES = 1 << 20
_STORED = "stored"  # validation context: a manifest read from a backend
_KEY_RE = re.compile(
    r"^(?P<namespace>[a-z0-9][-a-z0-9]*)/(?P<workload>[a-z]+-[^/]+)/(?P<container>[a-z0-9][-a-z0-9]*)/"
    r"(?P<stamp>\d{8}T\d{6}Z)-(?P<id>[0-9a-f]{16})(?P<suffix>\.tar\.zst(?:\.age)?|\.recipe(?:\.age)?|\.json)$"
)
# RFC 3339 (section 5.6) date-time, with the offset required; what to_json writes is its "Z" form
_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)$")


def new_archive_id() -> str:
    return secrets.token_hex(8)


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def archive_key(
    namespace: str, workload_segment: str, container: str, checkpoint_time: datetime, archive_id: str,
    *, encrypted: bool = False, dedup: bool = False,
) -> str:
    suffix = (RECIPE_SUFFIXES if dedup else ARCHIVE_SUFFIXES)[1 if encrypted else 0]
    return f"{namespace}/{workload_segment}/{container}/{_stamp(checkpoint_time)}-{archive_id}{suffix}"


def is_recipe_key(key: str) -> bool:
    """Whether ``key`` is the object of a deduplicated archive (its recipe)."""
    return key.endswith(RECIPE_SUFFIXES)


def manifest_key(key: str) -> str:
    for suffix in sorted(OBJECT_SUFFIXES, key=len, reverse=True):
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
    suffix: str = ""  # .tar.zst, .tar.zst.age, .recipe, .recipe.age or .json


def parse_key(key: str) -> ParsedKey | None:
    """Recognise a layout key; ``None`` for anything else (foreign objects are left alone)."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    return ParsedKey(
        m["namespace"], m["workload"], m["container"], m["stamp"], m["id"], m["suffix"] == MANIFEST_SUFFIX,
        m["suffix"],
    )


# -- the manifest schema -------------------------------------------------------------------------


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str):
        if not _RFC3339.match(value):
            raise ValueError("must be an RFC 3339 time with its offset, e.g. 2026-01-02T03:04:05Z")
        return datetime.fromisoformat(value.upper())
    return value  # a datetime from Python code; the aware check follows


def _matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"must be {what}")
        return value

    return AfterValidator(check)


def _workload(value: str) -> str:
    kind, slash, name = value.partition("/")
    if not slash or kind not in KINDS or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        raise ValueError(f"must be kind/name with a kind of {', '.join(KINDS)} and a DNS name, e.g. deployment/web")
    return value


def _archive_key(value: str) -> str:
    parsed = parse_key(value)
    if parsed is None or parsed.is_manifest:
        raise ValueError("must be an archive key of the storage layout (<namespace>/<kind>-<name>/<container>/"
                         "<yyyymmddThhmmssZ>-<id>.tar.zst[.age] or .recipe[.age])")
    return value


def _format_version(value: int) -> int:
    if value != FORMAT_VERSION:
        raise ValueError(f"unsupported format_version (this backupd reads {FORMAT_VERSION})")
    return value


#: What a manifest records of its archive: these :class:`~backupd.model.Archive` fields, under
#: the same names and with the same types (never None in a manifest; tests/test_manifest.py
#: checks that they agree), and the archive's ``id`` as ``archive_id``. The catalog's own
#: bookkeeping (state, backend, times of the row, node copy, pin, error) is not the archive's.
ARCHIVE_FACTS = ("key", "node", "namespace", "pod", "workload", "replica", "container", "image", "checkpoint_time",
                 "tar_size", "stored_size", "tar_sha256", "stored_sha256", "compression", "encryption", "policy")

_DnsLabel = Annotated[str, Field(max_length=63), _matching(DNS_LABEL, "a DNS label (a-z, 0-9, '-')")]
_Size = Annotated[int, Field(ge=0, lt=1 << 63)]  # what a signed 64-bit catalog column holds
_Sha256 = Annotated[str, _matching(re.compile(r"^[0-9a-f]{64}$"), "a SHA-256 hex digest (64 of 0-9a-f)")]


class Manifest(BaseModel):
    """What a backend knows about an archive without the catalog: the JSON beside its object.

    A strict schema: every value has its JSON type (``true`` is not an integer, ``"1"`` not a
    size), sizes fit a signed 64-bit column, names are what Kubernetes allows, the time carries
    its offset. Unknown fields are ignored, so a newer backupd's manifests still read.
    :meth:`read` is the only way in from a backend: it also requires the manifest to agree with
    the key it sits beside.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    archive_id: Annotated[str, _matching(re.compile(r"^[0-9a-f]{16}$"), "16 hex digits (0-9a-f)")]
    key: Annotated[str, Field(max_length=1024), AfterValidator(_archive_key)]
    node: Annotated[str, Field(max_length=253)]
    namespace: _DnsLabel
    pod: Annotated[str, Field(max_length=253)]
    workload: Annotated[str, Field(max_length=300), AfterValidator(_workload)]
    container: _DnsLabel
    image: Annotated[str, Field(max_length=1024)]
    checkpoint_time: Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
    tar_size: _Size
    stored_size: _Size
    tar_sha256: _Sha256
    stored_sha256: _Sha256
    compression: Literal["zstd"]
    encryption: Literal["none", "age"]
    policy: _DnsLabel
    backupd_version: Annotated[str, Field(max_length=256)]
    format_version: Annotated[int, AfterValidator(_format_version)]  # required: a future format is not guessed
    #: the pod's labels when it was checkpointed (restores recreate them); absent in old manifests
    labels: dict[str, str] = Field(default_factory=dict)
    #: the pod's replica identity (backupd.model.replica_of); derived when absent (old manifests)
    replica: Annotated[str, Field(max_length=253)] = ""
    #: ``dedup``: ``key`` is a recipe (docs/dedup-format.md); ``stored_sha256`` is the stored
    #: recipe's, ``recipe_size`` its size, ``stored_size`` what the archive added to the backend
    #: (its new packs and its recipe), ``packs`` the ids of the packs its recipe used when written
    format: Literal["full", "dedup"] = "full"
    recipe_size: _Size | None = None
    packs: Annotated[list[_Sha256], Field(max_length=100_000)] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _derive_replica(cls, data: Any, info: ValidationInfo) -> Any:
        # Only for stored manifests (read() passes the context): one written before replicas
        # existed gets the replica the catalog migration derives for its rows.
        if info.context == _STORED and isinstance(data, dict) and "replica" not in data:
            workload, pod, node = (data.get(k) for k in ("workload", "pod", "node"))
            if isinstance(workload, str) and isinstance(pod, str) and isinstance(node, str):
                return {**data, "replica": recorded_replica(workload, pod, node)}
        return data

    @classmethod
    def of(cls, archive: Archive, *, labels: dict[str, str], backupd_version: str, **stored: Any) -> Manifest:
        """The manifest of ``archive`` as it is committed: every one of its :data:`ARCHIVE_FACTS`
        known (sizes and digests included), else :class:`pydantic.ValidationError`. ``stored``:
        the deduplicated format's ``format``, ``recipe_size`` and ``packs``."""
        facts = {name: getattr(archive, name) for name in ARCHIVE_FACTS}
        return cls(archive_id=archive.id, **facts, labels=labels, backupd_version=backupd_version,
                   format_version=FORMAT_VERSION, **stored)

    def archive_facts(self) -> dict[str, Any]:
        """What this manifest says of its archive, as :class:`~backupd.model.Archive` fields
        (``id`` and the :data:`ARCHIVE_FACTS`)."""
        return {"id": self.archive_id, **{name: getattr(self, name) for name in ARCHIVE_FACTS}}

    def to_json(self) -> bytes:
        """Sorted keys, indent 2, times in UTC with ``Z``: byte for byte what backupd always wrote."""
        d = self.model_dump()
        if self.format == "full":  # the fields of the deduplicated format stay out of full manifests
            for name in ("format", "recipe_size", "packs"):
                del d[name]
        d["checkpoint_time"] = rfc3339(self.checkpoint_time)
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def read(cls, data: bytes, manifest_key: str, *, where: str) -> Manifest:
        """The manifest read from ``manifest_key`` (the key inside the backend, its prefix
        stripped), checked against the schema and against that key.

        Raises :class:`ManifestInvalid` (not JSON, over :data:`MAX_MANIFEST_BYTES`, schema) or
        :class:`ManifestKeyMismatch` (the manifest names another object, namespace, workload,
        container, second, archive id or encryption than its key): a manifest planted under one
        prefix can never speak for another. ``where`` names it in messages.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestInvalid(f"manifest {where} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            manifest = cls.model_validate_json(data, context=_STORED)
        except ValidationError as exc:
            problems = validation_problems(exc.errors(include_url=False), f"manifest {where}")
            raise ManifestInvalid("; ".join(problems[:10])) from None
        wrong = manifest.disagreements_with(manifest_key)
        if wrong:
            said = "; ".join(f"{f} is {k!r} in the key, {m!r} in the manifest" for f, k, m in wrong)
            raise ManifestKeyMismatch(f"manifest {where} disagrees with its key: {said}", wrong)
        return manifest

    def disagreements_with(self, manifest_key: str) -> list[tuple[str, str, str]]:
        """(field, what the key says, what the manifest says) for each field the storage key
        ``manifest_key`` encodes and this manifest contradicts."""
        parsed = parse_key(manifest_key)
        if parsed is None or not parsed.is_manifest:
            return [("key", manifest_key, self.key)]
        stem = manifest_key[: -len(MANIFEST_SUFFIX)]
        object_suffix = next((s for s in sorted(OBJECT_SUFFIXES, key=len, reverse=True) if self.key.endswith(s)), "")
        pairs = [
            ("key", stem + (object_suffix or ARCHIVE_SUFFIXES[0]), self.key),
            ("format", "dedup" if object_suffix in RECIPE_SUFFIXES else "full", self.format),
            ("namespace", parsed.namespace, self.namespace),
            ("workload", parsed.workload_segment, Workload.parse(self.workload).segment),
            ("container", parsed.container, self.container),
            ("checkpoint_time", parsed.stamp, _stamp(self.checkpoint_time)),
            ("archive_id", parsed.archive_id, self.archive_id),
            ("encryption", "age" if object_suffix.endswith(".age") else "none", self.encryption),
        ]
        return [(f, k, m) for f, k, m in pairs if k != m]


def read_manifest(backend: Backend, manifest_key: str) -> Manifest:
    """The manifest stored at ``manifest_key`` in ``backend``, through :meth:`Manifest.read`.

    At most :data:`MAX_MANIFEST_BYTES` (plus one, to tell) are read, whatever the object's
    size. Raises :class:`~backupd.errors.StorageNotFound` when it is absent (a storage error
    when unreadable), :class:`ManifestInvalid` or :class:`ManifestKeyMismatch`.
    """
    with backend.open(manifest_key) as stream:
        data = stream.read(MAX_MANIFEST_BYTES + 1)
    return Manifest.read(data, manifest_key, where=f"{backend.name}:{manifest_key}")
