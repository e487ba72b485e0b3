"""The push-mode tar scanner: it agrees with Python's tarfile on well-formed archives in any
chunking, refuses hostile members, and what it keeps is what ``checkpoint_info`` reads."""

from __future__ import annotations

import io
import json
import platform
import tarfile
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.archive.metadata import checkpoint_info, metadata_scanner
from backupd.archive.tar import ScanningReader, TarScanner
from backupd.errors import UnsafeArchive
from backupd.model import COMMITTED, Archive

from .conftest import Rig


def _tar(members: list[tuple[str, bytes | None]], fmt: int = tarfile.PAX_FORMAT, **extra: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                for k, v in extra.items():
                    setattr(info, k, v)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _scan(data: bytes, cuts: list[int] | None = None, keep=lambda name: True, **kw: object) -> TarScanner:  # type: ignore[no-untyped-def]
    scanner = TarScanner("test archive", keep, **kw)  # type: ignore[arg-type]
    points = sorted({c % (len(data) + 1) for c in cuts or []} | {0, len(data)})
    for a, b in zip(points, points[1:], strict=False):
        scanner.feed(data[a:b])
    scanner.close()
    return scanner


LONG = "checkpoint/" + "d" * 120 + "/pages-1.img"
SAMPLE = [("stats-dump", b"\x01" * 54), ("checkpoint", None), ("checkpoint/inventory.img", b"inv" * 300),
          (LONG, bytes(range(256)) * 40), ("config.dump", b'{"id": "x"}'), ("spec.dump", b"{}"),
          ("empty", b"")]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30))
def test_any_chunking_gives_what_tarfile_reads(fmt: int, cuts: list[int]) -> None:
    data = _tar(SAMPLE, fmt=fmt)
    scanner = _scan(data, cuts)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert scanner.files == expected and LONG in scanner.files
    assert scanner.members == len(SAMPLE)
    assert scanner.top_level == {"stats-dump", "checkpoint", "config.dump", "spec.dump", "empty"}
    assert scanner.offset == len(data)


def test_byte_at_a_time_with_dot_slash_names() -> None:
    data = _tar([("./", None), ("./config.dump", b"cfg"), ("./checkpoint/", None), ("./checkpoint/core-1.img", b"c")])
    scanner = _scan(data, list(range(len(data))), keep=lambda n: n == "config.dump")
    assert scanner.files == {"config.dump": b"cfg"} and scanner.members == 4


def _pax_path_override(real_name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("harmless")
        info.size = 3
        info.pax_headers = {"path": real_name}
        tar.addfile(info, io.BytesIO(b"bad"))
    return buf.getvalue()


def _special(kind: bytes, name: str = "thing", linkname: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_tar([("/etc/cron.d/evil", b"x")]), "absolute"),
        (_tar([("../outside", b"x")]), "'..'"),
        (_tar([("checkpoint/../../outside", b"x")]), "'..'"),
        (_tar([("x" * 50 + "/../" + "y" * 80, b"x")], fmt=tarfile.GNU_FORMAT), "'..'"),
        (_pax_path_override("../../root/.ssh/authorized_keys"), "'..'"),
        (_special(tarfile.SYMTYPE, "checkpoint", "/etc"), "is a link"),
        (_special(tarfile.LNKTYPE, "config.dump", "/etc/shadow"), "is a link"),
        (_special(tarfile.CHRTYPE, "dev-null"), "character device"),
        (_special(tarfile.BLKTYPE, "sda"), "block device"),
        (_special(tarfile.FIFOTYPE, "fifo"), "FIFO"),
    ],
)
def test_hostile_members_are_refused_by_name(data: bytes, needle: str) -> None:
    with pytest.raises(UnsafeArchive, match="test archive") as exc:
        _scan(data)
    assert needle in str(exc.value)


def test_oversized_metadata_truncation_and_garbage_are_refused() -> None:
    with pytest.raises(UnsafeArchive, match="config.dump is 2048 bytes, over the 1024-byte limit"):
        _scan(_tar([("config.dump", b"{" * 2048)]), keep=lambda n: n == "config.dump", max_kept=1024)
    data = _tar([("config.dump", b"x" * 3000)])
    with pytest.raises(UnsafeArchive, match="ends inside member 'config.dump'"):
        _scan(data[:1500])
    with pytest.raises(UnsafeArchive, match="without an end-of-archive marker"):
        _scan(data[:512 + 3072])
    garbage = bytearray(data)
    garbage[0:4] = b"\xff\xfe\xfd\xfc"
    with pytest.raises(UnsafeArchive, match="invalid tar header at byte 0"):
        _scan(bytes(garbage))
    with pytest.raises(UnsafeArchive, match="data after the end-of-archive marker"):
        _scan(data + b"trailing junk")


def _archive(**overrides: object) -> Archive:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    fields: dict[str, object] = dict(
        id="0123456789abcdef", state=COMMITTED, policy="p", backend="local", key="k", node="node-a",
        namespace="shop", pod="db-0", workload="statefulset/db", container="postgres", image="postgres:16.4",
        checkpoint_time=now, created_at=now, tar_size=10, tar_sha256="a" * 64,
    )
    fields.update(overrides)
    return Archive(**fields)  # type: ignore[arg-type]


def test_checkpoint_info_reads_crio_and_containerd_dumps_and_falls_back_to_the_catalog() -> None:
    crio_spec = {
        "annotations": {
            "io.container.manager": "cri-o",
            "io.kubernetes.cri-o.Metadata": json.dumps({"name": "postgres"}),
            "io.kubernetes.pod.name": "db-0", "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": "u-1",
            "io.kubernetes.cri-o.Labels": json.dumps({"io.kubernetes.pod.name": "db-0", "app": "db",
                                                      "controller-revision-hash": "db-5d8"}),
        },
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/pods/u/etc-hosts"},
                   {"destination": "/var/lib/postgresql/data", "type": "bind", "source": "/mnt/pvc-1",
                    "options": ["rbind"]}],
    }  # fmt: skip
    config = {"rootfsImage": "docker.io/library/postgres@sha256:" + "b" * 64, "rootfsImageRef": "c" * 64,
              "rootfsImageName": "docker.io/library/postgres:16.4", "runtime": "runc"}  # fmt: skip
    info = checkpoint_info({"spec.dump": json.dumps(crio_spec).encode(), "config.dump": json.dumps(config).encode()},
                           _archive())
    assert (info.engine, info.container, info.pod, info.namespace, info.pod_uid) == ("cri-o", "postgres", "db-0",
                                                                                    "shop", "u-1")
    assert info.labels == {"app": "db", "controller-revision-hash": "db-5d8"}  # io.kubernetes.* dropped
    assert info.bind_mounts == (("/var/lib/postgresql/data", "/mnt/pvc-1"),)
    assert info.rootfs_image_digest == "sha256:" + "b" * 64 and info.runtime == "runc"

    containerd_spec = {"annotations": {"io.kubernetes.cri.container-name": "app", "io.kubernetes.cri.sandbox-name": "p",
                                       "io.kubernetes.cri.sandbox-namespace": "ns"}}  # fmt: skip
    status = {"labels": {"io.kubernetes.container.name": "app", "tier": "be"}}
    info = checkpoint_info({"spec.dump": json.dumps(containerd_spec).encode(),
                            "status.dump": json.dumps(status).encode()}, _archive())  # fmt: skip
    assert (info.engine, info.container, info.pod, info.namespace) == ("containerd", "app", "p", "ns")
    assert info.labels == {"tier": "be"} and info.has_status_dump

    info = checkpoint_info({"spec.dump": b"{not json", "config.dump": b"[]"}, _archive())
    assert (info.engine, info.container, info.pod, info.rootfs_image_name) == (
        "unknown", "postgres", "db-0", "postgres:16.4")


def test_a_simulator_archive_scans_in_one_pass(rig: Rig) -> None:
    archive = rig.take()[0]
    scanner = metadata_scanner(archive)
    with open(rig.node_tar(archive), "rb") as fh:
        reader = ScanningReader(fh, scanner)  # type: ignore[arg-type]
        while reader.read(1 << 16):
            pass
    assert {"config.dump", "spec.dump"} <= set(scanner.files)
    assert sum(1 for n in scanner.files if n.startswith("checkpoint/core-")) == 1
    info = checkpoint_info(scanner.files, archive)
    assert (info.engine, info.container, info.pod, info.namespace) == ("cri-o", "nginx", archive.pod, "default")
    assert info.rootfs_image_name == "docker.io/library/nginx:1.27" and info.runtime == "runc"
    assert info.arch == {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), info.arch)
