"""backupd's domain: pods and workloads, archives and runs, their states. Pure: it imports
nothing else of backupd, and every other module speaks these types (the catalog maps them to
its SQLAlchemy rows, which never leave ``backupd.catalog``).

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
from datetime import UTC, datetime
from typing import Any, Final, overload

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


PENDING, COMMITTED, DELETING, FAILED = "pending", "committed", "deleting", "failed"
ARCHIVE_STATES = (PENDING, COMMITTED, DELETING, FAILED)

RUNNING, SUCCEEDED, RUN_FAILED, SKIPPED = "running", "succeeded", "failed", "skipped"


@overload
def rfc3339(moment: datetime) -> str: ...
@overload
def rfc3339(moment: None) -> None: ...
def rfc3339(moment: datetime | None) -> str | None:
    """An aware time as RFC 3339 UTC with ``Z``, as every JSON output of backupd writes it
    (``None`` stays ``None``: a time not known yet)."""
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_fields(value: Any) -> dict[str, Any]:
    """A catalog dataclass as JSON-ready fields, times in RFC 3339 UTC."""
    d = {f: getattr(value, f) for f in value.__dataclass_fields__}
    for k, v in d.items():
        if isinstance(v, datetime):
            d[k] = rfc3339(v)
    return d


@dataclass(frozen=True)
class Archive:
    """An archive as the catalog knows it: one checkpoint of one container, stored in a backend."""

    # The API lists to_json() and generates its OpenAPI schema from these fields; the manifest
    # beside the stored object records the same facts (backupd.storage.layout.ARCHIVE_FACTS).

    id: str
    state: str
    policy: str
    backend: str
    key: str
    node: str
    namespace: str
    pod: str
    workload: str
    container: str
    image: str
    checkpoint_time: datetime
    created_at: datetime
    committed_at: datetime | None = None
    tar_size: int | None = None
    stored_size: int | None = None
    tar_sha256: str | None = None
    stored_sha256: str | None = None
    compression: str = "zstd"
    encryption: str = "none"
    pinned: bool = False
    node_path: str | None = None
    node_tar_deleted: bool = False
    error: str | None = None
    replica: str = ""  # defaulted, hence last; see backupd.model.replica_of

    @property
    def group(self) -> tuple[str, str, str, str, str]:
        """What retention groups by: policy, namespace, workload, replica, container."""
        return (self.policy, self.namespace, self.workload, self.replica, self.container)

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    """What retention needs of an archive; a tenth of a row, for planning over millions."""

    id: str
    state: str
    policy: str
    namespace: str
    workload: str
    replica: str
    container: str
    checkpoint_time: datetime
    stored_size: int | None
    pinned: bool


@dataclass(frozen=True)
class CatalogTotals:
    """What the catalog holds now, for the state metrics (:meth:`Catalog.totals`)."""

    #: policy -> (committed archives, their stored bytes)
    retained: dict[str, tuple[int, int]]
    #: (namespace, workload, container) -> when its newest successful checkpoint run finished
    last_success: dict[tuple[str, str, str], datetime]


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Aggregates of one retention group's committed archives (:meth:`Catalog.group_stats`)."""

    policy: str
    namespace: str
    workload: str
    replica: str
    container: str
    archives: int
    stored_bytes: int
    oldest: datetime
    newest: datetime
    pinned: int
    pinned_bytes: int

    @property
    def group(self) -> tuple[str, str, str, str, str]:
        """What retention groups by, as :attr:`Archive.group`."""
        return (self.policy, self.namespace, self.workload, self.replica, self.container)


@dataclass(frozen=True)
class Run:
    """One run of a policy's work (a checkpoint, prune, verify or delete) and its outcome."""

    # The API lists to_json() and generates its OpenAPI schema from these fields.

    id: int
    kind: str
    policy: str | None
    node: str
    namespace: str | None
    pod: str | None
    workload: str | None
    container: str | None
    archive_id: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    error_kind: str | None
    error: str | None
    bytes_in: int
    bytes_out: int
    duration_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(frozen=True)
class StoredPolicy:
    name: str
    spec_json: str
    generation: int
    created_at: datetime
    updated_at: datetime


def now_utc() -> datetime:
    return datetime.now(UTC)

