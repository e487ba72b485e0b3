"""What a checkpoint says about itself: the kubelet's and CRI-O's metadata files inside the tar."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from backupd.archive import criu
from backupd.archive.tar import TarScanner
from backupd.model import Archive

log = structlog.get_logger("backupd.restore")

METADATA_FILES = ("config.dump", "spec.dump", "status.dump")
_CORE_IMAGE = re.compile(r"^checkpoint/core-\d+\.img$")

# Mounts CRI-O does not require a restored container to redeclare (server/container_restore.go),
# plus those the kubelet adds to every container by itself.
_IMPLICIT_MOUNTS = frozenset({
    "/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm", "/etc/resolv.conf",
    "/etc/hostname", "/etc/passwd", "/etc/group", "/run/secrets", "/run/.containerenv",
    "/etc/hosts", "/dev/termination-log", "/var/run/secrets/kubernetes.io/serviceaccount",
})  # fmt: skip
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
           "mips": "mips64le", "loongarch64": "loong64", "riscv64": "riscv64"}  # fmt: skip


def metadata_scanner(archive: Archive) -> TarScanner:
    """A scanner keeping what :func:`checkpoint_info` reads: the dumps and the first CRIU core image."""
    scanner: TarScanner

    def keep(name: str) -> bool:
        if name in METADATA_FILES:
            return True
        return bool(_CORE_IMAGE.match(name)) and not any(_CORE_IMAGE.match(k) for k in scanner.files)

    scanner = TarScanner(f"archive {archive.id}", keep)
    return scanner



@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint archive says about the container it holds (catalog values as fallbacks)."""

    container: str
    pod: str
    namespace: str
    pod_uid: str = ""
    engine: str = "unknown"  # cri-o | containerd | podman | unknown
    runtime: str = ""
    rootfs_image: str = ""  # as the user requested it (config.dump rootfsImage)
    rootfs_image_name: str = ""  # e.g. docker.io/library/nginx:1.27
    rootfs_image_ref: str = ""  # the runtime's image ID
    checkpointed_time: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # pod labels recorded in the archive
    bind_mounts: tuple[tuple[str, str], ...] = ()  # (destination, source) a restore must redeclare
    has_status_dump: bool = False  # containerd 2.1-2.3 restore needs it
    arch: str | None = None  # GOARCH of the checkpointed process (CRIU core image)

    @property
    def rootfs_image_digest(self) -> str:
        for candidate in (self.rootfs_image, self.rootfs_image_name):
            _, at, digest = candidate.partition("@")
            if at and digest.startswith("sha256:"):
                return digest
        return ""



def _json_object(files: Mapping[str, bytes], name: str, what: str) -> dict[str, Any]:
    data = files.get(name)
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("checkpoint_metadata_unreadable", archive=what, file=name, error=str(exc)[:200])
        return {}
    return value if isinstance(value, dict) else {}



def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""



def _labels_from_json(text: Any) -> dict[str, str]:
    if not isinstance(text, str):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return _pod_labels(value)



def _pod_labels(value: Any) -> dict[str, str]:
    # The kubelet puts its own io.kubernetes.* labels on every container; they identify the old
    # pod (uid, name) and must never be copied onto a new one.
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items()
            if isinstance(k, str) and isinstance(v, str) and not k.startswith("io.kubernetes.")}  # fmt: skip



def checkpoint_info(files: Mapping[str, bytes], archive: Archive) -> CheckpointInfo:
    """Read ``config.dump``/``spec.dump``/``status.dump``/a core image kept by a scanner.

    Unreadable or missing files degrade to the catalog's values (logged), never to an error: an
    operator restoring at 3 a.m. gets the image with fewer annotations rather than nothing.
    """
    what = archive.id
    config = _json_object(files, "config.dump", what)
    spec = _json_object(files, "spec.dump", what)
    status = _json_object(files, "status.dump", what)
    ann = spec.get("annotations")
    ann = {k: v for k, v in ann.items() if isinstance(v, str)} if isinstance(ann, dict) else {}

    manager = ann.get("io.container.manager", "")
    if manager == "cri-o":
        engine = "cri-o"
    elif manager == "libpod":
        engine = "podman"
    elif "io.kubernetes.cri.container-name" in ann or status:
        engine = "containerd"
    else:
        engine = "unknown"

    container = pod = namespace = ""
    if engine == "cri-o":
        try:
            meta = json.loads(ann.get("io.kubernetes.cri-o.Metadata", "{}"))
            container = _str(meta.get("name")) if isinstance(meta, dict) else ""
        except ValueError:
            container = ""
        pod, namespace = ann.get("io.kubernetes.pod.name", ""), ann.get("io.kubernetes.pod.namespace", "")
        labels = _labels_from_json(ann.get("io.kubernetes.cri-o.Labels"))
    else:
        container = ann.get("io.kubernetes.cri.container-name", "")
        pod = ann.get("io.kubernetes.cri.sandbox-name", "")
        namespace = ann.get("io.kubernetes.cri.sandbox-namespace", "")
        labels = _pod_labels(status.get("labels"))

    mounts: list[tuple[str, str]] = []
    raw_mounts = spec.get("mounts")
    for m in raw_mounts if isinstance(raw_mounts, list) else ():
        if not isinstance(m, dict):
            continue
        dest, source = _str(m.get("destination")), _str(m.get("source"))
        raw_options = m.get("options")
        options = raw_options if isinstance(raw_options, list) else []
        is_bind = m.get("type") == "bind" or "bind" in options or "rbind" in options
        if is_bind and dest and dest.rstrip("/") not in _IMPLICIT_MOUNTS:
            mounts.append((dest, source))

    arch = None
    for name, data in files.items():
        if _CORE_IMAGE.match(name):
            try:
                core = criu.decode_image(data, expect="CORE").entries[0]
                arch = _GOARCH.get(criu.machine_name(core.mtype) or "")
            except (criu.CriuImageError, IndexError) as exc:
                log.warning("checkpoint_metadata_unreadable", archive=what, file=name, error=str(exc)[:200])

    if config == {} or spec == {}:
        log.warning("checkpoint_metadata_missing", archive=what,
                    missing=[n for n, v in (("config.dump", config), ("spec.dump", spec)) if not v])
    return CheckpointInfo(
        container=container or archive.container,
        pod=pod or archive.pod,
        namespace=namespace or archive.namespace,
        pod_uid=ann.get("io.kubernetes.pod.uid", "") or ann.get("io.kubernetes.cri.sandbox-uid", ""),
        engine=engine,
        runtime=_str(config.get("runtime")),
        rootfs_image=_str(config.get("rootfsImage")),
        rootfs_image_name=_str(config.get("rootfsImageName")) or archive.image,
        rootfs_image_ref=_str(config.get("rootfsImageRef")),
        checkpointed_time=_str(config.get("checkpointedTime")),
        labels=labels,
        bind_mounts=tuple(mounts),
        has_status_dump="status.dump" in files,
        arch=arch,
    )

