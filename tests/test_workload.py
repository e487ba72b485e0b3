from __future__ import annotations

import pytest

from backupd.model import Pod, Workload, recorded_replica, replica_of, workload_of


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
    before = Pod("default", "web-aaa-1", labels={"pod-template-hash": "aaa"},
                 owner_kind="ReplicaSet", owner_name="web-aaa")
    after = Pod("default", "web-bbb-2", labels={"pod-template-hash": "bbb"},
                owner_kind="ReplicaSet", owner_name="web-bbb")
    assert workload_of(before) == workload_of(after) == Workload("deployment", "web")


@pytest.mark.parametrize("text", ["deployment/web", "deployment-web"])
def test_workload_parse(text: str) -> None:
    assert Workload.parse(text) == Workload("deployment", "web")
    assert Workload("deployment", "my-app").segment == "deployment-my-app"
    assert Workload.parse("deployment-my-app") == Workload("deployment", "my-app")


def test_workload_parse_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="deployment/web"):
        Workload.parse("web")


@pytest.mark.parametrize(
    ("owner_kind", "owner_name", "pod_name", "labels", "by_replica", "by_pod"),
    [
        # a StatefulSet pod is its ordinal identity, whatever groupBy says
        ("StatefulSet", "db", "db-0", {}, "db-0", "db-0"),
        # one DaemonSet pod per node; its name changes with every rollout, its node does not
        ("DaemonSet", "agent", "agent-x7k2p", {}, "node-b", "node-b"),
        # interchangeable pods, renamed by every rollout: the workload is one group unless groupBy: pod
        ("ReplicaSet", "web-7d9f8c6b5", "web-7d9f8c6b5-abc12", {"pod-template-hash": "7d9f8c6b5"}, "",
         "web-7d9f8c6b5-abc12"),
        ("ReplicaSet", "standalone", "standalone-q2w3e", {}, "", "standalone-q2w3e"),
        ("Job", "backup-29123456", "backup-29123456-zz9xq", {}, "", "backup-29123456-zz9xq"),
        # a bare pod (or a static pod) already is its workload
        ("", "", "debug", {}, "", ""),
        ("Node", "node-b", "kube-proxy-node-b", {}, "", ""),
    ],
)
def test_replica_per_workload_kind(owner_kind: str, owner_name: str, pod_name: str, labels: dict[str, str],
                                   by_replica: str, by_pod: str) -> None:
    pod = Pod("default", pod_name, node_name="node-b", labels=labels, owner_kind=owner_kind, owner_name=owner_name)
    assert replica_of(pod, "node-b") == replica_of(pod, "node-b", "replica") == by_replica
    assert replica_of(pod, "node-b", "pod") == by_pod
    # an archive recorded without a replica derives the default one from what it did record
    assert recorded_replica(str(pod.workload), pod.name, "node-b") == by_replica


def test_a_daemonset_rollout_stays_the_same_replica_and_nodes_differ() -> None:
    before = Pod("default", "agent-aaaaa", owner_kind="DaemonSet", owner_name="agent")
    after = Pod("default", "agent-bbbbb", owner_kind="DaemonSet", owner_name="agent")
    assert replica_of(before, "node-a") == replica_of(after, "node-a") == "node-a"
    assert replica_of(before, "node-b") == "node-b"
