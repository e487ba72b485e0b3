"""``backupd inspect --output json`` agrees with ``checkpointctl inspect --ps-tree --stats
--format json`` on the same archives: synthetic ones of every engine, and real CRIU images
taken through backupd (read back both as the node's tar and by catalog id from the backend).

Skipped, with the reason, without checkpointctl (and, for the real images, without a working
CRIU >= 4 and root): install both with tools/install-checkpoint-tools.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backupd.app import App
from backupd.archive.inspect import inspect_file
from backupd.policy.document import parse_policies
from backupd.simulator import criu as real_criu
from backupd.simulator.server import NodeSimulator
from backupd.simulator.topology import parse_topology
from backupd.storage.read import inspect_catalog_archive
from tests.conftest import make_config

from .archives import containerd_archive, crio_archive, podman_archive

CHECKPOINTCTL = real_criu.find_checkpointctl()
needs_checkpointctl = pytest.mark.skipif(
    CHECKPOINTCTL is None, reason="checkpointctl not installed (package checkpointctl; tools/install-checkpoint-tools)"
)
CRIU_REASON = real_criu.criu_unavailable_reason()
needs_criu = pytest.mark.skipif(CRIU_REASON is not None, reason=f"real CRIU unavailable: {CRIU_REASON}")

SCALARS = ("container_name", "image", "id", "runtime", "created", "checkpointed", "engine", "ip")
STATS = ("freezing_time", "frozen_time", "memdump_time", "memwrite_time", "pages_scanned", "pages_written")


def checkpointctl(path: Path) -> dict[str, Any]:
    assert CHECKPOINTCTL is not None
    out = subprocess.run([CHECKPOINTCTL, "inspect", "--ps-tree", "--stats", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    [doc] = json.loads(out.stdout)
    return doc


def _tree(node: dict[str, Any] | None) -> Any:
    if node is None:
        return None
    # Go ranges over a map to attach children: their order is random there
    return (node["pid"], node["command"], sorted(_tree(c) for c in node.get("children") or []))


def comparable(doc: dict[str, Any], *, like: dict[str, Any]) -> dict[str, Any]:
    """The fields both tools print, in checkpointctl's shape (it omits empty values)."""
    out = {k: doc.get(k) or None for k in SCALARS}
    out["mac"] = doc.get("mac") if "mac" in like else None  # checkpointctl < 1.4 has no Podman network
    if "ip" not in like and doc.get("engine") == "Podman":
        out["ip"] = None
    out["checkpoint_size"] = {k: v for k, v in doc["checkpoint_size"].items() if v}
    stats = doc.get("statistics") or {}
    out["statistics"] = {k: stats.get(k, 0) for k in STATS}
    out["process_tree"] = _tree(doc.get("process_tree"))
    return out


def assert_agree(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert comparable(ours, like=theirs) == comparable(theirs, like=theirs)
    # the list, spelled out
    assert ours["container_name"] == theirs["container_name"] and ours["image"] == theirs["image"]
    assert ours["engine"] == theirs["engine"]
    assert ours["statistics"]["pages_written"] == theirs["statistics"]["pages_written"] > 0
    assert _names(ours["process_tree"]) == _names(theirs["process_tree"])


def _names(node: dict[str, Any]) -> list[str]:
    return sorted([node["command"], *[n for c in node.get("children") or [] for n in _names(c)]])


@needs_checkpointctl
@pytest.mark.parametrize("make", [crio_archive, containerd_archive, podman_archive],
                         ids=["cri-o", "containerd", "podman"])  # fmt: skip
def test_synthetic_archives_agree(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path / "a.tar")
    theirs = checkpointctl(path)
    assert_agree(inspect_file(path).to_json(), theirs)  # the CLI prints exactly this (test_inspect)


COUNTER_TOPOLOGY = {"node": "criu-node", "pods": [{
    "namespace": "default", "name": "counter",
    "containers": [{"name": "count", "image": "busybox:1.36", "processes": ["counter"]}],
}]}  # fmt: skip
POLICY = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: counter}
spec:
  selector: {namespaces: [default], containers: [count]}
  schedule: "@every 1h"
  backend: local
  retention: {keepLast: 2}
  keepOnNode: 1
"""


@needs_checkpointctl
@needs_criu
def test_real_criu_images_agree_by_file_and_by_catalog_id(tmp_path: Path) -> None:
    with NodeSimulator(tmp_path / "node", topology=parse_topology(COUNTER_TOPOLOGY), criu=True,
                       memory_bytes=1 << 20) as sim:  # fmt: skip
        proc = sim.process("default", "counter", "count")
        assert sim.criu_enabled and proc is not None
        proc.wait_for_counter(2)
        app = App(make_config(tmp_path, sim, f"sqlite:///{tmp_path / 'catalog.db'}"))
        try:
            app.catalog.upgrade()
            policy = parse_policies(POLICY, "p.yaml", backends=["local"])[0]
            app.catalog.apply_policies([(policy.name, policy.canonical_json())])
            result = app.runner.cycle(policy)
            assert not result.failed, result
            [archive] = app.catalog.list_archives(policy="counter")
            node_tar = sim.checkpoint_dir / str(archive.node_path)
            theirs = checkpointctl(node_tar)
            by_file = inspect_file(node_tar).to_json()
            by_id = inspect_catalog_archive(archive, app.backends["local"]).to_json()
        finally:
            app.close()
    assert_agree(by_file, theirs)
    assert_agree(by_id, theirs)
    # real images: the process is the simulator's counter, dumped with its own pid
    assert by_id["process_tree"]["pid"] == proc.pid and by_id["process_tree"]["command"] == "counter"
    assert by_id["archive"]["id"] == archive.id and by_id["tar_size"] == archive.tar_size
    assert by_id["statistics"]["pages_written"] > 256  # the 1 MiB ballast at least
