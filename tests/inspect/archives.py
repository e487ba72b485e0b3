"""Checkpoint archives for the inspect tests: the simulator's CRI-O layout, containerd and
Podman variants of it, and crafted hostile tars. Everything streams to files."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from backupd.archive import criu
from backupd.simulator.archive import (
    ArchiveMember,
    rootfs_diff_tar,
    synthetic_checkpoint_members,
    write_checkpoint_archive,
    write_tar,
)
from backupd.simulator.topology import Container, Pod, default_topology, materialize

WHEN = dt.datetime(2026, 3, 13, 21, 43, 6, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))


def web_pod() -> tuple[Pod, Container]:
    """The default topology's first nginx pod (three nginx processes)."""
    pods = materialize(default_topology(), seed=7, now=WHEN)
    pod = next(p for p in pods if p.name.startswith("web-"))
    return pod, pod.containers[0]


def crio_archive(path: Path, *, memory_bytes: int = 64 << 10) -> Path:
    """The simulator's CRI-O archive, exactly as the kubelet stand-in writes it."""
    pod, container = web_pod()
    with open(path, "wb") as fh:
        write_checkpoint_archive(fh, pod, container, checkpointed_at=WHEN, memory_bytes=memory_bytes, seed=3)
    return path


def _json_member(name: str, value: object) -> ArchiveMember:
    return ArchiveMember(name, data=json.dumps(value, indent=2).encode())


def _layer(files: Iterable[tuple[str, bytes]], whiteouts: Iterable[str]) -> bytes:
    """An OCI gzip layer, as containerd stores a rootfs diff (deletions are whiteouts)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(WHEN.timestamp())
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("usr/bin/python")
        link.type, link.linkname = tarfile.SYMTYPE, "/usr/bin/python3"
        tar.addfile(link)
        for name in whiteouts:
            tar.addfile(tarfile.TarInfo(name))
    return gzip.compress(buf.getvalue(), mtime=0)


def containerd_archive(path: Path, *, memory_bytes: int = 64 << 10) -> Path:
    """A containerd 2.x archive: CRI annotations in spec.dump, a gzip rootfs diff with whiteouts."""
    pod, container = web_pod()
    top, ckpt = synthetic_checkpoint_members(pod, container, memory_bytes=memory_bytes, seed=5, sequence=0)
    config = {
        "id": container.container_id, "name": container.name, "rootfsImage": container.image_ref,
        "rootfsImageRef": container.image_id, "rootfsImageName": container.image_name,
        "runtime": "io.containerd.runc.v2", "createdTime": "2026-03-12T10:00:01.5+05:30",
        "checkpointedTime": "2026-03-13T21:43:06.123456789+00:00", "restoredTime": "0001-01-01T00:00:00Z",
        "restored": False,
    }  # fmt: skip
    spec = {"ociVersion": "1.2.0", "annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": container.name,
        "io.kubernetes.cri.sandbox-name": pod.name,
        "io.kubernetes.cri.sandbox-namespace": pod.namespace,
        "io.kubernetes.cri.sandbox-id": "a" * 64,
        "io.kubernetes.cri.image-name": container.image_name,
    }, "mounts": [{"destination": "/data", "type": "bind", "source": "/var/lib/data"}]}  # fmt: skip
    layer = _layer([("etc/app.conf", b"debug = true\n")], ["etc/.wh.motd", "var/cache/.wh..wh..opq"])
    meta = [_json_member("config.dump", config), _json_member("spec.dump", spec),
            ArchiveMember("rootfs-diff.tar", data=layer),
            _json_member("status.dump", {"id": container.container_id, "state": "CONTAINER_RUNNING"})]  # fmt: skip
    with open(path, "wb") as fh:
        write_tar(fh, [*top, *ckpt, *meta], WHEN)
    return path


def podman_archive(path: Path, *, memory_bytes: int = 64 << 10) -> Path:
    """A Podman export: libpod spec, network.status, deleted.files, no CRI annotations."""
    pod, container = web_pod()
    top, ckpt = synthetic_checkpoint_members(pod, container, memory_bytes=memory_bytes, seed=6, sequence=0)
    config = {
        "id": container.container_id, "name": "quirky_tesla", "rootfsImage": container.image_ref,
        "rootfsImageRef": container.image_id, "rootfsImageName": container.image_name, "runtime": "crun",
        "createdTime": "2026-03-12T10:00:01.123Z", "checkpointedTime": "2026-03-13T21:43:06+01:00",
        "restoredTime": "0001-01-01T00:00:00Z", "restored": False,
    }  # fmt: skip
    spec = {"ociVersion": "1.2.0", "annotations": {"io.container.manager": "libpod"}}
    network = {
        "podman": {"interfaces": {"eth0": {"subnets": [{"ipnet": "10.88.0.9/16", "gateway": "10.88.0.1"}],
                                           "mac_address": "32:e4:0c:1a:2b:3c"}}},
        "backend": {"interfaces": {"eth1": {"subnets": [{"ipnet": "10.89.0.4/24", "gateway": "10.89.0.1"}],
                                            "mac_address": "5a:11:22:33:44:55"}}},
    }  # fmt: skip
    meta = [_json_member("config.dump", config), _json_member("spec.dump", spec),
            _json_member("network.status", network), _json_member("deleted.files", ["/etc/motd", "/tmp/x"]),
            ArchiveMember("rootfs-diff.tar", data=rootfs_diff_tar(pod, container, WHEN))]  # fmt: skip
    with open(path, "wb") as fh:
        write_tar(fh, [*top, *ckpt, *meta], WHEN)
    return path


# -- crafted members ----------------------------------------------------------------------------


@dataclass
class Crafted:
    """One tar entry with every header field under the test's control."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # declared size; None = len(data)
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] | None = None


def crafted_tar(members: Iterable[Crafted], *, fmt: int = tarfile.PAX_FORMAT, end: bool = True) -> bytes:
    """Encode members byte by byte (tarfile's writer would refuse some of them)."""
    out = bytearray()
    for m in members:
        info = tarfile.TarInfo(m.name)
        info.type, info.linkname, info.mode, info.mtime = m.type, m.linkname, 0o644, int(WHEN.timestamp())
        info.size = len(m.data) if m.size is None else m.size
        info.devmajor, info.devminor = m.devmajor, m.devminor
        if m.pax:
            info.pax_headers = dict(m.pax)
        out += info.tobuf(fmt, "utf-8", "surrogateescape")
        out += m.data + bytes(-len(m.data) % tarfile.BLOCKSIZE)
    if end:
        out += bytes(2 * tarfile.BLOCKSIZE)
    return bytes(out)


def minimal_members(comm: str = "app") -> list[Crafted]:
    """The smallest archive inspect accepts: metadata, a pstree with one task, its core."""
    pod, container = web_pod()
    core = criu.CoreEntry(tc=criu.TaskCoreEntry(comm=comm, task_state=1))
    return [
        Crafted("checkpoint", type=tarfile.DIRTYPE),
        Crafted("checkpoint/pstree.img", criu.encode_image("PSTREE", [criu.PstreeEntry(pid=1, threads=[1])])),
        Crafted("checkpoint/core-1.img", criu.encode_image("CORE", [core])),
        Crafted("checkpoint/pages-1.img", bytes(8192)),
        Crafted("config.dump", json.dumps({"id": "c1", "rootfsImageName": "img:1"}).encode()),
        Crafted("spec.dump", json.dumps({"annotations": {"io.container.manager": "cri-o",
                                                          "io.kubernetes.cri-o.Metadata": '{"name":"app"}'}}).encode()),
    ]  # fmt: skip
