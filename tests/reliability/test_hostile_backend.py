"""A backend someone else can write to (issue 13): what lands in the bucket is not trusted.

Each test runs on the filesystem backend and on moto's S3 over HTTP, with the real catalog
(SQLite, and PostgreSQL when ``BACKUPD_TEST_DATABASE_URL`` is set), the commands run through
the real entry point. RELIABILITY.md, "Trust model of the backend", says what these prove.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

from backupd.app import App
from backupd.backends.base import Backend
from backupd.config import load_config
from backupd.model import Workload
from backupd.simulator.server import NodeSimulator
from backupd.storage import layout
from backupd.storage.rebuild import archive_from_manifest, rebuild
from backupd.storage.transfer import PackingReader
from backupd.storage.verify import CORRUPT, OK, verify
from tests.inspect.archives import Crafted, crafted_tar, minimal_members
from tests.policies import apply, web_policy
from tests.reliability.inprocess import run_cli
from tests.restore.conftest import write_config
from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION


@dataclass
class Bucket:
    """An App and its config file on both backends; ``name`` is the backend under attack."""

    app: App
    config: Path
    name: str
    tmp_path: Path
    sim: NodeSimulator

    @property
    def backend(self) -> Backend:
        return self.app.backends[self.name]

    def cli(self, *args: str) -> tuple[int, str, str]:
        return run_cli(self.config, *args)

    def take(self, retention: str = "{keepLast: 2}") -> list[Any]:
        """One cycle of the web policy (two nginx pods of deployment/web): the real archives."""
        policy = apply(self.app, web_policy(backend=self.name, retention=retention, keep_on_node=10))
        assert not self.app.runner.cycle(policy).failed
        return self.app.catalog.list_archives()

    def keys(self) -> dict[str, int]:
        return {info.key: info.size for info in self.backend.list("")}


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path, sim: NodeSimulator, moto_endpoint: str, s3_bucket: str,
           db_url: str) -> Iterator[Bucket]:  # fmt: skip
    s3 = {"name": "s3", "type": "s3", "bucket": s3_bucket, "prefix": "prod", "endpoint_url": moto_endpoint,
          "region": REGION, "addressing_style": "path", "access_key_id": FAKE_ACCESS_KEY,
          "secret_access_key": FAKE_SECRET}  # fmt: skip
    config = write_config(tmp_path / "config.toml", tmp_path, sim, s3=s3, db_url=db_url)
    app = App(load_config(config))
    app.catalog.upgrade()
    try:
        yield Bucket(app, config, request.param, tmp_path, sim)
    finally:
        app.close()


def packed(tar: bytes) -> tuple[bytes, dict[str, Any]]:
    """``tar`` as backupd stores it, and the sizes and digests a manifest records."""
    reader = PackingReader(io.BytesIO(tar))
    stored = reader.read()
    return stored, {"tar_size": reader.tar_size, "stored_size": reader.stored_size,
                    "tar_sha256": reader.tar_sha256, "stored_sha256": reader.stored_sha256}  # fmt: skip


def manifest_at(at: str, sums: dict[str, Any], **fields: Any) -> layout.Manifest:
    """A manifest that agrees with the archive key ``at`` unless ``fields`` say otherwise."""
    parsed = layout.parse_key(at)
    assert parsed is not None
    base: dict[str, Any] = {
        "archive_id": parsed.archive_id, "key": at, "node": "sim-node", "namespace": parsed.namespace,
        "pod": "planted", "workload": str(Workload.parse(parsed.workload_segment)), "container": parsed.container,
        "image": "registry.example/evil:1", "policy": "web", "backupd_version": "planted", "format_version": 1,
        "checkpoint_time": datetime.strptime(parsed.stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC),
        "compression": "zstd", "encryption": "none", **sums,
    }  # fmt: skip
    return layout.Manifest(**{**base, **fields})


def plant(backend: Backend, at: str, stored: bytes, manifest: layout.Manifest | bytes) -> None:
    """What someone with write access to the bucket can do: put an object and a manifest."""
    backend.put(at, io.BytesIO(stored))
    backend.put_bytes(layout.manifest_key(at), manifest if isinstance(manifest, bytes) else manifest.to_json())


@contextlib.contextmanager
def lost_catalog(bucket: Bucket, tmp_path: Path) -> Iterator[App]:
    """An App on the same backends with a new, empty catalog (SQLite): the catalog was lost."""
    fresh = App(load_config(write_config(tmp_path / "fresh.toml", tmp_path / "fresh", bucket.sim,
                                         db_url=f"sqlite:///{tmp_path / 'fresh.db'}")))  # fmt: skip
    fresh.catalog.upgrade()
    try:
        yield fresh
    finally:
        fresh.close()


# -- catalog rebuild ------------------------------------------------------------------------------


def test_a_manifest_planted_under_a_foreign_prefix_never_speaks_for_another_workload(bucket: Bucket) -> None:
    """The attack: objects under ``evil/`` whose manifests claim to be the newest archive of
    default/deployment-web/nginx. Before, ``catalog rebuild`` catalogued them: ``restore
    --latest`` returned the planted tar and ``prune`` (keepLast: 2) deleted a real archive."""
    real = bucket.take()
    assert len(real) == 2
    newest = max(real, key=lambda a: (a.checkpoint_time, a.id))
    stored, sums = packed(crafted_tar(minimal_members(comm="evil")))
    later = newest.checkpoint_time + timedelta(days=1)
    claims = {"namespace": "default", "workload": "deployment/web", "container": "nginx", "policy": "web"}
    # its own key right, the workload it claims wrong
    at_own = layout.archive_key("evil", "deployment-evil", "sidecar", later, "e" * 16)
    plant(bucket.backend, at_own, stored, manifest_at(at_own, sums, **claims))
    # and one claiming an object under the real prefix
    at_real = layout.archive_key("evil", "pod-x", "x", later, "f" * 16)
    claimed = layout.archive_key("default", "deployment-web", "nginx", later, "f" * 16)
    plant(bucket.backend, at_real, stored, manifest_at(at_real, sums, key=claimed, **claims))
    before = bucket.keys()

    code, out, err = bucket.cli("catalog", "rebuild", "--backend", bucket.name, "-o", "json")
    assert code == 0, err  # the report says what was refused; rebuild's exit code is unchanged
    (report,) = json.loads(out)
    assert (report["added"], report["agreeing"], report["bad_manifests"]) == ([], 2, [])
    said = {(d["key"], d["field"]): (d["in_key"], d["in_manifest"]) for d in report["key_disagreements"]}
    assert said == {
        (layout.manifest_key(at_own), "namespace"): ("evil", "default"),
        (layout.manifest_key(at_own), "workload"): ("deployment-evil", "deployment-web"),
        (layout.manifest_key(at_own), "container"): ("sidecar", "nginx"),
        (layout.manifest_key(at_real), "key"): (at_real, claimed),
        (layout.manifest_key(at_real), "namespace"): ("evil", "default"),
        (layout.manifest_key(at_real), "workload"): ("pod-x", "deployment-web"),
        (layout.manifest_key(at_real), "container"): ("x", "nginx"),
    }
    assert {a.id for a in bucket.app.catalog.list_archives(states=())} == {a.id for a in real}
    code, out, err = bucket.cli("catalog", "rebuild", "--backend", bucket.name)
    assert code == 0 and f"disagrees with its key: {layout.manifest_key(at_own)}: namespace is 'evil'" in out, out

    code, out, err = bucket.cli("prune", "-o", "json")
    assert code == 0, err
    assert [(r["remove"], r["deleted"]) for r in json.loads(out)] == [([], [])]
    assert bucket.keys() == before  # nothing real deleted, nothing planted touched

    dest = bucket.tmp_path / "latest.tar"
    code, out, err = bucket.cli("restore", "--latest", "--namespace", "default", "--workload", "deployment/web",
                                "--container", "nginx", "--to", str(dest), "-o", "json")
    assert code == 0, err
    assert json.loads(out)["archive"]["id"] == newest.id
    assert dest.read_bytes() == (bucket.sim.checkpoint_dir / newest.node_path).read_bytes()


BAD_MANIFESTS: dict[str, tuple[Any, str]] = {
    "naive time": ({"checkpoint_time": "2026-05-01T10:00:00"}, "checkpoint_time: must be an RFC 3339 time"),
    "huge int": ({"tar_size": 2**64}, "tar_size: Input should be less than 9223372036854775808"),
    "huge int, 5000 digits": (b'{"tar_size": ' + b"9" * 5000 + b"}", "Invalid JSON"),
    "bool for an int": ({"stored_size": True}, "stored_size: Input should be a valid integer"),
    "string for an int": ({"tar_size": "12"}, "tar_size: Input should be a valid integer"),
    "not JSON": (b"\x28\xb5\x2f\xfd garbage", "Invalid JSON"),
    "a JSON array": (b"[]", "Input should be an object"),
    "50 MiB of JSON": (None, f"over the {layout.MAX_MANIFEST_BYTES}-byte limit"),
}


@pytest.mark.timeout(120)
def test_each_malformed_manifest_is_reported_and_skipped_while_good_ones_are_added(
    bucket: Bucket, tmp_path: Path
) -> None:
    real = bucket.take()
    stored, sums = packed(crafted_tar(minimal_members()))
    planted: dict[str, str] = {}
    for n, (what, (change, _)) in enumerate(BAD_MANIFESTS.items()):
        at = layout.archive_key("default", "deployment-web", "nginx", datetime(2026, 5, 1, 10, 0, n, tzinfo=UTC),
                                f"{n:016x}")  # fmt: skip
        good = json.loads(manifest_at(at, sums).to_json())
        if change is None:
            data = json.dumps({**good, "padding": "x" * (50 << 20)}).encode()
        elif isinstance(change, bytes):
            data = change
        else:
            data = json.dumps({**good, **change}).encode()
        plant(bucket.backend, at, stored, data)
        planted[layout.manifest_key(at)] = what
    with lost_catalog(bucket, tmp_path) as fresh:
        for catalog in (fresh.catalog, bucket.app.catalog):
            report = rebuild(catalog, bucket.backend)
            errors = {b["key"]: b["error"] for b in report.bad_manifests}
            assert errors.keys() == planted.keys()
            for key, what in planted.items():
                needle = BAD_MANIFESTS[what][1]
                assert errors[key].startswith(f"manifest {bucket.name}:{key}") and needle in errors[key], (what, key)
            assert report.key_disagreements == [] and report.orphans == [] and report.missing == []
            assert {a.id for a in catalog.list_archives(states=())} == {a.id for a in real}
        assert rebuild(fresh.catalog, bucket.backend).added == []  # nothing more to add


def test_a_duplicated_archive_id_is_catalogued_from_neither_manifest(bucket: Bucket, tmp_path: Path) -> None:
    """A copy of a real archive under another prefix, its manifest made to agree with its new
    key but keeping the archive id: which one is real cannot be told from the bucket."""
    (real, other) = bucket.take()
    original = layout.read_manifest(bucket.backend, layout.manifest_key(real.key))
    copy_at = layout.archive_key("evil", "deployment-web", "nginx", real.checkpoint_time, real.id)
    with bucket.backend.open(real.key) as fh:
        stored = fh.read()
    plant(bucket.backend, copy_at, stored, layout.Manifest(**{**original.model_dump(), "key": copy_at,
                                                              "namespace": "evil"}))  # fmt: skip
    keys = sorted([layout.manifest_key(real.key), layout.manifest_key(copy_at)])

    # the live catalog holds the id at exactly the real key: that one agrees, the copy is refused
    report = rebuild(bucket.app.catalog, bucket.backend)
    assert report.duplicate_ids == [{"id": real.id, "keys": keys}]
    assert (report.added, report.agreeing, report.disagreeing) == ([], 2, [])
    assert bucket.app.catalog.get_archive(real.id).key == real.key

    # a lost catalog: neither is catalogued, both are reported
    with lost_catalog(bucket, tmp_path) as fresh:
        report = rebuild(fresh.catalog, bucket.backend)
        assert report.duplicate_ids == [{"id": real.id, "keys": keys}]
        assert report.added == [other.id]
        assert [a.id for a in fresh.catalog.list_archives(states=())] == [other.id]


# -- one set of member rules: verify, restore and inspect refuse the same members ------------------

HOSTILE = {
    "dot-dot": Crafted("../escape", b"owned\n"),
    "absolute": Crafted("/etc/cron.d/evil", b"* * * * * root sh\n"),
    "symlink": Crafted("checkpoint/pages-9.img", type=tarfile.SYMTYPE, linkname="/etc/shadow"),
    "hardlink": Crafted("spec.dump.bak", type=tarfile.LNKTYPE, linkname="/etc/shadow"),
    "char device": Crafted("tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0),
    "block device": Crafted("sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
    "fifo": Crafted("pipe", type=tarfile.FIFOTYPE),
    "a name twice": Crafted("config.dump", b"{}"),
}
NEEDLES = {"dot-dot": "path traversal", "absolute": "absolute name", "symlink": "is a link (symlink",
           "hardlink": "is a link (hardlink", "char device": "is a character device",
           "block device": "is a block device", "fifo": "is a FIFO", "a name twice": "appears twice"}  # fmt: skip


def catalogued(bucket: Bucket, stored: bytes, sums: dict[str, Any], archive_id: str) -> Any:
    """``stored`` in the bucket with its manifest, and a committed catalog row: an archive whose
    manifest agrees with its key and the catalog (it was hostile when it was taken)."""
    at = layout.archive_key("default", "deployment-web", "nginx", datetime(2026, 5, 2, tzinfo=UTC), archive_id)
    manifest = manifest_at(at, sums)
    plant(bucket.backend, at, stored, manifest)
    archive = archive_from_manifest(manifest, bucket.name)
    bucket.app.catalog.add_archive(archive)
    return archive


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_verify_restore_and_inspect_refuse_each_hostile_member_alike(bucket: Bucket, kind: str) -> None:
    members = minimal_members()
    members.insert(3, HOSTILE[kind])
    archive = catalogued(bucket, *packed(crafted_tar(members)), "0000000000000bad")
    dest = bucket.tmp_path / "out"
    dest.mkdir()

    report = verify(bucket.app.catalog, bucket.app.backends, [archive], structure=True, orphan_grace=None)
    (finding,) = report.findings
    assert finding.status == CORRUPT and NEEDLES[kind] in finding.detail, finding
    messages = {}
    for command in (["verify", "-o", "json"], ["restore", archive.id, "--to", str(dest / "x.tar")],
                    ["inspect", archive.id]):  # fmt: skip
        code, out, err = bucket.cli(*command)
        assert code == 7, (command, code, out, err)
        messages[command[0]] = json.loads(out)["problems"][0]["detail"] if command[0] == "verify" else err
    assert list(dest.iterdir()) == []  # nothing written, not even a temp file
    # the same rule, the same words, whichever command met the member
    rule = finding.detail[finding.detail.index(": member "):]
    assert all(rule in message for message in messages.values()), messages


def test_verify_still_passes_what_the_rules_accept(bucket: Bucket) -> None:
    real = bucket.take()
    report = verify(bucket.app.catalog, bucket.app.backends, real, structure=True, orphan_grace=None)
    assert [f.status for f in report.findings] == [OK, OK]
    code, out, err = bucket.cli("verify", "-o", "json")
    assert code == 0 and json.loads(out)["bytes_read"] == sum(a.tar_size for a in real), (out, err)


# -- sizes are enforced while reading -------------------------------------------------------------

BOMB_GIB = 16
DECLARED = 1 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """16 GiB of zeros, compressed in streaming mode: 512 KiB of zstd."""
    out = io.BytesIO()
    zeros = bytes(1 << 20)
    with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as writer:
        for _ in range(BOMB_GIB << 10):
            writer.write(zeros)
    return out.getvalue()


# The command in a fresh interpreter that reports its own peak RSS at exit: VmHWM, which starts
# afresh at exec (ru_maxrss would carry the forked test process's).
_MEASURED = ("import re, sys\nfrom backupd.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
             "    hwm = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]\n"
             "    print(f'peak_rss_kib={hwm}', file=sys.stderr)\n")


def measured(bucket: Bucket, *args: str) -> tuple[int, str, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    proc = subprocess.run([sys.executable, "-c", _MEASURED, "--config", str(bucket.config), *args],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    peak = int(proc.stderr.rsplit("peak_rss_kib=", 1)[1])
    return proc.returncode, proc.stdout, proc.stderr, peak


@pytest.mark.timeout(600)  # a regression decompresses and hashes 16 GiB per command (and restore writes it)
def test_a_zstd_bomb_stops_at_its_declared_size(bucket: Bucket, bomb: bytes) -> None:
    """A few hundred KiB that expand to 16 GiB, stored as an archive whose manifest (and
    catalog row) declare a 1 MiB tar: restore, verify, inspect and drills stop at that MiB with
    exit 7, in bounded memory, writing nothing."""
    assert len(bomb) < 1 << 20
    sums = {"tar_size": DECLARED, "tar_sha256": hashlib.sha256(bytes(DECLARED)).hexdigest(),
            "stored_size": len(bomb), "stored_sha256": hashlib.sha256(bomb).hexdigest()}  # fmt: skip
    stopped = f"the tar is longer than its {DECLARED} bytes"
    dest = bucket.tmp_path / "restored"
    dest.mkdir()

    def commands(archive_id: str) -> list[list[str]]:
        return [["restore", archive_id, "--to", str(dest / f"{archive_id}.tar")], ["verify", "-o", "json"],
                ["inspect", archive_id]]  # fmt: skip

    # the yardstick for memory: the same commands on an archive that is fine
    checkpoint = [*minimal_members(), Crafted("checkpoint/inventory.img", b"inventory")]
    good = catalogued(bucket, *packed(crafted_tar(checkpoint)), "000000000000600d")
    yardstick = {}
    for command in commands(good.id):
        code, out, err, yardstick[command[0]] = measured(bucket, *command)
        assert code == 0, (command, out, err[-2000:])
    (dest / f"{good.id}.tar").unlink()

    archive = catalogued(bucket, bomb, sums, "00000000000b0b0b")
    keys = bucket.keys()
    peaks = {}
    for command in commands(archive.id):
        code, out, err, peaks[command[0]] = measured(bucket, *command)
        assert code == 7, (command, out, err[-2000:])
        assert stopped in (out if command[0] == "verify" else err), (command, out, err[-2000:])
    assert list(dest.iterdir()) == [] and bucket.keys() == keys
    # 16 GiB went through none of them: each stayed within 32 MiB of what it took on a good archive
    assert all(peaks[c] < yardstick[c] + (32 << 10) for c in peaks), (yardstick, peaks)

    policy = apply(bucket.app, web_policy(backend=bucket.name, extra="  verify: {schedule: '@daily', sample: 2}\n"))
    drill = bucket.app.drill(policy)
    assert [(f.archive_id, f.status) for f in drill.problems] == [(archive.id, CORRUPT)]
    assert stopped in drill.problems[0].detail
    (run,) = bucket.app.catalog.list_runs(kind="verify")
    assert run.outcome == "failed" and archive.id in (run.error or "")
