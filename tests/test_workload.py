from __future__ import annotations

import pytest

from backupd.workload import Pod, Workload, workload_of


@pytest.mark.parametrize(
    ("owner_kind", "owner_name", "labels", "expected"),
    [
        ("ReplicaSet", "web-7d9f8c6b5", {"pod-template-hash": "7d9f8c6b5"}, "deployment/web"),
        ("ReplicaSet", "my-app-v2-5f6c7d8e9", {"pod-template-hash": "5f6c7d8e9"}, "deployment/my-app-v2"),
        # a ReplicaSet not created by a Deployment has no matching hash suffix
        ("ReplicaSet", "standalone", {"pod-template-hash": "abc"}, "replicaset/standalone"),
        ("ReplicaSet", "standalone", {}, "replicaset/standalone"),
        ("StatefulSet", "db", {}, "statefulset/db"),
        ("DaemonSet", "agent", {}, "daemonset/agent"),
        ("Job", "backup-29123456", {}, "job/backup-29123456"),
        ("Node", "node-a", {}, "pod/the-pod"),  # static pod mirror
        ("", "", {}, "pod/the-pod"),
    ],
)
def test_workload_identity(owner_kind: str, owner_name: str, labels: dict[str, str], expected: str) -> None:
    pod = Pod(namespace="default", name="the-pod", labels=labels, owner_kind=owner_kind, owner_name=owner_name)
    assert str(workload_of(pod)) == expected


def test_rollout_keeps_the_same_workload() -> None:
    before = Pod("default", "web-aaa-1", labels={"pod-template-hash": "aaa"}, owner_kind="ReplicaSet", owner_name="web-aaa")
    after = Pod("default", "web-bbb-2", labels={"pod-template-hash": "bbb"}, owner_kind="ReplicaSet", owner_name="web-bbb")
    assert workload_of(before) == workload_of(after) == Workload("deployment", "web")


@pytest.mark.parametrize("text", ["deployment/web", "deployment-web"])
def test_workload_parse(text: str) -> None:
    assert Workload.parse(text) == Workload("deployment", "web")
    assert Workload("deployment", "my-app").segment == "deployment-my-app"
    assert Workload.parse("deployment-my-app") == Workload("deployment", "my-app")


def test_workload_parse_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="deployment/web"):
        Workload.parse("web")
