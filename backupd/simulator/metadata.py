"""The metadata files of a CRI-O checkpoint archive, as the simulator writes them.

``config.dump`` (checkpointctl's ``ContainerConfig``) and ``spec.dump`` (the container's OCI
runtime spec with the annotations checkpointctl and CRI-O restore read), and the Go time formats
they, and the kubelet's archive names, are written in. Pure functions of the topology.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid

from backupd.simulator.topology import Container, Pod

__all__ = ["argv_env", "config_dump", "go_rfc3339", "go_rfc3339nano", "spec_dump"]


# -- Go time formats -------------------------------------------------------------------------


def _go_offset(t: dt.datetime) -> str:
    offset = t.utcoffset()
    if offset is None:
        raise ValueError("Go time formats need an aware datetime")
    if not offset:
        return "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def go_rfc3339(t: dt.datetime) -> str:
    """Go ``time.RFC3339``: second resolution, ``Z`` for UTC else ``±hh:mm``."""
    return t.strftime("%Y-%m-%dT%H:%M:%S") + _go_offset(t)


def go_rfc3339nano(t: dt.datetime) -> str:
    """Go ``time.RFC3339Nano`` (how ``time.Time`` marshals to JSON): trailing zeros trimmed."""
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + _go_offset(t)


# -- metadata files --------------------------------------------------------------------------


def _attempt(c: Container) -> int:
    return c.restart_count


def _crio_name(pod: Pod, c: Container) -> str:
    return f"k8s_{c.name}_{pod.name}_{pod.namespace}_{pod.uid}_{_attempt(c)}"


def config_dump(pod: Pod, c: Container, checkpointed_at: dt.datetime) -> dict:
    """CRI-O's ``config.dump`` (checkpointctl ``ContainerConfig``)."""
    tz = checkpointed_at.tzinfo
    return {
        "id": c.container_id,
        "name": _crio_name(pod, c),
        "rootfsImage": c.image_ref,
        "rootfsImageRef": c.image_id,
        "rootfsImageName": c.image_name,
        "runtime": "runc",
        "createdTime": go_rfc3339nano(c.created_at.astimezone(tz)),
        "checkpointedTime": go_rfc3339nano(checkpointed_at),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": False,
    }


def argv_env(pod: Pod, c: Container, index: int) -> tuple[list[str], list[str]]:
    """The command line and environment of the container's ``index``-th process."""
    comm = c.processes[index]
    if index == 0:
        argv = {"nginx": ["nginx", "-g", "daemon off;"], "postgres": ["postgres"]}.get(comm, [comm])
    else:
        argv = [f"{comm}: worker process"] if comm == "nginx" else [f"{comm}: worker {index}"]
    env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"HOSTNAME={pod.name}",
        "KUBERNETES_SERVICE_HOST=10.96.0.1",
        "KUBERNETES_SERVICE_PORT=443",
        "KUBERNETES_PORT=tcp://10.96.0.1:443",
    ]
    return argv, env


def spec_dump(pod: Pod, c: Container, *, tz: dt.tzinfo | None = None) -> dict:
    """CRI-O's ``spec.dump``: the container's OCI runtime spec with the annotations
    checkpointctl and CRI-O restore read (modelled on checkpoint-restore-operator's fixture)."""
    tz = tz or dt.UTC
    attempt = _attempt(c)
    sandbox_id = hashlib.sha256(f"sandbox\x00{pod.uid}".encode()).hexdigest()
    mount_id = hashlib.sha256(f"mount\x00{c.container_id}".encode()).hexdigest()
    container_hash = hashlib.sha256(f"hash\x00{c.image}\x00{c.name}".encode()).hexdigest()[:8]
    pod_dir = f"/var/lib/kubelet/pods/{pod.uid}"
    volumes = [
        {"container_path": "/etc/hosts", "host_path": f"{pod_dir}/etc-hosts", "readonly": False,
         "propagation": 0, "selinux_relabel": False},
        {"container_path": "/dev/termination-log", "host_path": f"{pod_dir}/containers/{c.name}/{container_hash}",
         "readonly": False, "propagation": 0, "selinux_relabel": False},
        {"container_path": "/var/run/secrets/kubernetes.io/serviceaccount",
         "host_path": f"{pod_dir}/volumes/kubernetes.io~projected/kube-api-access",
         "readonly": True, "propagation": 0, "selinux_relabel": False},
    ]  # fmt: skip
    kube_annotations = {
        "io.kubernetes.container.hash": container_hash,
        "io.kubernetes.container.restartCount": str(attempt),
        "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
        "io.kubernetes.container.terminationMessagePolicy": "File",
        "io.kubernetes.pod.terminationGracePeriod": "30",
    }
    labels = {
        "io.kubernetes.container.name": c.name,
        "io.kubernetes.pod.name": pod.name,
        "io.kubernetes.pod.namespace": pod.namespace,
        "io.kubernetes.pod.uid": pod.uid,
    }
    metadata = {"name": c.name, **({"attempt": attempt} if attempt else {})}
    def compact(value: object) -> str:
        return json.dumps(value, separators=(",", ":"))

    annotations = {
        "io.container.manager": "cri-o",
        **kube_annotations,
        "io.kubernetes.container.name": c.name,
        "io.kubernetes.cri-o.Annotations": compact(kube_annotations),
        "io.kubernetes.cri-o.ContainerID": c.container_id,
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.cri-o.Created": go_rfc3339nano(c.created_at.astimezone(tz)),
        "io.kubernetes.cri-o.IP.0": pod.ip,
        "io.kubernetes.cri-o.Image": c.image_ref,
        "io.kubernetes.cri-o.ImageName": c.image_name,
        "io.kubernetes.cri-o.ImageRef": c.image_id,
        "io.kubernetes.cri-o.Labels": compact(labels),
        "io.kubernetes.cri-o.LogPath": f"/var/log/pods/{pod.namespace}_{pod.name}_{pod.uid}/{c.name}/{attempt}.log",
        "io.kubernetes.cri-o.Metadata": compact(metadata),
        "io.kubernetes.cri-o.MountPoint": f"/var/lib/containers/storage/overlay/{mount_id}/merged",
        "io.kubernetes.cri-o.Name": _crio_name(pod, c),
        "io.kubernetes.cri-o.PlatformRuntimePath": "",
        "io.kubernetes.cri-o.ResolvPath":
            f"/run/containers/storage/overlay-containers/{sandbox_id}/userdata/resolv.conf",
        "io.kubernetes.cri-o.SandboxID": sandbox_id,
        "io.kubernetes.cri-o.SandboxName": f"k8s_{pod.name}_{pod.namespace}_{pod.uid}_0",
        "io.kubernetes.cri-o.SeccompProfilePath": "RuntimeDefault",
        "io.kubernetes.cri-o.Stdin": "false",
        "io.kubernetes.cri-o.StdinOnce": "false",
        "io.kubernetes.cri-o.TTY": "false",
        "io.kubernetes.cri-o.Volumes": compact(volumes),
        "io.kubernetes.pod.name": pod.name,
        "io.kubernetes.pod.namespace": pod.namespace,
        "io.kubernetes.pod.uid": pod.uid,
        "kubernetes.io/config.seen": go_rfc3339nano(pod.created_at.astimezone(tz)),
        "kubernetes.io/config.source": "api",
        "org.systemd.property.After": "['crio.service']",
        "org.systemd.property.CollectMode": "'inactive-or-failed'",
        "org.systemd.property.DefaultDependencies": "true",
        "org.systemd.property.TimeoutStopUSec": "uint64 30000000",
    }
    argv, env = argv_env(pod, c, 0)
    userdata = f"/run/containers/storage/overlay-containers/{c.container_id}/userdata"
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        {"destination": "/dev/shm", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{sandbox_id}/userdata/shm",
         "options": ["rw", "bind"]},
        {"destination": "/etc/resolv.conf", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{sandbox_id}/userdata/resolv.conf",
         "options": ["ro", "bind", "nodev", "nosuid", "noexec"]},
        {"destination": "/etc/hostname", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{sandbox_id}/userdata/hostname",
         "options": ["ro", "bind", "nodev", "nosuid", "noexec"]},
        {"destination": "/run/.containerenv", "type": "bind", "source": f"{userdata}/.containerenv",
         "options": ["ro", "bind", "nodev", "nosuid", "noexec"]},
    ] + [
        {"destination": v["container_path"], "type": "bind", "source": v["host_path"],
         "options": ["ro" if v["readonly"] else "rw", "rbind", "rprivate", "bind"]}
        for v in volumes
    ]  # fmt: skip
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID", "CAP_SETUID",
            "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_KILL"]  # fmt: skip
    slice_uid = pod.uid.replace("-", "_")
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "user": {"uid": 0, "gid": 0, "additionalGids": [0]},
            "args": argv,
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "oomScoreAdj": 1000,
        },
        "root": {"path": f"/var/lib/containers/storage/overlay/{mount_id}/merged"},
        "hostname": pod.name,
        "mounts": mounts,
        "annotations": annotations,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}],
                          "cpu": {"shares": 2, "quota": 0, "period": 100000}},
            "cgroupsPath": f"kubepods-besteffort-pod{slice_uid}.slice:crio:{c.container_id}",
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": f"/var/run/netns/{uuid.UUID(sandbox_id[:32])}"},
                {"type": "ipc", "path": f"/var/run/ipcns/{uuid.UUID(sandbox_id[:32])}"},
                {"type": "uts", "path": f"/var/run/utsns/{uuid.UUID(sandbox_id[:32])}"},
                {"type": "mount"},
            ],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/dev/block"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }  # fmt: skip
