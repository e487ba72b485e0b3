"""What ``backupd inspect`` reports about a checkpoint archive, and how each field is read.

:class:`Inspection` and its parts are the result (their JSON is described in
:mod:`backupd.archive.inspect`); :func:`apply_metadata` fills it from the metadata files
(``config.dump``, ``spec.dump``, ``stats-dump``, ``deleted.files``, ``network.status``) and
:func:`process_tree` builds the process tree from ``pstree.img`` and the tasks' core images.
Field sources follow checkpointctl exactly (reference §2.3-2.4). Every function takes untrusted
bytes: malformed input raises :class:`~backupd.errors.IntegrityError` or
:class:`~backupd.errors.UnsafeArchive` naming the file, never another exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from backupd.archive import criu
from backupd.archive.members import Limits
from backupd.errors import IntegrityError, UnsafeArchive

__all__ = [
    "ENGINE_CONTAINERD",
    "ENGINE_CRIO",
    "ENGINE_PODMAN",
    "CheckpointSize",
    "DumpStatistics",
    "Inspection",
    "ProcessNode",
    "RootfsDiff",
    "RootfsEntry",
    "apply_metadata",
    "decode_core",
    "process_tree",
]

ENGINE_CRIO, ENGINE_CONTAINERD, ENGINE_PODMAN = "CRI-O", "containerd", "Podman"
_GO_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d)[Tt](\d\d:\d\d:\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")
_ZERO_TIME = "0001-01-01T00:00:00Z"


# -- the result -----------------------------------------------------------------------------


@dataclass
class CheckpointSize:
    total_size: int = 0
    memory_pages_size: int = 0
    amd_gpu_memory_pages_size: int = 0
    root_fs_diff_size: int = 0


@dataclass
class DumpStatistics:
    """CRIU's ``dump_stats_entry``: times in microseconds, counts in pages."""

    freezing_time: int
    frozen_time: int
    memdump_time: int
    memwrite_time: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_lazy: int


@dataclass
class ProcessNode:
    pid: int
    command: str
    task_state: str
    threads: int
    children: list[ProcessNode] = field(default_factory=list)

    def walk(self) -> Iterator[tuple[int, ProcessNode]]:
        """(depth, node) in pre-order, iteratively."""
        stack: list[tuple[int, ProcessNode]] = [(0, self)]
        while stack:
            depth, node = stack.pop()
            yield depth, node
            stack.extend((depth + 1, c) for c in reversed(node.children))


@dataclass
class RootfsEntry:
    path: str
    type: str
    size: int
    link: str | None = None


@dataclass
class RootfsDiff:
    compression: str
    files: list[RootfsEntry] = field(default_factory=list)
    truncated: bool = False


@dataclass
class Inspection:
    """What an archive holds (see the module docstring for each field)."""

    source: str
    compression: str = "none"
    tar_size: int = 0
    members: int = 0
    container_name: str | None = None
    image: str | None = None
    id: str | None = None
    runtime: str | None = None
    created: str | None = None
    checkpointed: str | None = None
    engine: str | None = None
    ip: str | None = None
    mac: str | None = None
    pod: str | None = None
    namespace: str | None = None
    checkpoint_size: CheckpointSize = field(default_factory=CheckpointSize)
    statistics: DumpStatistics | None = None
    process_tree: ProcessNode | None = None
    rootfs_diff: RootfsDiff | None = None
    deleted_files: list[str] = field(default_factory=list)
    mounts: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    archive: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)



# -- metadata ---------------------------------------------------------------------------------


def _json(data: bytes, name: str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{what}: {name} is not valid JSON ({str(exc)[:200]})") from None


def _json_object(data: bytes, name: str, what: str) -> dict[str, Any]:
    value = _json(data, name, what)
    if not isinstance(value, dict):
        raise IntegrityError(f"{what}: {name} is not a JSON object")
    return value


def _string(obj: dict[str, Any], key: str, name: str, what: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise IntegrityError(f"{what}: {name} field {key!r} is {type(value).__name__}, not a string")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _go_rfc3339(value: str | None) -> str | None:
    """How Go prints a parsed ``time.Time`` with ``time.RFC3339`` (what checkpointctl shows):
    fraction dropped, offset kept, ``Z`` for a zero offset. Unparseable text is shown as is."""
    if value is None:
        return None
    m = _GO_TIME_RE.match(value)
    if not m:
        return value
    offset = m[4]
    if offset in ("Z", "z", "+00:00", "-00:00"):
        offset = "Z"
    return f"{m[1]}T{m[2]}{offset}"


def _podman_network(data: bytes) -> tuple[str | None, str | None]:
    """IP and MAC as checkpointctl joins them from ``network.status`` (unreadable: none)."""
    try:
        status = json.loads(data)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(status, dict):
        return None, None
    ips: list[str] = []
    macs: list[str] = []
    for net in sorted(status):
        result = status[net]
        interfaces = result.get("interfaces") if isinstance(result, dict) else None
        if not isinstance(interfaces, dict):
            return None, None
        for ifname in sorted(interfaces):
            iface = interfaces[ifname]
            if not isinstance(iface, dict):
                return None, None
            mac = iface.get("mac_address")
            if isinstance(mac, str) and mac:
                macs.append(mac)
            subnets = iface.get("subnets") or []
            if not isinstance(subnets, list):
                return None, None
            for subnet in subnets:
                ipnet = subnet.get("ipnet") if isinstance(subnet, dict) else None
                if isinstance(ipnet, str) and ipnet:
                    ip = ipnet.split("/", 1)[0]
                    if ip:
                        ips.append(ip)
    return (", ".join(ips) or None), (", ".join(macs) or None)


def apply_metadata(result: Inspection, files: dict[str, bytes], what: str) -> None:
    for required in ("config.dump", "spec.dump"):
        if required not in files:
            raise IntegrityError(f"{what} is not a container checkpoint archive: it has no {required}")
    config = _json_object(files["config.dump"], "config.dump", what)
    spec = _json_object(files["spec.dump"], "spec.dump", what)
    annotations = spec.get("annotations", {})
    if annotations is None:
        annotations = {}
    if not isinstance(annotations, dict):
        raise IntegrityError(f"{what}: spec.dump field 'annotations' is not a JSON object")

    def note(key: str) -> str | None:
        return _string(annotations, key, "spec.dump annotation", what)

    result.image = _string(config, "rootfsImageName", "config.dump", what)
    result.id = _string(config, "id", "config.dump", what)
    result.runtime = _string(config, "runtime", "config.dump", what)
    checkpointed = _go_rfc3339(_string(config, "checkpointedTime", "config.dump", what))
    result.checkpointed = None if checkpointed == _ZERO_TIME else checkpointed
    created = _go_rfc3339(_string(config, "createdTime", "config.dump", what))

    manager = note("io.container.manager")
    if manager == "cri-o":
        result.engine = ENGINE_CRIO
        try:
            meta = json.loads(note("io.kubernetes.cri-o.Metadata") or "")
        except (ValueError, RecursionError):
            meta = None
        name = meta.get("name") if isinstance(meta, dict) else None
        result.container_name = name if isinstance(name, str) else note("io.kubernetes.container.name")
        result.ip = note("io.kubernetes.cri-o.IP.0")
        result.created = note("io.kubernetes.cri-o.Created")
        result.namespace = note("io.kubernetes.pod.namespace")
        result.pod = note("io.kubernetes.pod.name")
    elif manager == "libpod":
        result.engine = ENGINE_PODMAN
        result.container_name = _string(config, "name", "config.dump", what)
        result.created = created
        if "network.status" in files:
            result.ip, result.mac = _podman_network(files["network.status"])
    else:
        result.engine = ENGINE_CONTAINERD
        result.container_name = note("io.kubernetes.cri.container-name")
        result.created = created
        result.namespace = note("io.kubernetes.cri.sandbox-namespace")
        result.pod = note("io.kubernetes.cri.sandbox-name")

    mounts = spec.get("mounts") or []
    if isinstance(mounts, list):
        result.mounts = [
            {k: _text(m.get(k)) for k in ("destination", "type", "source")}
            for m in mounts
            if isinstance(m, dict)
        ]

    if "deleted.files" in files:
        deleted = _json(files["deleted.files"], "deleted.files", what)
        if not isinstance(deleted, list) or not all(isinstance(p, str) for p in deleted):
            raise IntegrityError(f"{what}: deleted.files is not a JSON list of paths")
        result.deleted_files[:0] = deleted

    if "stats-dump" in files:
        try:
            stats = criu.decode_stats(files["stats-dump"])
        except criu.CriuImageError as exc:
            raise UnsafeArchive(f"{what}: member 'stats-dump': {exc}") from None
        if stats.HasField("dump"):
            d = stats.dump
            result.statistics = DumpStatistics(
                freezing_time=d.freezing_time, frozen_time=d.frozen_time, memdump_time=d.memdump_time,
                memwrite_time=d.memwrite_time, pages_scanned=d.pages_scanned,
                pages_skipped_parent=d.pages_skipped_parent, pages_written=d.pages_written, pages_lazy=d.pages_lazy,
            )  # fmt: skip


# -- the process tree -------------------------------------------------------------------------


def decode_core(data: bytes, pid: int, what: str) -> tuple[str, str] | None:
    """(comm, task state) of a task's core image; None for a thread's (it has no task core)."""
    try:
        image = criu.decode_image(data, expect="CORE")
    except criu.CriuImageError as exc:
        raise UnsafeArchive(f"{what}: member 'checkpoint/core-{pid}.img': {exc}") from None
    if len(image.entries) != 1:
        raise UnsafeArchive(f"{what}: member 'checkpoint/core-{pid}.img' has {len(image.entries)} entries, expected 1")
    core = image.entries[0]
    return (criu.task_comm(core.tc), criu.task_state_name(core.tc)) if core.HasField("tc") else None


def process_tree(pstree: bytes, cores: dict[int, tuple[str, str] | None], what: str,
                  limits: Limits) -> ProcessNode:  # fmt: skip
    try:
        entries = criu.decode_image(pstree, expect="PSTREE").entries
    except criu.CriuImageError as exc:
        raise UnsafeArchive(f"{what}: member 'checkpoint/pstree.img': {exc}") from None
    nodes: dict[int, ProcessNode] = {}
    parents: dict[int, int] = {}
    order: list[int] = []
    for e in entries:
        if e.pid in nodes:
            raise UnsafeArchive(f"{what}: checkpoint/pstree.img lists pid {e.pid} twice")
        core = cores.get(e.pid)
        if core is None:
            problem = "is missing" if e.pid not in cores else "has no task core"
            raise IntegrityError(f"{what}: checkpoint/core-{e.pid}.img {problem} (pid {e.pid} is in pstree.img)")
        nodes[e.pid] = ProcessNode(pid=e.pid, command=core[0], task_state=core[1], threads=len(e.threads))
        parents[e.pid] = e.ppid
        order.append(e.pid)
    roots = [pid for pid in order if parents[pid] == 0]
    if len(roots) != 1:
        raise UnsafeArchive(f"{what}: checkpoint/pstree.img has {len(roots)} root processes, expected 1")
    for pid in order:
        ppid = parents[pid]
        if ppid == 0:
            continue
        if ppid not in nodes:
            raise UnsafeArchive(f"{what}: checkpoint/pstree.img: parent {ppid} of pid {pid} is not in the tree")
        nodes[ppid].children.append(nodes[pid])
    root = nodes[roots[0]]
    seen = 0
    for depth, _ in root.walk():
        seen += 1
        if depth > limits.max_process_depth:
            raise UnsafeArchive(f"{what}: checkpoint/pstree.img nests processes deeper than {limits.max_process_depth}")
    if seen != len(nodes):
        raise UnsafeArchive(f"{what}: checkpoint/pstree.img is not a tree (a parent cycle)")
    return root

