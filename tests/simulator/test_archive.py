"""Synthetic checkpoint archives: layout, content, determinism, compressibility, streaming."""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
import time
import tracemalloc
from zoneinfo import ZoneInfo

import pytest
import zstandard

from backupd.archive import criu
from backupd.simulator.archive import (
    checkpoint_file_name,
    go_rfc3339,
    go_rfc3339nano,
    memory_chunks,
    write_checkpoint_archive,
)
from backupd.simulator.topology import default_topology, materialize

WHEN = dt.datetime(2026, 3, 13, 21, 43, 6, 250000, tzinfo=ZoneInfo("Asia/Kolkata"))


@pytest.fixture(scope="module")
def nginx():
    pod = next(p for p in materialize(default_topology(), seed=5) if p.name.startswith("web-"))
    return pod, pod.containers[0]


def archive_bytes(pod, container, **kwargs) -> bytes:
    buf = io.BytesIO()
    kwargs.setdefault("checkpointed_at", WHEN)
    kwargs.setdefault("memory_bytes", 1 << 20)
    n = write_checkpoint_archive(buf, pod, container, **kwargs)
    assert n == len(buf.getvalue())
    return buf.getvalue()


class NullSink(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)


def test_go_time_formats():
    utc = dt.datetime(2026, 3, 13, 21, 43, 6, tzinfo=dt.UTC)
    assert go_rfc3339(utc) == "2026-03-13T21:43:06Z"
    assert go_rfc3339(WHEN) == "2026-03-13T21:43:06+05:30"
    assert go_rfc3339(dt.datetime(2026, 1, 1, tzinfo=ZoneInfo("America/New_York"))) == "2026-01-01T00:00:00-05:00"
    assert go_rfc3339nano(WHEN) == "2026-03-13T21:43:06.25+05:30"
    assert go_rfc3339nano(utc) == "2026-03-13T21:43:06Z"
    assert checkpoint_file_name("counters", "default", "counter", utc) == (
        "checkpoint-counters_default-counter-2026-03-13T21:43:06Z.tar"
    )


def test_layout_matches_crio(nginx):
    pod, c = nginx
    with tarfile.open(fileobj=io.BytesIO(archive_bytes(pod, c))) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
    n = len(c.processes)
    assert names[:3] == ["stats-dump", "dump.log", "checkpoint"]
    assert members[2].isdir()
    assert names[-3:] == ["config.dump", "spec.dump", "rootfs-diff.tar"]
    images = sorted(name.removeprefix("checkpoint/") for name in names[3:-3])
    expected = {"inventory.img", "pstree.img"} | {
        f"{kind}-{i}.img" for i in range(1, n + 1) for kind in ("core", "ids", "mm", "pagemap", "pages")
    }
    assert set(images) == expected
    assert all(not name.startswith(("./", "/")) for name in names)

    config = json.loads(files["config.dump"])
    assert config["id"] == c.container_id
    assert config["name"] == f"k8s_nginx_{pod.name}_default_{pod.uid}_0"
    assert config["rootfsImageName"] == "docker.io/library/nginx:1.27"
    assert config["rootfsImage"].startswith("docker.io/library/nginx@sha256:")
    assert len(config["rootfsImageRef"]) == 64
    assert config["runtime"] == "runc"
    assert config["checkpointedTime"] == "2026-03-13T21:43:06.25+05:30"
    assert config["createdTime"].endswith("+05:30")

    annotations = json.loads(files["spec.dump"])["annotations"]
    assert annotations["io.container.manager"] == "cri-o"
    assert json.loads(annotations["io.kubernetes.cri-o.Metadata"]) == {"name": "nginx"}
    assert annotations["io.kubernetes.pod.namespace"] == "default"
    assert annotations["io.kubernetes.pod.name"] == pod.name
    assert annotations["io.kubernetes.pod.uid"] == pod.uid
    assert annotations["io.kubernetes.container.name"] == "nginx"
    assert annotations["io.kubernetes.cri-o.IP.0"] == pod.ip
    assert annotations["io.kubernetes.cri-o.ImageName"] == config["rootfsImageName"]
    assert annotations["io.kubernetes.cri-o.ImageRef"] == config["rootfsImageRef"]
    assert json.loads(annotations["io.kubernetes.cri-o.Labels"])["io.kubernetes.pod.uid"] == pod.uid
    assert "io.kubernetes.container.hash" in json.loads(annotations["io.kubernetes.cri-o.Annotations"])
    assert annotations["io.kubernetes.cri-o.Created"].endswith("+05:30")

    with tarfile.open(fileobj=io.BytesIO(files["rootfs-diff.tar"])) as inner:
        assert any(m.isfile() for m in inner.getmembers())
    assert files["dump.log"].decode().rstrip().endswith("Dumping finished successfully")


def test_synthetic_images_are_consistent(nginx):
    pod, c = nginx
    with tarfile.open(fileobj=io.BytesIO(archive_bytes(pod, c, memory_bytes=3 << 20))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    tree = criu.decode_image(files["checkpoint/pstree.img"], expect="PSTREE").entries
    assert [(p.pid, p.ppid) for p in tree] == [(1, 0)] + [(i, 1) for i in range(2, len(c.processes) + 1)]
    inventory = criu.decode_image(files["checkpoint/inventory.img"], expect="INVENTORY").entries[0]
    assert inventory.img_version == 2
    total = 0
    for p in tree:
        core = criu.decode_image(files[f"checkpoint/core-{p.pid}.img"], expect="CORE").entries[0]
        assert core.tc.comm == "nginx" and criu.task_state_name(core.tc) == "Alive"
        head, *entries = criu.decode_image(files[f"checkpoint/pagemap-{p.pid}.img"], expect="PAGEMAP").entries
        pages = files[f"checkpoint/pages-{head.pages_id}.img"]
        assert sum(criu.pagemap_pages(e) for e in entries) * criu.PAGE_SIZE == len(pages)
        total += len(pages)
        mm = criu.decode_image(files[f"checkpoint/mm-{p.pid}.img"], expect="MM").entries[0]
        # argv lives in the last dumped page (the top of the stack), as checkpointctl reads it
        arg_page = entries[-1].vaddr
        argv = pages[-criu.PAGE_SIZE:][mm.mm_arg_start - arg_page : mm.mm_arg_end - arg_page]
        assert argv.split(b"\0")[0].startswith(b"nginx")
    assert total == (3 << 20) // criu.PAGE_SIZE * criu.PAGE_SIZE
    stats = criu.decode_stats(files["stats-dump"]).dump
    assert stats.pages_written == total // criu.PAGE_SIZE


def test_deterministic_per_seed_and_sequence(nginx):
    pod, c = nginx
    a = archive_bytes(pod, c, seed=3)
    assert archive_bytes(pod, c, seed=3) == a
    assert archive_bytes(pod, c, seed=3, sequence=1) != a


def test_memory_compresses_like_real_memory():
    data = b"".join(memory_chunks((32 << 20) // 4096, seed=1))
    assert len(data) == 32 << 20
    ratio = len(data) / len(zstandard.ZstdCompressor(level=1).compress(data))
    assert 3.5 <= ratio <= 6.0, ratio
    zeros = sum(data[i : i + 4096] == bytes(4096) for i in range(0, len(data), 4096)) / (len(data) / 4096)
    assert 0.3 < zeros < 0.6


def test_one_gib_of_memory_is_generated_in_well_under_a_second_per_gib():
    start = time.monotonic()
    n = sum(len(chunk) for chunk in memory_chunks((1 << 30) // 4096, seed=2))
    assert n == 1 << 30
    assert time.monotonic() - start < 2.0


def test_archives_are_streamed_not_held_in_memory(nginx):
    pod, c = nginx
    sink = NullSink()
    tracemalloc.start()
    try:
        write_checkpoint_archive(sink, pod, c, checkpointed_at=WHEN, memory_bytes=128 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.n > 128 << 20
    assert peak < 24 << 20, peak  # the 8 MiB noise pool plus ~1 MiB chunks
