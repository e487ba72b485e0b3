"""Client-side encryption with age: archives leave the node encrypted to the configured
recipients; Debian's `age -d` + `zstd -d` give back the kubelet's tar; backupd restores and
verifies them with an identity file, and without one still checks the stored bytes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pyrage
import pytest

from backupd.errors import ConfigError, InvalidInput
from backupd.policy.document import parse_policies
from backupd.storage import layout
from backupd.storage.read import open_archive
from backupd.storage.transfer import load_identities
from backupd.storage.verify import CORRUPT, OK, verify

POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: web}\n"
          "spec: {selector: {namespaces: [default], matchLabels: {app: web}}, schedule: '@hourly', backend: BACKEND, "
          "retention: {keepLast: 5}, keepOnNode: 5}\n")


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, str]:
    ident = pyrage.x25519.Identity.generate()
    path = tmp_path / "age.key"
    path.write_text(f"# created for a test\n{ident}\n")
    path.chmod(0o600)
    return path, str(ident.to_public())


def encrypted_app(factory, recipient: str, backend: str = "local"):  # type: ignore[no-untyped-def]
    app = factory()
    for b in app.config.backends:
        b.encryption_recipients = [recipient]
    (p,) = parse_policies(POLICY.replace("BACKEND", backend), "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    assert not app.runner.cycle(p).failed
    return app


def test_age_cli_decrypts_what_backupd_stored(app_factory, sim, identity, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("age") is None or shutil.which("zstd") is None:
        pytest.skip("needs Debian's age and zstd (apt-get install age zstd)")
    key, recipient = identity
    app = encrypted_app(app_factory, recipient)
    for a in app.catalog.list_archives():
        assert a.key.endswith(".tar.zst.age") and a.encryption == "age"
        manifest = layout.read_manifest(app.backends["local"], layout.manifest_key(a.key))
        assert manifest.encryption == "age"
        stored = tmp_path / "backend" / a.key
        assert b"config.dump" not in stored.read_bytes()  # nothing readable leaves the node
        tar = subprocess.run(f"age -d -i {key} {stored} | zstd -d", shell=True, capture_output=True, check=True).stdout
        assert tar == (sim.checkpoint_dir / a.node_path).read_bytes()


def test_s3_encrypted_archive_restores_without_backupd(s3_app_factory, sim, identity, moto_endpoint, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    if not all(shutil.which(t) for t in ("age", "zstd", "aws")):
        pytest.skip("needs age, zstd and the AWS CLI")
    from tests.test_verify_rebuild import aws

    key, recipient = identity
    app = encrypted_app(s3_app_factory, recipient, backend="s3")
    a = app.catalog.list_archives()[0]
    fetched = aws(moto_endpoint, "s3", "cp", f"s3://{s3_bucket}/prod/{a.key}", "-")
    assert fetched.returncode == 0
    tar = subprocess.run(f"age -d -i {key} | zstd -d", shell=True, input=fetched.stdout, capture_output=True,
                         check=True).stdout
    assert tar == (sim.checkpoint_dir / a.node_path).read_bytes()


def test_restore_and_verify_with_and_without_the_identity(app_factory, sim, identity, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, recipient = identity
    app = encrypted_app(app_factory, recipient)
    archives = app.catalog.list_archives()
    identities = load_identities(str(key), "--identity-file")
    with open_archive(app.backends, archives[0], identities) as tar:
        original = (sim.checkpoint_dir / archives[0].node_path).read_bytes()
        assert b"".join(iter(lambda: tar.read(1 << 20), b"")) == original
    with pytest.raises(InvalidInput, match="--identity-file"):
        with open_archive(app.backends, archives[0]):
            pass
    full = verify(app.catalog, app.backends, archives, structure=True, identities=identities)
    assert full.clean and full.bytes_read == sum(a.tar_size for a in archives)
    stored_only = verify(app.catalog, app.backends, archives)
    assert stored_only.clean and all("needs --identity-file" in f.detail for f in stored_only.findings)
    victim = tmp_path / "backend" / archives[0].key
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x04
    victim.write_bytes(bytes(data))
    for ids in ([], identities):
        report = verify(app.catalog, app.backends, archives, identities=ids, orphan_grace=None)
        assert [f.status for f in report.findings] == [CORRUPT, OK]
    wrong = pyrage.x25519.Identity.generate()
    report = verify(app.catalog, app.backends, archives[1:], identities=[wrong], orphan_grace=None)
    assert report.findings[0].status == CORRUPT and "No matching keys" in report.findings[0].detail


def test_bad_recipients_and_identity_files_are_clear_errors(tmp_path: Path) -> None:
    from backupd.config import FilesystemBackendConfig

    with pytest.raises(ValueError, match="not an age X25519 recipient"):
        FilesystemBackendConfig(name="x", type="filesystem", path=tmp_path, encryption_recipients=["age1nope"])
    (tmp_path / "bad.key").write_text("AGE-SECRET-KEY-NOT-REALLY\n")
    with pytest.raises(InvalidInput) as info:
        load_identities(str(tmp_path / "bad.key"), "--identity-file")
    assert "AGE-SECRET-KEY-NOT-REALLY" not in str(info.value)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_identities(str(tmp_path / "missing.key"), "--identity-file")
    from backupd.config import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path}"\n'
                   'encryption_recipients = ["AGE-SECRET-KEY-1XYZ"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "backends.0.filesystem.encryption_recipients" in str(err.value)
    assert "AGE-SECRET-KEY-1XYZ" not in str(err.value)  # a pasted identity is not echoed back


def test_inspect_an_encrypted_catalog_archive_with_the_identity(app_factory, identity) -> None:  # type: ignore[no-untyped-def]
    from backupd.storage.read import inspect_catalog_archive

    key, recipient = identity
    app = encrypted_app(app_factory, recipient)
    a = app.catalog.list_archives()[0]
    with pytest.raises(InvalidInput, match="--identity-file"):
        inspect_catalog_archive(a, app.backends["local"])
    seen = inspect_catalog_archive(a, app.backends["local"], identities=load_identities(str(key), "k")).to_json()
    assert seen["container_name"] == "nginx" and seen["engine"] == "CRI-O"
