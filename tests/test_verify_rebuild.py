"""Self-describing storage on S3 and the filesystem: restore without backupd, catalog rebuild
from manifests, verify and scheduled restore drills (issue 3)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from backupd.cli import cli
from backupd.model import COMMITTED
from backupd.policy.document import parse_policies
from backupd.storage import layout
from backupd.storage.rebuild import rebuild
from backupd.storage.transfer import PackingReader
from backupd.storage.verify import CORRUPT, MANIFEST, MISSING, OK, choose_sample, verify
from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION


def policy_doc(name: str, backend: str, extra: str = "") -> str:
    return (f"apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  selector: {{namespaces: [default], matchLabels: {{app: web}}}}\n  schedule: '@hourly'\n"
            f"  backend: {backend}\n  retention: {{keepLast: 10}}\n  keepOnNode: 10\n{extra}")


def take(app, backend: str = "s3", cycles: int = 1, extra: str = ""):  # type: ignore[no-untyped-def]
    (p,) = parse_policies(policy_doc("web", backend, extra), "p.yaml", backends=[b.name for b in app.config.backends])
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    for _ in range(cycles):
        assert not app.runner.cycle(p).failed
    return p


def aws(moto_endpoint: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    return subprocess.run(["aws", "--endpoint-url", moto_endpoint, *args], capture_output=True, env=env, timeout=120)


def test_an_s3_archive_restores_with_aws_cli_and_zstd_alone(s3_app_factory, sim, moto_endpoint, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("aws") is None or shutil.which("zstd") is None:
        pytest.skip("needs the AWS CLI (pip install awscli) and zstd (apt-get install zstd)")
    app = s3_app_factory()
    take(app)
    for a in app.catalog.list_archives():
        fetched = aws(moto_endpoint, "s3", "cp", f"s3://{s3_bucket}/prod/{a.key}", "-")
        assert fetched.returncode == 0, fetched.stderr
        tar = subprocess.run(["zstd", "-d", "-c"], input=fetched.stdout, capture_output=True, check=True).stdout
        assert tar == (sim.checkpoint_dir / a.node_path).read_bytes()
        manifest = aws(moto_endpoint, "s3", "cp", f"s3://{s3_bucket}/prod/{layout.manifest_key(a.key)}", "-")
        assert json.loads(manifest.stdout)["tar_sha256"] == a.tar_sha256


def archive_view(archives: list[dict]) -> set[tuple]:
    fields = ("id", "key", "backend", "namespace", "pod", "workload", "container", "policy", "tar_size",
              "stored_size", "tar_sha256", "stored_sha256", "state", "node")
    return {tuple(a[f] for f in fields) for a in archives}


def test_deleted_catalog_is_rebuilt_from_manifests(s3_app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = s3_app_factory()
    take(app, "s3", cycles=2)
    take(app, "local")
    before = [a.to_json() for a in app.catalog.list_archives()]
    assert len(before) == 6
    app.catalog.close()
    os.remove(tmp_path / "catalog.db")
    # the operator's path: a new empty catalog, `catalog rebuild`, `list --output json`
    s3 = app.config.backend("s3")
    cfg = tmp_path / "rebuild.toml"
    cfg.write_text(
        f'[database]\nurl = "{app.config.database.url}"\n[kubelet]\nurl = "{app.config.kubelet.url}"\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
        f'[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "{s3.bucket}"\nprefix = "prod"\n'
        f'endpoint_url = "{s3.endpoint_url}"\nregion = "{s3.region}"\naddressing_style = "path"\n'
        f'access_key_id = "{FAKE_ACCESS_KEY}"\nsecret_access_key = "{FAKE_SECRET}"\n'
    )
    run = lambda *args: CliRunner().invoke(cli, ["--config", str(cfg), *args])  # noqa: E731
    assert run("db", "upgrade").exit_code == 0
    assert json.loads(run("list", "-o", "json").stdout) == []
    rebuilt = run("catalog", "rebuild", "-o", "json")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert [len(r["added"]) for r in json.loads(rebuilt.stdout)] == [2, 4]
    after = json.loads(run("list", "-o", "json").stdout)
    assert archive_view(after) == archive_view(before)
    # idempotent: a second rebuild adds nothing and agrees with everything
    again = json.loads(run("catalog", "rebuild", "--backend", "s3", "-o", "json").stdout)
    assert again == [{"backend": "s3", "added": [], "agreeing": 4, "disagreeing": [], "bad_manifests": [],
                      "key_disagreements": [], "duplicate_ids": [], "orphans": [], "missing": []}]


def test_rebuild_reports_disagreements_orphans_and_missing(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    take(app, "local", cycles=2)
    a, b, c, _d = app.catalog.list_archives()
    backend = app.backends["local"]
    app.catalog.update_archive(a.id, tar_sha256="0" * 64)                  # catalog disagrees
    backend.delete(layout.manifest_key(b.key))                             # b becomes an orphan
    backend.delete(layout.manifest_key(c.key))
    backend.delete(c.key)                                                  # c is gone entirely
    report = rebuild(app.catalog, backend)
    assert report.added == []
    assert report.disagreeing == [{"id": a.id, "field": "tar_sha256", "catalog": "0" * 64, "manifest": a.tar_sha256}]
    assert report.orphans == [b.key]
    assert sorted(report.missing) == sorted([b.id, c.id])
    assert app.catalog.get_archive(a.id).tar_sha256 == "0" * 64  # reported, never "fixed"


def test_verify_detects_bit_flips_truncation_and_missing_objects(s3_app_factory, s3_admin, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    app = s3_app_factory()
    take(app, "s3", cycles=3)
    archives = app.catalog.list_archives()
    assert len(archives) == 6
    clean = verify(app.catalog, app.backends, archives, structure=True)
    assert clean.clean and clean.bytes_read == sum(a.tar_size for a in archives)
    flipped, truncated, gone, no_manifest = archives[:4]
    body = s3_admin.get_object(Bucket=s3_bucket, Key=f"prod/{flipped.key}")["Body"].read()
    corrupted = bytearray(body)
    corrupted[len(body) // 2] ^= 0x10
    s3_admin.put_object(Bucket=s3_bucket, Key=f"prod/{flipped.key}", Body=bytes(corrupted))
    s3_admin.put_object(Bucket=s3_bucket, Key=f"prod/{truncated.key}", Body=body[: len(body) // 3])
    s3_admin.delete_object(Bucket=s3_bucket, Key=f"prod/{gone.key}")
    s3_admin.delete_object(Bucket=s3_bucket, Key=f"prod/{layout.manifest_key(no_manifest.key)}")
    report = verify(app.catalog, app.backends, archives, orphan_grace=None)
    status = {f.archive_id: f.status for f in report.findings}
    assert status[flipped.id] == CORRUPT and status[truncated.id] == CORRUPT
    assert status[gone.id] == MISSING and status[no_manifest.id] == MANIFEST
    damaged = {flipped.id, truncated.id, gone.id, no_manifest.id}
    assert [s for aid, s in status.items() if aid not in damaged] == [OK, OK]
    assert flipped.id in next(f.detail for f in report.findings if f.archive_id == flipped.id)
    with_orphans = verify(app.catalog, app.backends, archives[:1], orphan_grace=__import__("datetime").timedelta(0))
    assert with_orphans.orphans == {"s3": [no_manifest.key]}


def test_verify_cli_exit_codes(app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    take(app, "local")
    cfg = tmp_path / "c.toml"
    k = app.config.kubelet
    cfg.write_text(f'[database]\nurl = "{app.config.database.url}"\n[kubelet]\nurl = "{k.url}"\n'
                   f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n')
    ok = CliRunner().invoke(cli, ["--config", str(cfg), "verify", "-o", "json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["ok"] == 2
    victim = app.catalog.list_archives()[0]
    path = tmp_path / "backend" / victim.key
    path.write_bytes(path.read_bytes()[:-10])
    bad = CliRunner().invoke(cli, ["--config", str(cfg), "verify", "-o", "json"])
    assert bad.exit_code != 0 and getattr(bad.exception, "exit_code", None) == 7
    assert json.loads(bad.stdout)["problems"][0]["archive_id"] == victim.id


def test_sample_always_includes_each_policys_newest(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    take(app, "local", cycles=3)
    archives = app.catalog.list_archives()
    newest = max(archives, key=lambda a: a.checkpoint_time)
    for _ in range(10):
        chosen = choose_sample(archives, 2)
        assert len(chosen) == 2 and newest in chosen


def test_restore_drills_run_on_schedule_and_record_results(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    p = take(app, "local", cycles=2, extra="  verify: {schedule: '@every 1h', sample: 2}\n")
    report = app.drill(p)
    assert report.clean and len(report.findings) == 2
    (run,) = app.catalog.list_runs(kind="verify")
    assert run.outcome == "succeeded" and run.bytes_in > 0
    # a structurally wrong archive (a valid tar, digests right, but not a checkpoint) fails the drill
    victim = app.catalog.list_archives()[-1]
    fake = io.BytesIO()
    with tarfile.open(fileobj=fake, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    reader = PackingReader(io.BytesIO(fake.getvalue()))
    backend = app.backends["local"]
    backend.delete(victim.key)
    backend.put(victim.key, reader)
    app.catalog.update_archive(victim.id, tar_sha256=reader.tar_sha256, stored_sha256=reader.stored_sha256,
                               tar_size=reader.tar_size, stored_size=reader.stored_size)
    manifest = layout.read_manifest(backend, layout.manifest_key(victim.key))
    backend.delete(layout.manifest_key(victim.key))
    backend.put_bytes(layout.manifest_key(victim.key), layout.Manifest(**{
        **manifest.model_dump(), "tar_sha256": reader.tar_sha256, "stored_sha256": reader.stored_sha256,
        "tar_size": reader.tar_size, "stored_size": reader.stored_size}).to_json())
    failed = app.drill(p)
    assert not failed.clean
    assert "not a checkpoint archive" in failed.problems[0].detail
    latest = app.catalog.list_runs(kind="verify")[0]
    assert latest.outcome == "failed" and victim.id in latest.error and latest.error_kind == "IntegrityError"
    # the daemon schedules the drill beside the policy's checkpoints
    daemon = app.daemon(policy_poll_seconds=0.1)
    daemon.start()
    try:
        assert {"web", "verify/web"} <= {j.id for j in daemon.scheduler.get_jobs()}
    finally:
        daemon.stop(5)
    assert all(a.state == COMMITTED for a in app.catalog.list_archives())
