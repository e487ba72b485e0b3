"""Pods, containers and the identities retention groups by. Pure: JSON in, values out.

Retention groups archives by *workload* and *replica* (namespace + owning controller + replica
+ container), not by pod name: otherwise every Deployment rollout would start a new group that
``keepLast`` protects forever. A ReplicaSet owned by a Deployment is named
``<deployment>-<pod-template-hash>`` and its pods carry the ``pod-template-hash`` label, so the
Deployment is recovered from the pod alone, without reading ReplicaSets from the API server
(backupd has no RBAC for that).

The *replica* (:func:`replica_of`) is the identity a pod keeps across restarts and rollouts,
where its controller gives it one: a StatefulSet pod's name (``db-0`` holds its own data), a
DaemonSet pod's node (one pod per node, renamed by every rollout). The pods of a Deployment,
ReplicaSet or Job are interchangeable and renamed on every rollout, so they are one replica,
``""``, unless the policy says ``groupBy: pod``; a bare pod already is its workload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from backupd.errors import KubeletProtocolError

#: an RFC 1123 label: namespaces, container names, policy names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
#: an RFC 1123 subdomain (without the 253-character bound): names of pods and controllers
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Workload:
    kind: str  # lower-case controller kind: deployment, statefulset, daemonset, job, replicaset, pod
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def segment(self) -> str:
        """The storage-layout path segment, e.g. ``deployment-web``.

        Kinds contain no ``-``, so the first ``-`` always splits kind from name.
        """
        return f"{self.kind}-{self.name}"

    @classmethod
    def parse(cls, text: str) -> Workload:
        """``deployment/web`` (the form shown everywhere) or ``deployment-web`` (the segment)."""
        for sep in ("/", "-"):
            kind, found, name = text.partition(sep)
            if found and kind in KINDS and name:
                return cls(kind, name)
        raise ValueError(f"expected a workload such as deployment/web, got {text!r}")


KINDS = ("deployment", "statefulset", "daemonset", "job", "cronjob", "replicaset", "pod")

#: a policy's ``groupBy``: ``replica`` (the default, see :func:`replica_of`) or ``pod``
GROUP_BY_REPLICA: Final = "replica"
GROUP_BY_POD: Final = "pod"


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    image_id: str = ""
    container_id: str = ""
    running: bool = False


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str = ""
    node_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    owner_kind: str = ""
    owner_name: str = ""
    containers: tuple[Container, ...] = ()

    @property
    def workload(self) -> Workload:
        return workload_of(self)


def workload_of(pod: Pod) -> Workload:
    kind = pod.owner_kind
    if kind == "ReplicaSet":
        template_hash = pod.labels.get("pod-template-hash", "")
        if template_hash and pod.owner_name.endswith("-" + template_hash):
            return Workload("deployment", pod.owner_name[: -len(template_hash) - 1])
        return Workload("replicaset", pod.owner_name)
    if kind in ("StatefulSet", "DaemonSet", "Job"):
        return Workload(kind.lower(), pod.owner_name)
    # Bare pods, static pods (owned by their Node) and unknown controllers: the pod itself.
    return Workload("pod", pod.name)


def replica_identity(kind: str, pod: str, node: str, group_by: str = GROUP_BY_REPLICA) -> str:
    """The replica a pod named ``pod`` on ``node`` is of its ``kind`` of workload.

    StatefulSet: the pod name (its stable ordinal identity); DaemonSet: the node (its pods are
    renamed by every rollout, but there is one per node); a bare pod: ``""`` (it is the
    workload); Deployment, ReplicaSet, Job and CronJob: ``""`` (interchangeable pods), or the
    pod name when ``group_by`` is ``pod``.
    """
    if kind == "statefulset":
        return pod
    if kind == "daemonset":
        return node
    if kind == "pod":
        return ""
    return pod if group_by == GROUP_BY_POD else ""


def replica_of(pod: Pod, node: str, group_by: str = GROUP_BY_REPLICA) -> str:
    """The replica ``pod``, checkpointed on ``node``, is of its workload (see :func:`replica_identity`)."""
    return replica_identity(pod.workload.kind, pod.name, node, group_by)


def recorded_replica(workload: str, pod: str, node: str) -> str:
    """The replica of an archive recorded before replicas were (a manifest or catalog row
    without one): the default grouping, from its ``kind/name`` workload, pod and node. The
    catalog migration that added replicas backfills existing rows the same way."""
    return replica_identity(workload.partition("/")[0], pod, node)


def parse_pod(item: dict[str, Any]) -> Pod:
    """One ``v1.Pod`` of the kubelet's ``/pods`` PodList."""
    try:
        meta = item["metadata"]
        spec = item.get("spec") or {}
        status = item.get("status") or {}
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        if owner is None and meta.get("ownerReferences"):
            owner = meta["ownerReferences"][0]
        statuses = {s["name"]: s for s in status.get("containerStatuses") or []}
        containers = []
        for c in spec.get("containers") or []:
            st = statuses.get(c["name"], {})
            containers.append(
                Container(
                    name=c["name"],
                    image=st.get("image") or c.get("image", ""),
                    image_id=st.get("imageID", ""),
                    container_id=st.get("containerID", ""),
                    running="running" in (st.get("state") or {}),
                )
            )
        return Pod(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            node_name=spec.get("nodeName", ""),
            labels=dict(meta.get("labels") or {}),
            owner_kind=owner.get("kind", "") if owner else "",
            owner_name=owner.get("name", "") if owner else "",
            containers=tuple(containers),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise KubeletProtocolError(f"the kubelet's /pods answer has a malformed pod ({exc!r})") from None
