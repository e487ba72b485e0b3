"""The manifest schema and its agreement with the key it sits beside (issue 13): what backupd
always wrote still reads and is written byte for byte the same; anything else a bucket may hold
is refused naming the field, never half-read, never an overflow further down."""

from __future__ import annotations

import json
import types
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from pydantic import AwareDatetime, ValidationError

from backupd.backends.memory import MemoryBackend
from backupd.errors import ManifestInvalid, ManifestKeyMismatch, StorageNotFound
from backupd.model import COMMITTED, Archive
from backupd.storage import layout
from backupd.storage.rebuild import archive_from_manifest

KEY = "shop/statefulset-db/postgres/20260102T030405Z-0123456789abcdef.tar.zst"
MKEY = layout.manifest_key(KEY)

# What backupd wrote before replicas and before the manifest became a pydantic model (the
# dataclass's to_json), for this manifest: bytes in users' buckets.
WRITTEN_BEFORE = b"""{
  "archive_id": "0123456789abcdef",
  "backupd_version": "0.1.0",
  "checkpoint_time": "2026-01-02T03:04:05.123456Z",
  "compression": "zstd",
  "container": "postgres",
  "encryption": "none",
  "format_version": 1,
  "image": "docker.io/library/postgres:16.4",
  "key": "shop/statefulset-db/postgres/20260102T030405Z-0123456789abcdef.tar.zst",
  "labels": {
    "app": "db",
    "tier": "\\u00e9"
  },
  "namespace": "shop",
  "node": "node-a",
  "pod": "db-0",
  "policy": "db",
  "stored_sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
  "stored_size": 45,
  "tar_sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  "tar_size": 123,
  "workload": "statefulset/db"
}
"""


# ... and what the dataclass wrote once replicas existed: "replica" always present.
WRITTEN_WITH_REPLICA = WRITTEN_BEFORE.replace(b'  "policy": "db",\n', b'  "policy": "db",\n  "replica": "db-0",\n')


def fields(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = json.loads(WRITTEN_BEFORE)
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def manifest_bytes(**changes: Any) -> bytes:
    return json.dumps(fields(**changes)).encode()


def test_what_backupd_always_wrote_reads_and_is_written_byte_for_byte() -> None:
    m = layout.Manifest.read(WRITTEN_WITH_REPLICA, MKEY, where="test")
    assert m.checkpoint_time == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert (m.tar_size, m.labels, m.replica) == (123, {"app": "db", "tier": "é"}, "db-0")
    assert m.to_json() == WRITTEN_WITH_REPLICA
    # built in Python, with the time in another zone, as the pipeline does
    built = layout.Manifest(**{**fields(), "replica": "db-0", "checkpoint_time": datetime(
        2026, 1, 2, 4, 4, 5, 123456, tzinfo=timezone(timedelta(hours=1)))})
    assert built.to_json() == WRITTEN_WITH_REPLICA
    # before replicas: the replica is derived as the catalog migration derives it, then written
    old = layout.Manifest.read(WRITTEN_BEFORE, MKEY, where="t")
    assert old.replica == "db-0" and old.to_json() == WRITTEN_WITH_REPLICA
    # an old manifest without labels, and a newer one with fields this backupd does not know
    assert layout.Manifest.read(manifest_bytes(labels=...), MKEY, where="t").labels == {}
    newer = layout.Manifest.read(manifest_bytes(signature={"alg": "x"}, replica=""), MKEY, where="t")
    assert newer.replica == ""  # written as the whole workload's: kept, not derived
    assert json.loads(newer.to_json())["replica"] == "" and "signature" not in json.loads(newer.to_json())


@pytest.mark.parametrize(("changes", "needle"), [
    ({"checkpoint_time": "2026-01-02T03:04:05"}, "checkpoint_time: must be an RFC 3339 time with its offset"),
    ({"checkpoint_time": "1767323045"}, "checkpoint_time: must be an RFC 3339 time"),
    ({"checkpoint_time": "2026-01-02 03:04:05Z"}, "must be an RFC 3339 time"),
    ({"checkpoint_time": 1767323045}, "checkpoint_time: Input should be a valid datetime (got 1767323045)"),
    ({"tar_size": 2**63}, "tar_size: Input should be less than 9223372036854775808"),
    ({"stored_size": 10**40}, "stored_size: Input should be less than"),
    ({"tar_size": -1}, "tar_size: Input should be greater than or equal to 0"),
    ({"tar_size": True}, "tar_size: Input should be a valid integer"),
    ({"tar_size": 123.0}, "tar_size: Input should be a valid integer"),
    ({"tar_size": "123"}, "tar_size: Input should be a valid integer"),
    ({"format_version": True}, "format_version: Input should be a valid integer"),
    ({"format_version": 2}, "unsupported format_version"),
    ({"format_version": ...}, "format_version: required field is missing"),
    ({"archive_id": "0123456789ABCDEF"}, "archive_id: must be 16 hex digits"),
    ({"namespace": "Shop"}, "namespace: must be a DNS label"),
    ({"namespace": "a" * 64}, "namespace: String should have at most 63 characters"),
    ({"container": "../x"}, "container: must be a DNS label"),
    ({"workload": "widget/db"}, "workload: must be kind/name"),
    ({"workload": "statefulset-db"}, "workload: must be kind/name"),
    ({"policy": "x" * 64}, "policy: String should have at most 63 characters"),
    ({"pod": "p" * 254}, "pod: String should have at most 253 characters"),
    ({"replica": "r" * 254}, "replica: String should have at most 253 characters"),
    ({"tar_sha256": "A" * 64}, "tar_sha256: must be a SHA-256 hex digest"),
    ({"compression": "gzip"}, "compression: Input should be 'zstd'"),
    ({"encryption": "rot13"}, "encryption: Input should be 'none' or 'age'"),
    ({"labels": {"app": 1}}, "labels.app: Input should be a valid string"),
    ({"labels": ["app"]}, "labels: Input should be an object"),
    ({"key": "../../etc/passwd"}, "key: must be an archive key of the storage layout"),
    ({"key": MKEY}, "key: must be an archive key"),
    ({"node": ...}, "node: required field is missing"),
    ({"image": None}, "image: Input should be a valid string"),
], ids=lambda v: str(v)[:60])  # fmt: skip
def test_the_schema_refuses_naming_the_field_and_value(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ManifestInvalid) as exc:
        layout.Manifest.read(manifest_bytes(**changes), MKEY, where="s3:m.json")
    assert str(exc.value).startswith("manifest s3:m.json: ") and needle in str(exc.value), exc.value
    assert exc.value.exit_code == 7


@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]", b"null", b'{"a": ' * 10_000, b"\xff\xfe{}",
                                  WRITTEN_BEFORE.replace(b'"tar_size": 123', b'"tar_size": ' + b"9" * 5000)],
                         ids=["empty", "text", "array", "null", "deep", "not utf-8", "5000 digits"])  # fmt: skip
def test_what_is_not_a_json_object_is_refused(data: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="^manifest m: "):
        layout.Manifest.read(data, MKEY, where="m")


def test_a_manifest_over_the_size_limit_is_not_read() -> None:
    big = manifest_bytes(labels={f"k{i}": "v" * 1000 for i in range(1100)})
    assert len(big) > layout.MAX_MANIFEST_BYTES
    with pytest.raises(ManifestInvalid, match=f"over the {layout.MAX_MANIFEST_BYTES}-byte limit"):
        layout.Manifest.read(big, MKEY, where="m")
    backend = MemoryBackend()
    backend.put_bytes(MKEY, big + b" " * (50 << 20))  # 50 MiB: read_manifest reads 1 MiB of it
    with pytest.raises(ManifestInvalid, match="over the"):
        layout.read_manifest(backend, MKEY)
    with pytest.raises(StorageNotFound):
        layout.read_manifest(backend, "shop/statefulset-db/postgres/20260102T030405Z-00000000000000ff.json")


ELSEWHERE = "evil/deployment-x/sidecar/20270101T000000Z-ffffffffffffffff.json"


@pytest.mark.parametrize(("mkey", "expected"), [
    ("shop/statefulset-db/postgres/20260102T030405Z-0123456789abcdef.json", []),
    ("evil/statefulset-db/postgres/20260102T030405Z-0123456789abcdef.json",
     [("key", "evil/statefulset-db/postgres/20260102T030405Z-0123456789abcdef.tar.zst", KEY),
      ("namespace", "evil", "shop")]),
    ("shop/deployment-db/postgres/20260102T030405Z-0123456789abcdef.json",
     [("key", "shop/deployment-db/postgres/20260102T030405Z-0123456789abcdef.tar.zst", KEY),
      ("workload", "deployment-db", "statefulset-db")]),
    ("shop/statefulset-db/sidecar/20260102T030405Z-0123456789abcdef.json",
     [("key", "shop/statefulset-db/sidecar/20260102T030405Z-0123456789abcdef.tar.zst", KEY),
      ("container", "sidecar", "postgres")]),
    ("shop/statefulset-db/postgres/20260102T030406Z-0123456789abcdef.json",
     [("key", "shop/statefulset-db/postgres/20260102T030406Z-0123456789abcdef.tar.zst", KEY),
      ("checkpoint_time", "20260102T030406Z", "20260102T030405Z")]),
    ("shop/statefulset-db/postgres/20260102T030405Z-00000000000000ff.json",
     [("key", "shop/statefulset-db/postgres/20260102T030405Z-00000000000000ff.tar.zst", KEY),
      ("archive_id", "00000000000000ff", "0123456789abcdef")]),
    ("not/a/layout/key.json", [("key", "not/a/layout/key.json", KEY)]),
], ids=["agrees", "namespace", "workload", "container", "second", "archive id", "foreign key"])  # fmt: skip
def test_every_field_the_key_encodes_must_agree_with_it(mkey: str, expected: list[tuple[str, str, str]]) -> None:
    if not expected:
        assert layout.Manifest.read(WRITTEN_BEFORE, mkey, where="m").key == KEY
        return
    with pytest.raises(ManifestKeyMismatch) as exc:
        layout.Manifest.read(WRITTEN_BEFORE, mkey, where="m")
    assert exc.value.disagreements == expected
    assert exc.value.exit_code == 7 and f"{expected[0][0]} is {expected[0][1]!r} in the key" in str(exc.value)


def test_a_planted_manifest_that_names_the_key_it_sits_at_still_disagrees() -> None:
    """The attack: under a foreign prefix, a manifest whose own ``key`` is right but whose
    namespace, workload, container and time claim another workload's newest archive."""
    planted = ELSEWHERE.removesuffix(".json") + ".tar.zst"
    with pytest.raises(ManifestKeyMismatch) as exc:
        layout.Manifest.read(manifest_bytes(key=planted, checkpoint_time="2027-01-01T00:00:00Z",
                                            archive_id="ffffffffffffffff"), ELSEWHERE, where="m")
    assert [f for f, _, _ in exc.value.disagreements] == ["namespace", "workload", "container"]


def test_encryption_must_agree_with_the_object_suffix() -> None:
    age_key = KEY + ".age"
    for key, encryption, wrong in ((KEY, "age", ("encryption", "none", "age")),
                                   (age_key, "none", ("encryption", "age", "none"))):  # fmt: skip
        with pytest.raises(ManifestKeyMismatch) as exc:
            layout.Manifest.read(manifest_bytes(key=key, encryption=encryption), MKEY, where="m")
        assert exc.value.disagreements == [wrong]
    assert layout.Manifest.read(manifest_bytes(key=age_key, encryption="age"), MKEY, where="m").encryption == "age"


# -- the manifest and the archive: one set of facts -----------------------------------------------


def _narrows(manifest_type: Any, archive_type: Any) -> bool:
    """True when a manifest field of ``manifest_type`` holds values of ``archive_type``: the
    same type, a Literal of its values, or an aware datetime for a datetime."""
    if get_origin(archive_type) in (Union, types.UnionType):  # Optional in the catalog, never in a manifest
        archive_type, = (t for t in get_args(archive_type) if t is not type(None))
    if get_origin(manifest_type) is Literal:
        return all(isinstance(value, archive_type) for value in get_args(manifest_type))
    return manifest_type is archive_type or (manifest_type is AwareDatetime and archive_type is datetime)


def test_the_manifest_records_the_archives_facts_under_their_names_and_types() -> None:
    archive_types = get_type_hints(Archive)
    for name in layout.ARCHIVE_FACTS:
        assert name in archive_types, f"{name} is no Archive field"
        assert _narrows(layout.Manifest.model_fields[name].annotation, archive_types[name]), name
    assert _narrows(layout.Manifest.model_fields["archive_id"].annotation, archive_types["id"])
    # every other manifest field is the manifest's own, not a fact of the archive's under another name
    own = set(layout.Manifest.model_fields) - set(layout.ARCHIVE_FACTS) - {"archive_id"}
    # (the deduplicated format's: how its object, the recipe, is read back -- no catalog column)
    assert own == {"backupd_version", "format_version", "labels", "format", "recipe_size", "packs"}


def test_a_manifest_is_made_of_its_archive_and_gives_it_back() -> None:
    written = layout.Manifest.read(WRITTEN_WITH_REPLICA, MKEY, where="test")
    archive = archive_from_manifest(written, "b")
    assert (archive.id, archive.state, archive.backend, archive.replica) == ("0123456789abcdef", COMMITTED, "b", "db-0")
    again = layout.Manifest.of(archive, labels=written.labels, backupd_version=written.backupd_version)
    assert again.to_json() == WRITTEN_WITH_REPLICA
    # an archive not yet shipped has no sizes or digests: it has no manifest yet
    with pytest.raises(ValidationError, match="tar_size"):
        layout.Manifest.of(replace(archive, tar_size=None), labels={}, backupd_version="0.1.0")
