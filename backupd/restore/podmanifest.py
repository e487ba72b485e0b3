"""Ready-to-apply manifests that run a checkpoint image in place of the original container.

:func:`render` makes a YAML document: a bare ``Pod`` (default), or the original controller
(Deployment, StatefulSet, DaemonSet, ReplicaSet, Job) whose pod template runs the image. It
carries the original pod's labels as the archive recorded them, minus the controller-managed
ones (``pod-template-hash``, ``controller-revision-hash``, ``statefulset.kubernetes.io/pod-name``
...): a bare Pod keeping them would be adopted -- and possibly deleted -- by the old ReplicaSet,
and a template must not pin a revision. It can be pinned to a node, and starts with comments
naming what the node needs for the restore to work (reference §3), because none of it is
visible from the manifest and each missing piece fails in its own obscure way.

Pure: values in, text out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from backupd.archive.metadata import CheckpointInfo
from backupd.model import Archive, Workload

CONTROLLER_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index", "pod-template-generation", "controller-uid", "batch.kubernetes.io/controller-uid",
    "job-name", "batch.kubernetes.io/job-name", "batch.kubernetes.io/job-completion-index",
})  # fmt: skip
RESTORE_LABEL = "backupd.io/restore"
_API = {"deployment": "apps/v1", "statefulset": "apps/v1", "daemonset": "apps/v1", "replicaset": "apps/v1",
        "job": "batch/v1"}  # fmt: skip
_KIND = {"deployment": "Deployment", "statefulset": "StatefulSet", "daemonset": "DaemonSet",
         "replicaset": "ReplicaSet", "job": "Job"}  # fmt: skip
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def restorable_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a restored pod may carry: the recorded ones minus the controller-managed."""
    return {k: v for k, v in sorted(labels.items()) if k not in CONTROLLER_LABELS}


def prerequisites(info: CheckpointInfo) -> list[str]:
    """Comment lines: what the node must have for the runtime to restore this image."""
    base = info.rootfs_image_name or info.rootfs_image or "the original container image"
    ref = f" (image ID {info.rootfs_image_ref[:19]})" if info.rootfs_image_ref else ""
    lines = [
        "Runtime prerequisites on the node that runs this pod (the restore fails without them):",
        "  - CRI-O with restore enabled: `enable_criu_support = true` in [crio.runtime] (the default",
        "    since CRI-O 1.30; newer CRI-O: [crio.checkpoint_restore] container_level_enabled =",
        "    \"checkpoint_restore\") and `drop_infra_ctr = false`.",
        "  - CRIU (>= 3.16, 4.x recommended) installed where CRI-O finds it.",
        f"  - The base image pre-pulled on the node: {base}{ref}.",
        "    CRI-O resolves it from local storage only: `crictl pull " + base + "`.",
        "  - containerd instead of CRI-O: only 2.1 to 2.3, and only for archives taken by",
        "    containerd (they hold status.dump); containerd >= 2.4 cannot restore at all.",
        "  - The same CPU architecture and a compatible kernel as the checkpointed node.",
    ]
    if info.engine == "containerd" and not info.has_status_dump:
        lines.append("  ! This archive has no status.dump: containerd cannot restore it.")
    if info.engine == "cri-o":
        lines.append("  ! This archive was taken by CRI-O: only CRI-O can restore it.")
    if info.bind_mounts:
        lines.append("  - The container must mount the same paths as the original (CRI-O refuses otherwise);")
        lines.append("    add volumes and volumeMounts for:")
        lines.extend(f"      {dest}  (was {source})" for dest, source in info.bind_mounts)
    return lines


def render(
    archive: Archive,
    info: CheckpointInfo,
    image: str,
    *,
    as_workload: bool = False,
    node_name: str | None = None,
    extra_labels: Mapping[str, str] | None = None,
    pod_name: str | None = None,
) -> str:
    """The YAML document (see the module docstring); ``image`` should be pinned by digest.

    ``pod_name`` names a bare Pod (default: the original pod's name).
    """
    labels = restorable_labels({**info.labels, **(extra_labels or {})})
    annotations = {
        "backupd.io/archive-id": archive.id,
        "backupd.io/checkpoint-time": archive.checkpoint_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backupd.io/restored-from": f"{archive.namespace}/{archive.pod}/{archive.container} ({archive.workload})",
    }
    container = {"name": info.container, "image": image}
    workload = _workload(archive)
    header = [
        f"Restores container {info.container} of pod {archive.namespace}/{archive.pod} ({archive.workload})",
        f"from backupd archive {archive.id}, checkpointed {annotations['backupd.io/checkpoint-time']} on node "
        f"{archive.node}.",
        "The process resumes from its checkpointed memory; the original command, env and ports are",
        "not needed by the runtime, but add the original resources, probes and volumes as required.",
        "",
        *prerequisites(info),
    ]

    if not as_workload or workload is None or workload.kind not in _KIND:
        if as_workload:
            header += ["", f"The archive's workload {archive.workload} is not a controller: this is a bare Pod."]
        doc = _pod(pod_name or archive.pod, archive, labels, annotations, container, node_name)
        header += ["", "Labels the old controller manages (pod-template-hash ...) are left out so that it",
                   "does not adopt this pod."]
    else:
        doc, notes = _controller(workload, archive, labels, annotations, container, node_name)
        header += ["", *notes]
    return "".join(f"# {line}".rstrip() + "\n" for line in header) + yaml.safe_dump(
        doc, sort_keys=False, default_flow_style=False, width=120
    )


def _workload(archive: Archive) -> Workload | None:
    try:
        return Workload.parse(archive.workload)
    except ValueError:
        return None


def _pod(name: str, archive: Archive, labels: dict[str, str], annotations: dict[str, str], container: dict[str, Any],
         node_name: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": archive.namespace}
    if labels:
        metadata["labels"] = labels
    metadata["annotations"] = annotations
    spec: dict[str, Any] = {}
    if node_name:
        spec["nodeName"] = node_name
    spec["containers"] = [container]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _controller(workload: Workload, archive: Archive, labels: dict[str, str], annotations: dict[str, str],
                container: dict[str, Any], node_name: str | None) -> tuple[dict[str, Any], list[str]]:
    kind = workload.kind
    labels = dict(labels)
    if not labels:
        # A selector cannot be empty; mark the restored pods instead.
        value = archive.id if _LABEL_VALUE.match(archive.id) else "restored"
        labels[RESTORE_LABEL] = value
    pod_spec: dict[str, Any] = {}
    if node_name:
        if kind == "daemonset":
            pod_spec["nodeSelector"] = {"kubernetes.io/hostname": node_name}
        else:
            pod_spec["nodeName"] = node_name
    pod_spec["containers"] = [container]
    if kind == "job":
        pod_spec["restartPolicy"] = "Never"
    template = {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}
    spec: dict[str, Any] = {}
    notes = [
        f"This {_KIND[kind]} replaces the pod template of {archive.workload}: review it against the original",
        "manifest before applying (the selector of an existing controller is immutable).",
    ]
    if kind in ("deployment", "statefulset", "replicaset"):
        spec["replicas"] = 1
        notes.append("Every replica would restore the same process state: keep replicas at 1 unless the")
        notes.append("application tolerates that.")
    if kind == "statefulset":
        spec["serviceName"] = workload.name
        notes.append("Set serviceName and volumeClaimTemplates to the original StatefulSet's.")
    if kind != "job":
        spec["selector"] = {"matchLabels": labels}
    spec["template"] = template
    doc = {
        "apiVersion": _API[kind],
        "kind": _KIND[kind],
        "metadata": {"name": workload.name, "namespace": archive.namespace, "annotations": dict(annotations)},
        "spec": spec,
    }
    return doc, notes
