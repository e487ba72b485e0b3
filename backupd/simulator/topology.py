"""The pods a simulated node runs: a small declarative spec and its materialised form.

A topology file (YAML or JSON) looks like::

    node: node-a                      # optional, default "sim-node"
    pods:
      - namespace: default
        owner: {kind: Deployment, name: web}
        replicas: 2
        labels: {app: web}
        containers:
          - {name: nginx, image: nginx:1.27, memory: 16Mi, processes: [nginx, nginx]}
      - namespace: default
        name: debug                   # a bare pod (no owner) needs a name
        containers:
          - {name: shell, image: busybox:1.36}
      - namespace: shop
        owner: {kind: Deployment, name: cart}
        containers:
          - {name: cart, image: ghcr.io/example/cart:2.3.1, state: waiting}   # CrashLoopBackOff

``owner.kind`` is Deployment (pods owned by ReplicaSet ``<name>-<hash>``), ReplicaSet,
StatefulSet (pods ``<name>-<i>``), DaemonSet, Job or omitted. A container's ``state`` is
``running`` (default), ``waiting`` (reason default CrashLoopBackOff) or ``terminated``;
``running: false`` is a shorthand for ``waiting``. ``memory`` is a Kubernetes quantity.

Materialising (:func:`materialize`) derives every identifier (pod UID, container IDs, image
digests, pod-template hashes, pod IPs) deterministically from the seed and the names, so two
simulators with the same seed and topology describe the same pods.

Why one module of ~600 lines: the spec and its materialised form are the two halves of one
file format -- every key validated in the first half is consumed in the second, and the
``v1.Pod`` JSON the simulator serves is derived from nothing else -- so a change to the format
stays within one file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backupd import sizes
from backupd.errors import InvalidInput
from backupd.model import rfc3339

__all__ = [
    "ContainerSpec",
    "PodSpec",
    "Topology",
    "Container",
    "Pod",
    "default_topology",
    "load_topology",
    "parse_topology",
    "materialize",
    "parse_quantity",
]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_OWNER_KINDS = ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job")
_STATES = ("running", "waiting", "terminated")
def parse_quantity(value: int | str) -> int:
    """Bytes from an int or a Kubernetes quantity string (``64Mi``, ``1.5Gi``, ``1G``, ``512``)."""
    try:
        return sizes.parse_quantity(value)
    except ValueError as exc:
        raise InvalidInput(f"not a byte quantity: {exc} (use e.g. 512, 64Mi, 1Gi)") from None


# -- spec (what a topology file says) ------------------------------------------------------


@dataclass
class ContainerSpec:
    name: str
    image: str
    memory: int | None = None  # bytes of simulated memory; None = the simulator's default
    state: str = "running"
    reason: str | None = None
    exit_code: int | None = None
    processes: list[str] | None = None  # comm of each simulated process; first is the root


@dataclass
class PodSpec:
    namespace: str
    containers: list[ContainerSpec]
    name: str | None = None
    owner_kind: str | None = None
    owner_name: str | None = None
    replicas: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Topology:
    pods: list[PodSpec]
    node_name: str = "sim-node"


def _check_label(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value) or len(value) > 63:
        raise InvalidInput(f"{what} must be a DNS-1123 label (lower-case, digits, '-'), not {value!r}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidInput(f"{what}: unknown key(s) {', '.join(unknown)}")


def _parse_container(data: Any, what: str) -> ContainerSpec:
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{what} must be a mapping")
    _check_keys(data, ("name", "image", "memory", "state", "running", "reason", "exit_code", "processes"), what)
    name = _check_label(data.get("name"), f"{what}.name")
    image = data.get("image")
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        raise InvalidInput(f"{what}.image must be an image reference, not {image!r}")
    state = data.get("state", "running")
    if "running" in data:
        state = "running" if data["running"] else "waiting"
    if state not in _STATES:
        raise InvalidInput(f"{what}.state must be one of {', '.join(_STATES)}, not {state!r}")
    processes = data.get("processes")
    if processes is not None:
        if not isinstance(processes, list) or not processes or not all(isinstance(p, str) and p for p in processes):
            raise InvalidInput(f"{what}.processes must be a non-empty list of process names")
    memory = data.get("memory")
    exit_code = data.get("exit_code")
    if exit_code is not None and not isinstance(exit_code, int):
        raise InvalidInput(f"{what}.exit_code must be an integer")
    return ContainerSpec(
        name=name,
        image=image,
        memory=None if memory is None else parse_quantity(memory),
        state=state,
        reason=data.get("reason"),
        exit_code=exit_code,
        processes=list(processes) if processes else None,
    )


def _parse_pod(data: Any, what: str) -> PodSpec:
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{what} must be a mapping")
    _check_keys(data, ("namespace", "name", "owner", "replicas", "labels", "annotations", "containers"), what)
    namespace = _check_label(data.get("namespace", "default"), f"{what}.namespace")
    owner = data.get("owner")
    owner_kind = owner_name = None
    if owner is not None:
        if not isinstance(owner, Mapping):
            raise InvalidInput(f"{what}.owner must be a mapping with kind and name")
        _check_keys(owner, ("kind", "name"), f"{what}.owner")
        owner_kind = owner.get("kind")
        if owner_kind not in _OWNER_KINDS:
            raise InvalidInput(f"{what}.owner.kind must be one of {', '.join(_OWNER_KINDS)}, not {owner_kind!r}")
        owner_name = _check_label(owner.get("name"), f"{what}.owner.name")
    name = data.get("name")
    if name is not None:
        name = _check_label(name, f"{what}.name")
    elif owner is None:
        raise InvalidInput(f"{what}: a pod without an owner needs a name")
    replicas = data.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 1000:
        raise InvalidInput(f"{what}.replicas must be an integer from 1 to 1000")
    if replicas > 1 and (owner is None or name is not None):
        raise InvalidInput(f"{what}: replicas need an owner and no fixed pod name")
    containers = data.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InvalidInput(f"{what}.containers must be a non-empty list")
    parsed = [_parse_container(c, f"{what}.containers[{i}]") for i, c in enumerate(containers)]
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{what}: container names must be unique")
    labels = data.get("labels") or {}
    annotations = data.get("annotations") or {}
    for m, label in ((labels, "labels"), (annotations, "annotations")):
        if not isinstance(m, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
            raise InvalidInput(f"{what}.{label} must map strings to strings")
    return PodSpec(
        namespace=namespace,
        containers=parsed,
        name=name,
        owner_kind=owner_kind,
        owner_name=owner_name,
        replicas=replicas,
        labels=dict(labels),
        annotations=dict(annotations),
    )


def parse_topology(data: Any) -> Topology:
    """Validate a decoded topology document; raises ``InvalidInput`` naming the bad key."""
    if not isinstance(data, Mapping):
        raise InvalidInput("a topology must be a mapping with a 'pods' list")
    _check_keys(data, ("node", "pods"), "topology")
    pods = data.get("pods")
    if not isinstance(pods, list) or not pods:
        raise InvalidInput("topology.pods must be a non-empty list")
    node = data.get("node", "sim-node")
    if not isinstance(node, str) or not node:
        raise InvalidInput("topology.node must be a node name")
    return Topology(pods=[_parse_pod(p, f"pods[{i}]") for i, p in enumerate(pods)], node_name=node)


def load_topology(path: str | Path) -> Topology:
    """Read a YAML or JSON topology file."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot parse topology file {path}: {exc}") from None
    return parse_topology(data)


def default_topology() -> Topology:
    """The demo node: two namespaces, every kind of owner, a crash-looping container."""
    return parse_topology(
        {
            "node": "sim-node",
            "pods": [
                {
                    "namespace": "default",
                    "owner": {"kind": "Deployment", "name": "web"},
                    "replicas": 2,
                    "labels": {"app": "web", "tier": "frontend"},
                    "containers": [
                        {"name": "nginx", "image": "nginx:1.27", "processes": ["nginx", "nginx", "nginx"]}
                    ],
                },
                {
                    "namespace": "shop",
                    "owner": {"kind": "StatefulSet", "name": "db"},
                    "labels": {"app": "db"},
                    "containers": [
                        {"name": "postgres", "image": "postgres:16.4",
                         "processes": ["postgres", "postgres", "postgres", "postgres"]},
                        {"name": "exporter", "image": "quay.io/prometheuscommunity/postgres-exporter:v0.15.0",
                         "processes": ["postgres_export"]},
                    ],
                },
                {
                    "namespace": "shop",
                    "owner": {"kind": "Deployment", "name": "cart"},
                    "labels": {"app": "cart"},
                    "containers": [
                        {"name": "cart", "image": "ghcr.io/example/cart:2.3.1", "state": "waiting"}
                    ],
                },
                {
                    "namespace": "default",
                    "owner": {"kind": "DaemonSet", "name": "log-agent"},
                    "labels": {"app": "log-agent"},
                    "containers": [
                        {"name": "fluent-bit", "image": "fluent/fluent-bit:3.1", "processes": ["fluent-bit"]}
                    ],
                },
                {
                    "namespace": "default",
                    "name": "debug",
                    "labels": {"run": "debug"},
                    "containers": [{"name": "shell", "image": "busybox:1.36", "processes": ["sh"]}],
                },
            ],
        }
    )  # fmt: skip


# -- materialised pods (what /pods returns and what gets checkpointed) -----------------------


@dataclass
class Container:
    name: str
    image: str  # as written in the pod spec
    image_name: str  # normalised, e.g. docker.io/library/nginx:1.27
    image_ref: str  # docker.io/library/nginx@sha256:<digest>
    image_id: str  # 64-hex local image ID (CRI-O ImageRef / config.dump rootfsImageRef)
    container_id: str  # 64-hex
    state: str
    reason: str | None
    exit_code: int | None
    memory: int | None
    processes: list[str]
    created_at: dt.datetime
    restart_count: int = 0


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    node_name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    owner_kind: str | None  # kind of the direct ownerReference (ReplicaSet for Deployments)
    owner_name: str | None
    owner_uid: str | None
    containers: list[Container]
    ip: str
    created_at: dt.datetime
    generate_name: str | None = None

    def container(self, name: str) -> Container | None:
        for c in self.containers:
            if c.name == name:
                return c
        return None

    def to_v1(self, host_ip: str = "192.168.49.2") -> dict[str, Any]:
        """The pod as the kubelet's ``GET /pods`` renders a ``v1.Pod``."""
        return _pod_v1(self, host_ip)


def _hexdigest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()


def _pod_suffix(seed: int, *parts: object) -> str:
    # Kubernetes' rand.String alphabet: consonants and digits without vowels or confusables
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = hashlib.sha256(f"{seed}\x00{parts}".encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:5])


def _template_hash(seed: int, *parts: object) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = hashlib.sha256(f"{seed}\x00tpl\x00{parts}".encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:10])


def normalise_image(image: str) -> str:
    """``nginx:1.27`` → ``docker.io/library/nginx:1.27`` (the name CRI-O reports)."""
    name = image
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        name += ":latest"
    return name


def _default_processes(image: str) -> list[str]:
    base = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return [base[:15] or "app"]


def materialize(topology: Topology, *, seed: int = 0, now: dt.datetime | None = None) -> list[Pod]:
    """Expand replicas and derive every identifier; deterministic for (topology, seed)."""
    now = now or dt.datetime.now(dt.UTC)
    now = now.astimezone(dt.UTC).replace(microsecond=0)
    pods: list[Pod] = []
    seen: set[tuple[str, str]] = set()
    for index, spec in enumerate(topology.pods):
        for replica in range(spec.replicas):
            pod = _materialize_pod(spec, replica, seed, now, topology.node_name, len(pods))
            key = (pod.namespace, pod.name)
            if key in seen:
                raise InvalidInput(f"pods[{index}]: pod {pod.namespace}/{pod.name} is defined twice")
            seen.add(key)
            pods.append(pod)
    return pods


def materialize_pod(spec: PodSpec, *, seed: int = 0, node_name: str = "sim-node", index: int = 0,
                    now: dt.datetime | None = None) -> list[Pod]:
    """Materialise one pod spec (all its replicas), e.g. to add it to a running simulator."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    return [_materialize_pod(spec, r, seed, now, node_name, index + r) for r in range(spec.replicas)]


def _materialize_pod(spec: PodSpec, replica: int, seed: int, now: dt.datetime, node: str, ordinal: int) -> Pod:
    labels = dict(spec.labels)
    owner_kind, owner_name, generate_name = spec.owner_kind, spec.owner_name, None
    if spec.owner_kind == "Deployment":
        tpl = _template_hash(seed, spec.namespace, spec.owner_name)
        owner_kind, owner_name = "ReplicaSet", f"{spec.owner_name}-{tpl}"
        labels["pod-template-hash"] = tpl
        generate_name = f"{owner_name}-"
        name = spec.name or f"{owner_name}-{_pod_suffix(seed, spec.namespace, owner_name, replica)}"
    elif spec.owner_kind == "StatefulSet":
        name = spec.name or f"{spec.owner_name}-{replica}"
        generate_name = f"{spec.owner_name}-"
        labels.setdefault("statefulset.kubernetes.io/pod-name", name)
        labels.setdefault("apps.kubernetes.io/pod-index", str(replica))
        revision = _template_hash(seed, spec.namespace, spec.owner_name)
        labels.setdefault("controller-revision-hash", f"{spec.owner_name}-{revision}")
    elif spec.owner_kind in ("DaemonSet", "ReplicaSet", "Job"):
        generate_name = f"{spec.owner_name}-"
        name = spec.name or f"{spec.owner_name}-{_pod_suffix(seed, spec.namespace, spec.owner_name, replica)}"
        if spec.owner_kind == "DaemonSet":
            labels.setdefault("controller-revision-hash", _template_hash(seed, spec.namespace, spec.owner_name))
            labels.setdefault("pod-template-generation", "1")
        elif spec.owner_kind == "Job":
            labels.setdefault("batch.kubernetes.io/job-name", spec.owner_name or "")
    else:
        assert spec.name is not None
        name = spec.name
    if len(name) > 63:
        raise InvalidInput(f"pod name {name!r} is longer than 63 characters")
    uid = str(uuid.UUID(_hexdigest(seed, "pod", spec.namespace, name)[:32], version=4))
    owner_uid = (
        str(uuid.UUID(_hexdigest(seed, "owner", spec.namespace, owner_kind, owner_name)[:32], version=4))
        if owner_kind else None
    )  # fmt: skip
    # Pods were created some minutes to hours before the simulator started; stable per seed.
    age = dt.timedelta(minutes=5 + int(_hexdigest(seed, "age", spec.namespace, name)[:6], 16) % 2880)
    created = now - age
    octet = int(_hexdigest(seed, "ip", spec.namespace, name)[:4], 16)
    ip = f"10.85.{(octet >> 8) % 250 + 1}.{octet % 250 + 2}"
    containers = []
    for c in spec.containers:
        image_name = normalise_image(c.image)
        digest = _hexdigest("digest", image_name)
        repo = image_name.rsplit(":", 1)[0] if "@" not in image_name else image_name.split("@")[0]
        restart = 0
        if c.state == "waiting":
            restart = 5 + int(_hexdigest(seed, "restarts", spec.namespace, name, c.name)[:2], 16) % 40
        containers.append(
            Container(
                name=c.name,
                image=c.image,
                image_name=image_name,
                image_ref=f"{repo}@sha256:{digest}",
                image_id=_hexdigest("image-id", image_name),
                container_id=_hexdigest(seed, "container", spec.namespace, name, c.name),
                state=c.state,
                reason=c.reason,
                exit_code=c.exit_code,
                memory=c.memory,
                processes=list(c.processes or _default_processes(c.image)),
                created_at=created + dt.timedelta(seconds=3),
                restart_count=restart,
            )
        )
    return Pod(
        namespace=spec.namespace,
        name=name,
        uid=uid,
        node_name=node,
        labels=labels,
        annotations=dict(spec.annotations),
        owner_kind=owner_kind,
        owner_name=owner_name,
        owner_uid=owner_uid,
        containers=containers,
        ip=ip,
        created_at=created,
        generate_name=generate_name,
    )


def _k8s_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_api_version(kind: str) -> str:
    return "batch/v1" if kind == "Job" else "apps/v1"


def _container_status(pod: Pod, container: Container) -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": container.name,
        "state": {},
        "lastState": {},
        "ready": container.state == "running",
        "restartCount": container.restart_count,
        "image": container.image_name,
        "imageID": container.image_ref,
        "containerID": f"cri-o://{container.container_id}",
        "started": container.state == "running",
    }
    if container.state == "running":
        status["state"] = {"running": {"startedAt": _k8s_time(container.created_at + dt.timedelta(seconds=1))}}
    elif container.state == "waiting":
        reason = container.reason or "CrashLoopBackOff"
        waiting: dict[str, Any] = {"reason": reason}
        if reason == "CrashLoopBackOff":
            waiting["message"] = (f"back-off 5m0s restarting failed container={container.name} "
                                  f"pod={pod.name}_{pod.namespace}({pod.uid})")
        status["state"] = {"waiting": waiting}
        finished = pod.created_at + dt.timedelta(minutes=5 * max(container.restart_count, 1))
        status["lastState"] = {
            "terminated": {
                "exitCode": 1 if container.exit_code is None else container.exit_code,
                "reason": "Error",
                "startedAt": _k8s_time(finished - dt.timedelta(seconds=2)),
                "finishedAt": _k8s_time(finished),
                "containerID": f"cri-o://{container.container_id}",
            }
        }
    else:
        code = 0 if container.exit_code is None else container.exit_code
        status["state"] = {
            "terminated": {
                "exitCode": code,
                "reason": container.reason or ("Completed" if code == 0 else "Error"),
                "startedAt": _k8s_time(container.created_at + dt.timedelta(seconds=1)),
                "finishedAt": _k8s_time(container.created_at + dt.timedelta(seconds=30)),
                "containerID": f"cri-o://{container.container_id}",
            }
        }
    return status


def _pod_v1(pod: Pod, host_ip: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod.uid,
        "resourceVersion": str(1000 + int(pod.uid[:4], 16)),
        "creationTimestamp": _k8s_time(pod.created_at),
        "labels": dict(pod.labels),
        "annotations": {
            "kubernetes.io/config.seen": rfc3339(pod.created_at),
            "kubernetes.io/config.source": "api",
            **pod.annotations,
        },
    }
    if pod.generate_name:
        metadata["generateName"] = pod.generate_name
    if pod.owner_kind:
        metadata["ownerReferences"] = [
            {
                "apiVersion": _owner_api_version(pod.owner_kind),
                "kind": pod.owner_kind,
                "name": pod.owner_name,
                "uid": pod.owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    all_terminated = all(c.state == "terminated" for c in pod.containers)
    if all_terminated:
        phase = "Succeeded" if all((c.exit_code or 0) == 0 for c in pod.containers) else "Failed"
    else:
        phase = "Running"
    ready = all(c.state == "running" for c in pod.containers)
    started = _k8s_time(pod.created_at + dt.timedelta(seconds=1))

    def condition(kind: str, ok: bool) -> dict[str, Any]:
        cond: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                                "lastTransitionTime": started}
        if not ok:
            cond["reason"] = "ContainersNotReady"
            waiting = [c.name for c in pod.containers if c.state != "running"]
            cond["message"] = f"containers with unready status: [{' '.join(waiting)}]"
        return cond

    return {
        "metadata": metadata,
        "spec": {
            "volumes": [
                {"name": f"kube-api-access-{_pod_suffix(0, pod.uid)}", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}
            ],
            "containers": [
                {
                    "name": c.name,
                    "image": c.image,
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
                for c in pod.containers
            ],
            "restartPolicy": "Never" if pod.owner_kind == "Job" else "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": pod.node_name,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
        },
        "status": {
            "phase": phase,
            "conditions": [
                condition("PodReadyToStartContainers", True),
                condition("Initialized", True),
                condition("Ready", ready),
                condition("ContainersReady", ready),
                condition("PodScheduled", True),
            ],
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": _k8s_time(pod.created_at),
            "containerStatuses": [_container_status(pod, c) for c in pod.containers],
            "qosClass": "BestEffort",
        },
    }
