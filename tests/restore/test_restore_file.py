"""``backupd restore ID --to FILE``: archives come back byte-identical and verified, a corrupted
object leaves nothing behind, ``--latest`` picks the newest archive, bad input exits 2."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from backupd.model import FAILED
from backupd.storage import layout

from .conftest import Rig


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_restore_to_file_is_the_byte_identical_kubelet_tar(rig: Rig, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "web.tar"
    out, _ = rig.run("restore", archive.id[:8], "--to", str(dest), capsys=capsys)
    assert f"restored archive {archive.id}" in out and "verified" in out
    assert dest.read_bytes() == rig.node_tar(archive).read_bytes()
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == archive.tar_sha256
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert _leftovers(out_dir) == []

    # create-only unless --force; --force replaces atomically
    _, err = rig.run("restore", archive.id, "--to", str(dest), code=2, capsys=capsys)
    assert str(dest) in err and "--force" in err
    dest.write_bytes(b"old")
    out, _ = rig.run("restore", archive.id, "--to", str(dest), "--force", "-o", "json", capsys=capsys)
    result = json.loads(out)
    assert result["bytes"] == archive.tar_size and result["archive"]["id"] == archive.id
    assert dest.read_bytes() == rig.node_tar(archive).read_bytes()


def test_a_bit_flip_in_the_backend_fails_and_leaves_nothing(rig: Rig, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    stored = rig.stored(archive)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x10
    os.chmod(stored, 0o600)
    stored.write_bytes(bytes(data))
    dest = tmp_path / "restored.tar"
    _, err = rig.run("restore", archive.id, "--to", str(dest), code=7, capsys=capsys)
    assert f"archive {archive.id}" in err
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_a_manifest_that_disagrees_with_the_catalog_is_refused(rig: Rig, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    manifest_path = tmp_path / "backend" / layout.manifest_key(archive.key)
    manifest = json.loads(manifest_path.read_text())
    manifest["tar_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    dest = tmp_path / "restored.tar"
    _, err = rig.run("restore", archive.id, "--to", str(dest), code=7, capsys=capsys)
    assert f"archive {archive.id}" in err and "tar_sha256" in err
    assert not dest.exists()

    manifest_path.unlink()
    _, err = rig.run("restore", archive.id, "--to", str(dest), code=7, capsys=capsys)
    assert "manifest" in err and "missing" in err and not dest.exists()


def test_latest_picks_the_newest_committed_archive_of_the_workload(rig: Rig, tmp_path: Path, capsys) -> None:
    first = rig.take()
    second = rig.take()  # the runner spaces checkpoints of a container by at least a second
    nginx = [a for a in first + second if a.pod == first[0].pod]
    newest = max(nginx, key=lambda a: a.checkpoint_time)
    assert newest.id != min(nginx, key=lambda a: a.checkpoint_time).id
    # newest of the *workload*: any pod of the Deployment counts
    all_newest = max(first + second, key=lambda a: (a.checkpoint_time, a.id))
    dest = tmp_path / "latest.tar"
    out, _ = rig.run("restore", "--latest", "--namespace", "default", "--workload", "deployment/web",
                     "--container", "nginx", "--to", str(dest), "-o", "json", capsys=capsys)
    picked = json.loads(out)["archive"]
    assert picked["checkpoint_time"] == all_newest.to_json()["checkpoint_time"]
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == picked["tar_sha256"]
    # a bare workload name and the layout segment select the same archive
    for spelling in ("web", "deployment-web"):
        out, _ = rig.run("restore", "--latest", "--namespace", "default", "--workload", spelling,
                         "--container", "nginx", "--to", str(tmp_path / f"{spelling}.tar"), "-o", "json",
                         capsys=capsys)
        assert json.loads(out)["archive"]["id"] == picked["id"]


def test_a_failed_archive_is_not_restorable(rig: Rig, tmp_path: Path, capsys) -> None:
    archive = rig.take()[0]
    rig.app.catalog.update_archive(archive.id, state=FAILED)
    _, err = rig.run("restore", archive.id, "--to", str(tmp_path / "x.tar"), code=2, capsys=capsys)
    assert archive.id in err and "failed" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "exactly one of"),
        (["--to", "a.tar", "--oci-layout", "d"], "--to, --oci-layout"),
        (["--to", "a.tar", "--pod-manifest", "p.yaml"], "--pod-manifest needs --image"),
        (["--latest", "--to", "a.tar"], "--latest needs --namespace, --workload, --container"),
        (["--latest", "--namespace", "default", "--workload", "deployment/web"], "exactly one of"),
        (["--to", "/nonexistent-dir/a.tar"], "'/nonexistent-dir' does not exist"),
        (["--image", "Registry.Example/UPPER"], "not a valid repository name"),
        (["--image", "127.0.0.1:5000/web:bad tag!"], "not a valid tag"),
        (["--image", "127.0.0.1:5000/web", "--chunk-size", "lots"], "--chunk-size"),
        (["--image", "127.0.0.1:5000/web", "--label", "novalue"], "--label 'novalue'"),
        (["--latest", "--namespace", "default", "--workload", "widget/web", "--container", "nginx",
          "--to", "a.tar"], "expected kind/name"),
    ],
)
def test_bad_input_exits_2_naming_the_value(rig: Rig, args: list[str], needle: str, capsys, tmp_path: Path,
                                            monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, err = rig.run("restore", *args, code=2, capsys=capsys)
    assert needle in err


def test_an_unknown_archive_exits_3(rig: Rig, tmp_path: Path, capsys) -> None:
    _, err = rig.run("restore", "deadbeefdeadbeef", "--to", str(tmp_path / "x.tar"), code=3, capsys=capsys)
    assert "deadbeefdeadbeef" in err
    _, err = rig.run("restore", "--latest", "--namespace", "default", "--workload", "deployment/nope",
                     "--container", "nginx", "--to", str(tmp_path / "x.tar"), code=3, capsys=capsys)
    assert "deployment/nope" in err


def test_the_old_output_file_flag_is_refused_with_what_to_type_now(rig: Rig, tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    """``--output`` wrote the tar before it meant the output format: the old command line must
    not quietly do something else."""
    archive = rig.take()[0]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _, err = rig.run("restore", archive.id, "--output", "x.tar", code=2, capsys=capsys)
    assert "--output is the output format now (table, json, yaml), not a file; write the tar with --to x.tar" in err
    _, err = rig.run("restore", archive.id, "-o", str(work / "restored.tar"), code=2, capsys=capsys)
    assert f"write the tar with --to {work / 'restored.tar'}" in err
    assert list(work.iterdir()) == []
    # a format without a destination is no destination
    _, err = rig.run("restore", archive.id, "--output", "json", code=2, capsys=capsys)
    assert "give exactly one of --to FILE, --oci-layout DIR or --image REF" in err


def test_the_result_as_yaml_and_the_deprecated_json_flag(rig: Rig, tmp_path: Path, capsys) -> None:
    import yaml

    archive = rig.take()[0]
    out, _ = rig.run("restore", archive.id, "--to", str(tmp_path / "a.tar"), "-o", "yaml", capsys=capsys)
    result = yaml.safe_load(out)
    assert result["to"] == str(tmp_path / "a.tar") and result["bytes"] == archive.tar_size
    assert result["archive"] == json.loads(json.dumps(archive.to_json(), default=str))
    out, _ = rig.run("restore", archive.id, "--to", str(tmp_path / "b.tar"), "--json", capsys=capsys)
    assert json.loads(out) == {**result, "to": str(tmp_path / "b.tar")}
