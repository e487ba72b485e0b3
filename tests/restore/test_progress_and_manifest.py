"""The progress reporter (a bar on a terminal, ``restore_progress`` log lines otherwise) and the
pod manifests rendered for a restore."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
import yaml
from structlog.testing import capture_logs

from backupd.archive.metadata import CheckpointInfo
from backupd.model import COMMITTED, Archive
from backupd.restore import podmanifest
from backupd.restore.progress import Progress, ProgressReader


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_progress_is_structured_log_lines_at_an_interval() -> None:
    clock = Clock()
    with capture_logs() as logs:
        with Progress(1000, stream=io.StringIO(), tty=False, log_interval=5.0, clock=clock, archive_id="a1") as p:
            reader = ProgressReader(io.BytesIO(b"x" * 1000), p)
            reader.read(100)  # first bytes: logged at once
            clock.now += 1
            reader.read(100)  # within the interval: not logged
            clock.now += 5
            reader.read(300)  # interval passed: logged
            clock.now += 1
            while reader.read(100):
                pass
    lines = [entry for entry in logs if entry["event"] == "restore_progress"]
    assert [(e["bytes_done"], e.get("done", False)) for e in lines] == [(100, False), (500, False), (1000, True)]
    assert lines[-1]["percent"] == 100.0 and lines[-1]["bytes_total"] == 1000 and lines[-1]["ok"] is True
    assert all(e["archive_id"] == "a1" for e in lines)


def test_on_a_terminal_progress_is_one_redrawn_bar() -> None:
    clock = Clock()
    out = io.StringIO()
    with capture_logs() as logs:
        p = Progress(4 << 20, label="restore 0123abcd", stream=out, tty=True, clock=clock)
        p.advance(1 << 20)
        clock.now += 1
        p.advance(1 << 20)
        p.finish(ok=False)
    assert not logs
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 3 and out.getvalue().endswith("\n")
    assert "restore 0123abcd [#######.......................] 1.0 MiB / 4.0 MiB  25.0%" in frames[0]
    assert "2.0 MiB / 4.0 MiB  50.0%" in frames[-1]


def _archive(workload: str = "deployment/web", pod: str = "web-7d9f-abcde") -> Archive:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return Archive(id="0123456789abcdef", state=COMMITTED, policy="p", backend="local", key="k", node="node-a",
                   namespace="shop", pod=pod, workload=workload, container="app", image="app:1",
                   checkpoint_time=now, created_at=now)


INFO = CheckpointInfo(container="app", pod="web-7d9f-abcde", namespace="shop", engine="cri-o",
                      rootfs_image_name="docker.io/library/app:1", rootfs_image_ref="f" * 64,
                      labels={"app": "web", "pod-template-hash": "7d9f"},
                      bind_mounts=(("/data", "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc/mount"),))
IMAGE = "reg.example/dr/app@sha256:" + "e" * 64


def test_a_bare_pod_drops_controller_labels_and_names_the_prerequisites() -> None:
    text = podmanifest.render(_archive(), INFO, IMAGE, node_name="node-a", extra_labels={"restored": "yes"})
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("enable_criu_support = true" in line for line in header)
    assert any("drop_infra_ctr = false" in line for line in header)
    assert any("crictl pull docker.io/library/app:1" in line for line in header)
    assert any("/data  (was /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc/mount)" in line for line in header)
    assert any("only CRI-O can restore it" in line for line in header)
    pod = yaml.safe_load(text)
    assert pod["metadata"]["labels"] == {"app": "web", "restored": "yes"}
    assert pod["metadata"]["annotations"]["backupd.io/archive-id"] == "0123456789abcdef"
    assert pod["spec"] == {"nodeName": "node-a", "containers": [{"name": "app", "image": IMAGE}]}


def test_workload_templates_per_controller_kind() -> None:
    sts = yaml.safe_load(podmanifest.render(_archive("statefulset/db", "db-0"), INFO, IMAGE, as_workload=True))
    assert (sts["apiVersion"], sts["kind"], sts["metadata"]["name"]) == ("apps/v1", "StatefulSet", "db")
    assert sts["spec"]["serviceName"] == "db" and sts["spec"]["replicas"] == 1
    assert sts["spec"]["selector"]["matchLabels"] == sts["spec"]["template"]["metadata"]["labels"] == {"app": "web"}

    ds = yaml.safe_load(podmanifest.render(_archive("daemonset/agent"), INFO, IMAGE, as_workload=True,
                                           node_name="node-a"))
    assert ds["kind"] == "DaemonSet" and "replicas" not in ds["spec"]
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}

    bare = CheckpointInfo(container="app", pod="job-x", namespace="shop")
    job = yaml.safe_load(podmanifest.render(_archive("job/batch"), bare, IMAGE, as_workload=True))
    assert job["kind"] == "Job" and "selector" not in job["spec"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["metadata"]["labels"] == {"backupd.io/restore": "0123456789abcdef"}

    pod = yaml.safe_load(podmanifest.render(_archive("pod/debug", "debug"), INFO, IMAGE, as_workload=True))
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == "debug"


def test_rendered_manifests_are_valid_kubernetes_objects() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI package kubernetes-validate (test extra)")
    version = kv.latest_version()
    rendered = [podmanifest.render(_archive(), INFO, IMAGE, node_name="node-a")]
    for workload in ("deployment/web", "statefulset/db", "daemonset/agent", "replicaset/rs", "job/batch"):
        rendered.append(podmanifest.render(_archive(workload), INFO, IMAGE, as_workload=True, node_name="node-a"))
    for text in rendered:
        obj = yaml.safe_load(text)
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']} is invalid for Kubernetes {version}: {exc}")
    broken = yaml.safe_load(rendered[0])
    broken["spec"]["containers"][0]["imag"] = "typo"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)
