"""The simulator against the real tools: checkpointctl reads its archives, CRIU dumps and
restores its processes. Skipped, with the reason, where the tools are missing (install them
with shared/tools/install-checkpoint-tools)."""

from __future__ import annotations

import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from backupd.archive import criu
from backupd.simulator import criu as real_criu
from backupd.simulator.topology import parse_topology

from .conftest import pod_named

CHECKPOINTCTL = real_criu.find_checkpointctl()
needs_checkpointctl = pytest.mark.skipif(CHECKPOINTCTL is None, reason="checkpointctl not installed "
                                         "(shared/tools/install-checkpoint-tools)")  # fmt: skip
CRIU_REASON = real_criu.criu_unavailable_reason()
needs_criu = pytest.mark.skipif(CRIU_REASON is not None, reason=f"real CRIU unavailable: {CRIU_REASON}")


def checkpointctl(*args: str) -> str:
    assert CHECKPOINTCTL is not None
    out = subprocess.run([CHECKPOINTCTL, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_checkpointctl
def test_checkpointctl_reads_synthetic_archives(make_sim):
    sim = make_sim(memory_bytes=4 << 20)
    pod = pod_named(sim, "web-")
    with httpx.Client(base_url=sim.url, verify=sim.client_ssl_context()) as c:
        path = c.post(f"/checkpoint/default/{pod.name}/nginx").json()["items"][0]

    show = checkpointctl("show", path)
    assert "nginx" in show and "CRI-O" in show and "docker.io/library/nginx:1.27" in show

    tree = checkpointctl("inspect", "--ps-tree", "--stats", path)
    assert "Process tree" in tree and "[1]  nginx" in tree
    assert "CRIU dump statistics" in tree and "Pages written: 1024" in tree
    assert "Checkpointed: " in tree

    cmd = checkpointctl("inspect", "--ps-tree-cmd", path)
    assert "nginx -g daemon off;" in cmd

    mem = checkpointctl("memparse", path)
    assert "nginx" in mem and "MiB" in mem


@needs_criu
def test_real_criu_dump_and_restore_continues_the_counter(make_sim, tmp_path: Path):
    topology = parse_topology({"node": "criu-node", "pods": [{
        "namespace": "default", "name": "counter",
        "containers": [{"name": "count", "image": "busybox:1.36", "processes": ["counter"]}],
    }]})  # fmt: skip
    sim = make_sim(topology=topology, criu=True, memory_bytes=1 << 20)
    assert sim.criu_enabled
    proc = sim.process("default", "counter", "count")
    assert proc is not None
    proc.wait_for_counter(3)

    with httpx.Client(base_url=sim.url, verify=sim.client_ssl_context(), timeout=60) as c:
        before = proc.read_counter()
        r = c.post("/checkpoint/default/counter/count")
        after = proc.read_counter()
    assert r.status_code == 200, r.text
    archive = Path(r.json()["items"][0])

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        files = {n: tar.extractfile(n).read() for n in ("checkpoint/pstree.img", f"checkpoint/core-{proc.pid}.img",
                                                         "stats-dump")}  # fmt: skip
    assert names[:3] == ["stats-dump", "dump.log", "checkpoint"]
    assert {"checkpoint/inventory.img", f"checkpoint/mm-{proc.pid}.img", "checkpoint/pages-1.img",
            "config.dump", "spec.dump"} <= set(names)  # fmt: skip
    # the codec reads real CRIU output
    [root] = criu.decode_image(files["checkpoint/pstree.img"], expect="PSTREE").entries
    assert root.pid == proc.pid
    core = criu.decode_image(files[f"checkpoint/core-{proc.pid}.img"], expect="CORE").entries[0]
    assert core.tc.comm == "counter" and criu.task_state_name(core.tc) == "Alive"
    assert criu.decode_stats(files["stats-dump"]).dump.pages_written > 256  # the 1 MiB ballast at least

    if CHECKPOINTCTL:
        tree = checkpointctl("inspect", "--ps-tree", "--stats", str(archive))
        assert f"[{proc.pid}]  counter" in tree and "Pages written" in tree

    # --leave-running: the original goes on counting; stop it so its pid is free again
    time.sleep(1.5)
    reached = proc.read_counter()
    proc.stop()
    images = real_criu.extract_checkpoint_images(archive, tmp_path / "restore")
    pid = real_criu.criu_restore(images, tmp_path / "restore" / "work")
    try:
        assert pid == proc.pid
        time.sleep(0.4)
        first = real_criu.read_counter(proc.counter_file)
        time.sleep(0.4)
        second = real_criu.read_counter(proc.counter_file)
    finally:
        real_criu.stop_pid(pid)
    assert before is not None and after is not None and reached is not None and first is not None
    # resumed from the checkpointed value (not from 1, not from where the original stopped)...
    assert before <= first < reached, (before, after, first, reached)
    # ...and still counting
    assert second is not None and second > first
