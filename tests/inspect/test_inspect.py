"""``backupd inspect`` on well-formed archives: every engine's layout, every compression, from
a file, stdin, and the catalog (through a real backend, digests checked), and the CLI."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from backupd.archive.inspect import Limits, detect_compression, inspect_file, inspect_stream
from backupd.backends.memory import MemoryBackend
from backupd.cli.inspect import format_micros, render_tree, tree_lines
from backupd.errors import EXIT_INTEGRITY, IntegrityError, InvalidInput, NotFound, UnsafeArchive
from backupd.model import Archive
from backupd.policy.document import parse_policies
from backupd.storage import layout
from backupd.storage.read import inspect_catalog_archive
from backupd.storage.transfer import DigestMismatch, PackingReader
from tests.policies import web_policy

from .archives import (
    WHEN,
    Crafted,
    containerd_archive,
    crafted_tar,
    crio_archive,
    minimal_members,
    podman_archive,
    web_pod,
)


def test_crio_archive_shows_what_checkpointctl_shows(tmp_path: Path) -> None:
    pod, container = web_pod()
    r = inspect_file(crio_archive(tmp_path / "a.tar"))
    assert (r.engine, r.container_name, r.pod, r.namespace) == ("CRI-O", "nginx", pod.name, "default")
    assert (r.image, r.id, r.runtime, r.ip) == (container.image_name, container.container_id, "runc", pod.ip)
    assert r.checkpointed == "2026-03-13T21:43:06+05:30"  # Go's RFC 3339: fraction dropped, offset kept
    assert r.created is not None and r.created.startswith(container.created_at.strftime("%Y-%m-%d"))
    tree = r.process_tree
    assert tree is not None and (tree.pid, tree.command, tree.task_state) == (1, "nginx", "Alive")
    assert [(c.pid, c.command) for c in tree.children] == [(2, "nginx"), (3, "nginx")]
    assert r.statistics is not None and r.statistics.pages_written > 0
    sizes = r.checkpoint_size
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert sizes.total_size == sum(m.size for m in members if m.name.startswith("checkpoint/"))
    assert sizes.memory_pages_size == sum(m.size for m in members if m.name.startswith("checkpoint/pages-"))
    assert sizes.root_fs_diff_size == next(m.size for m in members if m.name == "rootfs-diff.tar")
    assert r.rootfs_diff is not None
    assert {(f.path, f.type) for f in r.rootfs_diff.files} >= {("run/nginx.pid", "file"), ("var/log/nginx", "dir")}
    assert r.deleted_files == [] and r.warnings == [] and r.members == len(members)
    assert any(m["destination"] == "/etc/hosts" for m in r.mounts)
    assert r.tar_size == (tmp_path / "a.tar").stat().st_size


def test_containerd_archive_fields_and_whiteouts(tmp_path: Path) -> None:
    pod, container = web_pod()
    r = inspect_file(containerd_archive(tmp_path / "c.tar"))
    assert (r.engine, r.container_name, r.pod, r.namespace) == ("containerd", "nginx", pod.name, "default")
    assert r.runtime == "io.containerd.runc.v2" and r.ip is None
    assert (r.created, r.checkpointed) == ("2026-03-12T10:00:01+05:30", "2026-03-13T21:43:06Z")
    assert r.rootfs_diff is not None and r.rootfs_diff.compression == "gzip"
    files = {f.path: f for f in r.rootfs_diff.files}
    assert files["etc/app.conf"].size == 13
    assert (files["usr/bin/python"].type, files["usr/bin/python"].link) == ("symlink", "/usr/bin/python3")
    assert r.deleted_files == ["etc/motd"]  # the whiteout; the opaque-directory marker is not a file
    assert r.mounts == [{"destination": "/data", "type": "bind", "source": "/var/lib/data"}]


def test_podman_archive_network_and_deleted_files(tmp_path: Path) -> None:
    r = inspect_file(podman_archive(tmp_path / "p.tar"))
    assert (r.engine, r.container_name, r.runtime) == ("Podman", "quirky_tesla", "crun")
    assert (r.created, r.checkpointed) == ("2026-03-12T10:00:01Z", "2026-03-13T21:43:06+01:00")
    # checkpointctl's order: networks by name, then interfaces by name
    assert (r.ip, r.mac) == ("10.89.0.4, 10.88.0.9", "5a:11:22:33:44:55, 32:e4:0c:1a:2b:3c")
    assert r.deleted_files == ["/etc/motd", "/tmp/x"] and r.pod is None


@pytest.mark.parametrize("kind", ["none", "zstd", "gzip", "xz", "bzip2"])
def test_every_compression_reads_the_same(tmp_path: Path, kind: str) -> None:
    plain = crio_archive(tmp_path / "a.tar")
    packed = tmp_path / f"a.{kind}"
    with open(plain, "rb") as src, open(packed, "wb") as dst:
        if kind == "zstd":
            zstandard.ZstdCompressor().copy_stream(src, dst)
        elif kind == "none":
            shutil.copyfileobj(src, dst)
        else:
            opener = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="wb"), "xz": lambda f: lzma.LZMAFile(f, "wb"),
                      "bzip2": lambda f: bz2.BZ2File(f, "wb")}[kind]  # fmt: skip
            with opener(dst) as z:
                shutil.copyfileobj(src, z)
    expected = inspect_file(plain).to_json()
    got = inspect_file(packed).to_json()
    assert got.pop("compression") == kind and got.pop("source") == str(packed)
    expected.pop("compression"), expected.pop("source")
    assert got == expected
    assert detect_compression(packed.read_bytes()[:8]) == kind


def test_dot_slash_prefixed_archive_is_normalised(tmp_path: Path) -> None:
    """Re-packed by hand (``tar cf x.tar .``): names start with ``./`` (reference §2.1)."""
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(crio_archive(tmp_path / "a.tar")) as tar:
        members = tar.getmembers()
        repacked = tmp_path / "dot.tar"
        with tarfile.open(repacked, "w") as out:
            out.addfile(_dir("./"))
            for m in members:
                data = tar.extractfile(m) if m.isreg() else None
                m.name = "./" + m.name
                out.addfile(m, data)
    a, b = inspect_file(tmp_path / "a.tar").to_json(), inspect_file(repacked).to_json()
    for d in (a, b):
        d.pop("source"), d.pop("tar_size"), d.pop("members")
    assert a == b


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_stdin_stream_and_stale_bytes_after_the_end(tmp_path: Path) -> None:
    """Bytes after the end-of-archive block (CRI-O overwrites without O_TRUNC, reference §1.4)
    are a warning, as tar readers ignore them; the inspection itself succeeds."""
    data = crio_archive(tmp_path / "a.tar").read_bytes() + b"stale tail of an older archive" + bytes(1000)
    r = inspect_stream(io.BytesIO(data), source="stdin")
    assert r.container_name == "nginx" and r.tar_size == len(data)
    assert r.warnings == ["30 non-zero bytes follow the end-of-archive block (ignored, as tar readers do: stale "
                          "data of an overwritten file, or something appended)"]  # fmt: skip


def test_minimal_archive_and_missing_parts(tmp_path: Path) -> None:
    r = inspect_stream(io.BytesIO(crafted_tar(minimal_members())), source="m")
    assert (r.container_name, r.image, r.statistics, r.rootfs_diff) == ("app", "img:1", None, None)
    assert r.checkpoint_size.memory_pages_size == 8192 and r.process_tree is not None
    no_spec = [m for m in minimal_members() if m.name != "spec.dump"]
    with pytest.raises(IntegrityError, match="not a container checkpoint archive: it has no spec.dump"):
        inspect_stream(io.BytesIO(crafted_tar(no_spec)), source="m")
    no_dir = [m for m in minimal_members() if not m.name.startswith("checkpoint")]
    with pytest.raises(IntegrityError, match="no checkpoint/ directory"):
        inspect_stream(io.BytesIO(crafted_tar(no_dir)), source="m")
    no_core = [m for m in minimal_members() if m.name != "checkpoint/core-1.img"]
    with pytest.raises(IntegrityError, match=r"checkpoint/core-1.img is missing \(pid 1 is in pstree.img\)"):
        inspect_stream(io.BytesIO(crafted_tar(no_core)), source="m")


def test_listing_stops_at_the_limit_with_a_warning(tmp_path: Path) -> None:
    r = inspect_file(crio_archive(tmp_path / "a.tar"), limits=Limits(max_listed_files=2))
    assert r.rootfs_diff is not None and r.rootfs_diff.truncated and len(r.rootfs_diff.files) == 2
    assert r.warnings == ["the rootfs-diff.tar listing stops at 2 entries"]


def test_local_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no file"):
        inspect_file(tmp_path / "missing.tar")
    with pytest.raises(InvalidInput, match="is not a regular file"):
        inspect_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="is not a regular file"):  # never blocks on open
        inspect_file(fifo)
    age = tmp_path / "a.tar.zst.age"
    age.write_bytes(b"age-encryption.org/v1\n-> X25519 abc\n")
    with pytest.raises(InvalidInput, match="encrypted with age"):
        inspect_file(age)
    (tmp_path / "notes.txt").write_text("not an archive at all, just text\n" * 40)
    with pytest.raises(IntegrityError, match="is not a tar archive"):
        inspect_file(tmp_path / "notes.txt")


# -- from the catalog -----------------------------------------------------------------------



def take_archive(app) -> Archive:  # type: ignore[no-untyped-def]
    policy = parse_policies(web_policy(keep_on_node=1), "web.yaml", backends=["local"])[0]
    app.catalog.apply_policies([(policy.name, policy.canonical_json())])
    result = app.runner.cycle(policy)
    assert not result.failed, result
    return app.catalog.list_archives(policy="web")[0]


def test_catalog_archive_agrees_with_the_node_tar(app_factory, sim) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    archive = take_archive(app)
    r = inspect_catalog_archive(archive, app.backends["local"])
    local = inspect_file(sim.checkpoint_dir / archive.node_path)
    assert r.archive is not None and r.archive["id"] == archive.id and r.compression == "zstd"
    assert r.tar_size == archive.tar_size
    ours, theirs = r.to_json(), local.to_json()
    for d in (ours, theirs):
        for k in ("source", "archive", "compression"):
            d.pop(k)
    assert ours == theirs and ours["container_name"] == archive.container == "nginx"


def test_corrupt_stored_object_is_a_digest_mismatch(app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    archive = take_archive(app)
    stored = tmp_path / "backend" / archive.key
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        inspect_catalog_archive(archive, app.backends["local"])
    assert err.value.exit_code == EXIT_INTEGRITY and f"archive {archive.id}" in str(err.value)
    stored.write_bytes(bytes(data[: len(data) // 3]))  # truncated in storage
    with pytest.raises(IntegrityError, match=f"archive {archive.id}"):
        inspect_catalog_archive(archive, app.backends["local"])


def _stored(tar: bytes, backend: MemoryBackend, archive_id: str, **catalog: object) -> Archive:
    """``tar`` stored as a committed archive with its manifest; ``catalog`` overrides what the
    catalog row -- and the manifest beside the object -- say about it."""
    reader = PackingReader(io.BytesIO(tar))
    key = layout.archive_key("default", "pod-p", "app", WHEN, archive_id)
    info = backend.put(key, reader)
    archive = Archive(id=archive_id, state="committed", policy="p", backend=backend.name, key=key, node="n",
                      namespace="default", pod="p", workload="pod/p", container="app", image="img",
                      checkpoint_time=WHEN, created_at=WHEN, tar_size=reader.tar_size, stored_size=info.size,
                      tar_sha256=reader.tar_sha256, stored_sha256=reader.stored_sha256)  # fmt: skip
    archive = Archive(**{**archive.__dict__, **catalog})
    manifest = layout.Manifest(archive_id=archive_id, backupd_version="test", compression="zstd",
                               format_version=layout.FORMAT_VERSION, **{
        f: getattr(archive, f) for f in ("key", "node", "namespace", "pod", "workload", "container", "image",
                                         "checkpoint_time", "tar_size", "stored_size", "tar_sha256", "stored_sha256",
                                         "encryption", "policy")})  # fmt: skip
    backend.put_bytes(layout.manifest_key(key), manifest.to_json())
    return archive


def test_hostile_archive_in_storage_is_refused_not_blamed_on_storage() -> None:
    """The digests match (it was hostile when it was taken): the verdict is UnsafeArchive."""
    backend = MemoryBackend()
    tar = crafted_tar([*minimal_members(), Crafted("evil", type=tarfile.SYMTYPE, linkname="/etc/shadow")])
    archive = _stored(tar, backend, "0123456789abcdef")
    with pytest.raises(UnsafeArchive, match="'evil' is a link .symlink to '/etc/shadow'"):
        inspect_catalog_archive(archive, backend)
    broken = _stored(tar, backend, "fedcba9876543210", tar_sha256="0" * 64)
    with pytest.raises(DigestMismatch, match="tar SHA-256 differs; so the stored object is corrupt"):
        inspect_catalog_archive(broken, backend)
    short = _stored(tar, backend, "00000000000000aa", tar_size=1024)
    with pytest.raises(DigestMismatch, match="the tar is longer than its 1024 bytes"):
        inspect_catalog_archive(short, backend)
    with pytest.raises(IntegrityError, match="disagree on tar_size"):
        inspect_catalog_archive(Archive(**{**archive.__dict__, "tar_size": 1024}), backend)
    with pytest.raises(NotFound, match="is failed, not committed"):
        inspect_catalog_archive(Archive(**{**archive.__dict__, "state": "failed"}), backend)
    with pytest.raises(InvalidInput, match="encrypted"):
        inspect_catalog_archive(Archive(**{**archive.__dict__, "encryption": "age"}), backend)


# -- the command line -----------------------------------------------------------------------


def backupd(*args: str, config: Path | None = None, stdin: bytes | None = None,
            check: int | None = 0) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    cmd = [sys.executable, "-m", "backupd", *(["--config", str(config)] if config else []), *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_cli_on_files_and_stdin(tmp_path: Path) -> None:
    path = crio_archive(tmp_path / "a.tar")
    doc = json.loads(backupd("inspect", str(path), "--output", "json").stdout)  # no config needed for a file
    assert doc == json.loads(json.dumps(inspect_file(path).to_json()))
    piped = json.loads(backupd("inspect", "-", "-o", "json", stdin=path.read_bytes()).stdout)
    assert piped["source"] == "stdin" and piped["process_tree"] == doc["process_tree"]
    evil = tmp_path / "evil.tar"
    evil.write_bytes(crafted_tar([*minimal_members(), Crafted("../../etc/cron.d/x", b"* * * * * root sh\n")]))
    err = backupd("inspect", str(evil), check=7).stderr.decode()
    assert "'../../etc/cron.d/x' climbs out of the archive" in err and "Traceback" not in err
    assert not (tmp_path.parent / "etc").exists()


def test_tree_view(tmp_path: Path) -> None:
    text = "\n".join(tree_lines(inspect_file(crio_archive(tmp_path / "a.tar"))))
    assert text.startswith("nginx\n├── Image: docker.io/library/nginx:1.27\n") and "├── Engine: CRI-O" in text
    assert "│   └── Memory pages size: " in text and "│   ├── run/nginx.pid (2 B)" in text
    assert "    └── [1]  nginx\n        ├── [2]  nginx\n        └── [3]  nginx" in text
    assert "├── CRIU dump statistics\n│   ├── Freezing time: " in text


def test_cli_by_catalog_id(app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    archive = take_archive(app)
    cfg = tmp_path / "config.toml"
    k = app.config.kubelet
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n'
        f'[kubelet]\nurl = "{k.url}"\nca_file = "{k.ca_file}"\ncert_file = "{k.cert_file}"\n'
        f'key_file = "{k.key_file}"\ncheckpoint_dir = "{k.checkpoint_dir}"\nnode_name = "sim-node"\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
    )
    doc = json.loads(backupd("inspect", archive.id[:8], "-o", "json", config=cfg).stdout)
    assert doc["archive"]["id"] == archive.id and doc["container_name"] == "nginx" and doc["engine"] == "CRI-O"
    assert doc["tar_size"] == archive.tar_size
    assert b"no archive 'ffffffff'" in backupd("inspect", "ffffffff", config=cfg, check=3).stderr


def test_tree_rendering_and_times() -> None:
    assert render_tree(("root", [("a", [("a1", []), ("a2", [])]), ("b", [("b1", [])])])) == [
        "root", "├── a", "│   ├── a1", "│   └── a2", "└── b", "    └── b1",
    ]  # fmt: skip
    # checkpointctl's FormatTime
    assert [format_micros(v) for v in (421, 26989, 1000, 1_376_964, 60_000_000)] == [
        "421 µs", "26.989 ms", "1 ms", "1.377 s", "60 s",
    ]  # fmt: skip


def test_terminal_escapes_in_names_are_shown_escaped() -> None:
    members = [*minimal_members(comm="\x1b[2Jevil"), Crafted("rootfs-diff.tar", crafted_tar([Crafted("a\x07b", b"")]))]
    lines = tree_lines(inspect_stream(io.BytesIO(crafted_tar(members)), source="esc"))
    assert "└── [1]  \\x1b[2Jevil" in lines[-1] and any("a\\x07b (0 B)" in line for line in lines)
    assert not any("\x1b" in line or "\x07" in line for line in lines)
