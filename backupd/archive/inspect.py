"""What is inside a checkpoint archive, read in one streaming pass and never extracted.

:func:`inspect_file` reads a local archive (plain tar, or zstd/gzip/xz/bzip2-compressed,
detected by magic bytes, ``-`` for stdin through :func:`inspect_stream`);
:func:`inspect_catalog_archive` reads a committed archive from its backend, decompressing it
with :class:`~backupd.storage.transfer.UnpackingReader` so the catalog's sizes and SHA-256 digests are
checked too. Both give an :class:`Inspection`: what ``checkpointctl show`` and ``checkpointctl
inspect --ps-tree --stats --mounts`` show (reference §4), plus the rootfs-diff file list and the
deleted files. Field sources follow checkpointctl exactly (reference §2.3-2.4): the engine from
``spec.dump``'s ``io.container.manager`` annotation (``cri-o`` CRI-O, ``libpod`` Podman, anything
else containerd), the container name, pod, namespace, IP and created time from that engine's
annotations (Podman: ``config.dump`` and ``network.status``), image/ID/runtime/checkpointed time
from ``config.dump``, the statistics from ``stats-dump``, the process tree from
``checkpoint/pstree.img`` and ``checkpoint/core-<pid>.img`` (``tc.comm``, ``tc.task_state``).

**Safety.** Nothing is ever written, created or followed: members are read as streams, only the
small metadata files are held in memory (each under ``Limits.max_metadata_bytes``), memory pages
are counted from their headers, and ``rootfs-diff.tar`` is listed as an inner stream. The archive
is refused with :class:`~backupd.errors.UnsafeArchive` (exit code 7), naming the member, by the
member rules restore and verify apply too (:class:`backupd.archive.tar.MemberRules`: absolute or
``..`` names, symlinks, hardlinks, devices, FIFOs, sparse files, unknown types, a name twice,
absurd declared sizes), when an extended (PAX/GNU) header is absurdly large, or when a CRIU image
is malformed. (inspect reads with tarfile, which can hand out a member's data as a stream;
restore and verify with the push-mode :class:`~backupd.archive.tar.TarScanner`; the rules are one
class for both.) A truncated or corrupt stream (tar or compression) is an
:class:`~backupd.errors.IntegrityError` (also exit code 7): an archive must end with its
end-of-archive block. Inside ``rootfs-diff.tar`` (the container's changed files)
links and device nodes are legitimate content and are listed, never followed; absolute or ``..``
names and hardlinks leaving the tree are refused there too.

**JSON** (``Inspection.to_json()``, ``backupd inspect --output json``); field names are stable.
Names shared with ``checkpointctl inspect --format json`` mean the same thing:

* ``source`` — the path, or ``archive <id>``; ``archive`` — the catalog row (``backupd list``
  fields) when read from the catalog, else null; ``compression`` — ``none``, ``zstd``, ``gzip``,
  ``xz`` or ``bzip2``; ``tar_size`` — bytes of uncompressed tar read; ``members`` — tar entries.
* ``container_name``, ``image`` (``rootfsImageName``), ``id``, ``runtime``, ``created``,
  ``checkpointed`` (RFC 3339 as checkpointctl prints them), ``engine`` (``CRI-O``,
  ``containerd`` or ``Podman``), ``ip``, ``mac``, ``pod``, ``namespace``: strings or null.
* ``checkpoint_size``: ``total_size`` (regular files under ``checkpoint/``),
  ``memory_pages_size`` (``checkpoint/pages-*``), ``amd_gpu_memory_pages_size``
  (``checkpoint/amdgpu-pages-*``), ``root_fs_diff_size`` (the ``rootfs-diff.tar`` member): bytes.
* ``statistics``: null without ``stats-dump``, else ``freezing_time``, ``frozen_time``,
  ``memdump_time``, ``memwrite_time`` (microseconds), ``pages_scanned``, ``pages_skipped_parent``,
  ``pages_written``, ``pages_lazy``.
* ``process_tree``: null without ``pstree.img``, else the root ``{pid, command, task_state
  (Alive, Dead, Stopped, Zombie), threads, children: [...]}``, children in pstree order.
* ``rootfs_diff``: null without ``rootfs-diff.tar``, else ``{compression, files: [{path, type
  (file, dir, symlink, hardlink, char, block, fifo), size, link}], truncated}``; ``truncated``
  is true when the listing stopped at ``Limits.max_listed_files``.
* ``deleted_files``: ``deleted.files`` (CRI-O, Podman) plus the OCI whiteouts of a containerd
  rootfs diff. ``mounts``: ``[{destination, type, source}]`` from ``spec.dump``.
* ``warnings``: strings about things that are odd but not unsafe (bytes after the
  end-of-archive block, which tar readers ignore; a truncated listing).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import zstandard

from backupd.archive import criu
from backupd.archive.tar import DEFAULT_LIMITS, Limits, MemberRules, member_name, member_size, short
from backupd.errors import (
    BackupdError,
    IntegrityError,
    InvalidInput,
    NotFound,
    StorageError,
    UnsafeArchive,
)

__all__ = [
    "CheckpointSize",
    "DumpStatistics",
    "Inspection",
    "Limits",
    "ProcessNode",
    "RootfsDiff",
    "RootfsEntry",
    "detect_compression",
    "inspect_tar_stream",
    "inspect_file",
    "inspect_stream",
    "looks_like_archive_id",
]

ENGINE_CRIO, ENGINE_CONTAINERD, ENGINE_PODMAN = "CRI-O", "containerd", "Podman"
_READ = 1 << 20
_TAR_BUFSIZE = tarfile.RECORDSIZE
_TRAILER_SCAN = 1 << 20  # local files: how far past the end-of-archive block we look
_CORE_RE = re.compile(r"^checkpoint/core-(\d{1,10})\.img$")
_GO_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d)[Tt](\d\d:\d\d:\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")
_ZERO_TIME = "0001-01-01T00:00:00Z"
_METADATA = frozenset({"config.dump", "spec.dump", "stats-dump", "deleted.files", "network.status",
                       "checkpoint/pstree.img"})  # fmt: skip
_COMPRESSION_MAGICS = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)
_AGE_MAGIC = b"age-encryption.org/"


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


# -- streams: translation of foreign errors, header budget, decompression ---------------------


class _Reader:
    """A ``read(n)`` stream that translates foreign exceptions once, at this edge.

    Also counts bytes and enforces the header budget: while tarfile parses one member's
    headers (see :func:`_guarded_tarinfo`), reading past ``header_limit`` refuses the archive,
    so an enormous PAX or GNU long-name header is never buffered.
    """

    #: reads at end of stream tolerated once ``truncated`` is set (a clean end needs two or three)
    EOF_READS = 16

    def __init__(self, raw: Any, on_error: Callable[[Exception], BackupdError]) -> None:
        self.raw = raw
        self.on_error = on_error
        self.pos = 0
        self.header_limit: int | None = None
        self.header_start = 0
        self.truncated: str | None = None  # the message for reading on and on at end of stream
        self._eof_reads = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n)
        except BackupdError:
            raise
        except Exception as exc:  # foreign code (a backend stream, a decompressor): any failure
            raise self.on_error(exc) from None
        if not data and n != 0 and self.truncated is not None:
            # tarfile skips a member by reading block after block, and keeps going past the end
            # of a truncated stream: a member declaring terabytes would spin for hours.
            self._eof_reads += 1
            if self._eof_reads > self.EOF_READS:
                raise IntegrityError(self.truncated)
        self.pos += len(data)
        if self.header_limit is not None and self.pos > self.header_limit:
            budget = self.header_limit - self.header_start
            raise UnsafeArchive(
                f"a member header near offset {self.header_start} of the tar runs past the {budget}-byte limit "
                "(an enormous PAX or GNU long-name header); the archive is refused"
            )
        return data


class _Prepended:
    """``head`` then the rest of ``raw`` (magic-byte sniffing on a non-seekable stream)."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.raw.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.raw.read(n)


def detect_compression(head: bytes) -> str:
    """``zstd``, ``gzip``, ``xz``, ``bzip2`` or ``none`` from the first bytes of a stream."""
    for magic, name in _COMPRESSION_MAGICS:
        if head.startswith(magic):
            return name
    return "none"


def _read_head(raw: Any, n: int = 32) -> bytes:
    head = b""
    while len(head) < n:
        chunk = raw.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _decompressing(raw: Any, what: str) -> tuple[str, Any]:
    """Sniff ``raw`` and return (compression, a reader of the decompressed bytes); ``age``
    (encrypted) comes back undecrypted."""
    head = _read_head(raw)
    kind = "age" if head.startswith(_AGE_MAGIC) else detect_compression(head)
    source = _Prepended(head, raw)
    if kind in ("none", "age"):
        return kind, source
    stream: Any
    if kind == "zstd":
        # A truncated zstd frame ends silently here; the tar layer then finds the missing
        # end-of-archive block, so lost content is still reported.
        stream = zstandard.ZstdDecompressor().stream_reader(source, read_size=_READ, read_across_frames=True)
    elif kind == "gzip":
        stream = gzip.GzipFile(fileobj=source, mode="rb")
    elif kind == "xz":
        stream = lzma.LZMAFile(source)
    else:
        stream = bz2.BZ2File(source)

    def corrupt(exc: Exception) -> BackupdError:
        return IntegrityError(f"{what}: the {kind} stream is corrupt or truncated ({exc}); nothing can be read past it")

    return kind, _Reader(stream, corrupt)


# -- tar iteration ----------------------------------------------------------------------------


class _TarGuard:
    """Per-tar state shared with its TarInfo class: header budget and how iteration ended."""

    def __init__(self, reader: _Reader, limits: Limits) -> None:
        self.reader = reader
        self.limits = limits
        self.depth = 0
        self.last_header_error: type[Exception] | None = None


def _guarded_tarinfo(guard: _TarGuard) -> type[tarfile.TarInfo]:
    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            outer = guard.depth == 0
            if outer:
                guard.last_header_error = None
                guard.reader.header_start = guard.reader.pos
                guard.reader.header_limit = guard.reader.pos + guard.limits.max_header_bytes + 2 * _TAR_BUFSIZE
            elif guard.depth >= 8:
                raise UnsafeArchive("more than 8 extended headers are chained before one member; refused")
            guard.depth += 1
            try:
                return super().fromtarfile(tarfile_)
            finally:
                guard.depth -= 1
                if outer:
                    guard.reader.header_limit = None

        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as exc:
                # tarfile takes a bad or missing header after the first for the end of the
                # archive; remembering which one it was tells truncation from a clean end.
                guard.last_header_error = type(exc)
                raise

    return GuardedTarInfo


class _TarPass:
    """One streaming pass over a tar: ``members()`` yields (tar, member), and ``extractfile``
    of the current member may be read before the next; ``rest()`` yields what follows the
    end-of-archive block. Raises when the tar does not end with its end-of-archive block."""

    def __init__(self, reader: _Reader, what: str, limits: Limits) -> None:
        self.reader, self.what, self.limits = reader, what, limits
        self.tar: tarfile.TarFile | None = None

    def members(self) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        what, limits = self.what, self.limits
        guard = _TarGuard(self.reader, limits)
        self.reader.truncated = f"{what} is truncated: the stream ends inside a member's data"
        after = ""  # where the pass is, for messages
        try:
            # Never closed: it owns no file (closing would only mark the stream closed).
            tar = self.tar = tarfile.open(fileobj=self.reader, mode="r|", tarinfo=_guarded_tarinfo(guard),
                                          bufsize=_TAR_BUFSIZE, errors="surrogateescape")  # fmt: skip
            count = 0
            while True:
                member = tar.next()
                tar.members.clear()  # stream mode keeps every TarInfo otherwise
                if member is None:
                    break
                count += 1
                if count > limits.max_members:
                    raise UnsafeArchive(f"{what} has more than {limits.max_members} members; refused as hostile")
                yield tar, member
                after = f" after member {short(member.name)}"
            ended = guard.last_header_error
            if ended is tarfile.InvalidHeaderError:
                raise IntegrityError(f"{what}: invalid tar header at offset {tar.offset}{after} (corrupt, or "
                                     "garbage where a header should be); the rest cannot be read")  # fmt: skip
            if ended is not tarfile.EOFHeaderError:
                raise IntegrityError(f"{what} is truncated: the stream ends{after or ' at its start'} without the "
                                     "tar end-of-archive block")  # fmt: skip
        except BackupdError:
            raise
        except tarfile.ReadError as exc:
            text = str(exc)
            if not after:
                raise IntegrityError(f"{what} is not a tar archive ({text})") from None
            raise IntegrityError(f"{what}: {text}{after} (truncated or corrupt)") from None
        except (tarfile.TarError, ValueError, EOFError, OverflowError) as exc:
            raise IntegrityError(f"{what}: malformed tar{after} ({exc})") from None
        except RecursionError:
            raise UnsafeArchive(f"{what}: extended headers nested too deeply{after}; refused") from None

    def rest(self) -> Iterator[bytes]:
        """The bytes after the end-of-archive block: tarfile's read-ahead, then the stream."""
        source: Any = self.tar.fileobj if self.tar is not None else self.reader
        while chunk := source.read(_READ):
            yield chunk


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr():
        return "char"
    if member.isblk():
        return "block"
    if member.isfifo():
        return "fifo"
    return f"type {member.type!r}"


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, what: str, limit: int) -> bytes:
    if member.size > limit:
        raise UnsafeArchive(f"{what}: member {short(name)} declares {member.size} bytes, over the {limit}-byte limit "
                            "for a metadata file; refused as hostile")  # fmt: skip
    f = tar.extractfile(member)
    if f is None:  # pragma: no cover - only regular files reach here
        raise IntegrityError(f"{what}: member {short(name)} has no data")
    try:
        data = f.read(member.size)
    except tarfile.TarError as exc:  # tarfile's "unexpected end of data"
        raise IntegrityError(f"{what} is truncated inside member {short(name)} ({exc})") from None
    if len(data) != member.size:
        raise IntegrityError(f"{what} is truncated inside member {short(name)}")
    return data


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


def _apply_metadata(result: Inspection, files: dict[str, bytes], what: str) -> None:
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
            {k: m.get(k) if isinstance(m.get(k), str) else "" for k in ("destination", "type", "source")}
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


def _decode_core(data: bytes, pid: int, what: str) -> tuple[str, str] | None:
    """(comm, task state) of a task's core image; None for a thread's (it has no task core)."""
    try:
        image = criu.decode_image(data, expect="CORE")
    except criu.CriuImageError as exc:
        raise UnsafeArchive(f"{what}: member 'checkpoint/core-{pid}.img': {exc}") from None
    if len(image.entries) != 1:
        raise UnsafeArchive(f"{what}: member 'checkpoint/core-{pid}.img' has {len(image.entries)} entries, expected 1")
    core = image.entries[0]
    return (criu.task_comm(core.tc), criu.task_state_name(core.tc)) if core.HasField("tc") else None


def _process_tree(pstree: bytes, cores: dict[int, tuple[str, str] | None], what: str,
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


# -- rootfs-diff.tar ----------------------------------------------------------------------------


def _list_rootfs_diff(stream: IO[bytes], result: Inspection, what: str, limits: Limits) -> RootfsDiff:
    where = f"{what}: rootfs-diff.tar"

    def broken(exc: Exception) -> BackupdError:
        return IntegrityError(f"{where}: unreadable ({exc})")

    kind, data = _decompressing(_Reader(stream, broken), where)
    diff = RootfsDiff(compression=kind)
    tar_pass = _TarPass(data if isinstance(data, _Reader) else _Reader(data, broken), where, limits)
    members = tar_pass.members()
    try:
        for _tar, member in members:
            name = member_name(member.name, where, limits)
            member_size(member.name, member.size, where, limits)
            if name == ".":
                continue
            link = member.linkname if member.issym() or member.islnk() else None
            if member.islnk():
                target = member.linkname.removeprefix("./")
                if target.startswith("/") or ".." in target.split("/"):
                    raise UnsafeArchive(f"{where}: hardlink {short(member.name)} points outside the tree "
                                        f"({short(member.linkname)}); the archive is refused")  # fmt: skip
            base = name.rsplit("/", 1)[-1]
            if base.startswith(".wh."):
                if not base.startswith(".wh..wh."):  # an OCI whiteout: containerd's record of a deletion
                    result.deleted_files.append(name[: len(name) - len(base)] + base[4:])
                continue
            if len(diff.files) >= limits.max_listed_files:
                diff.truncated = True
                result.warnings.append(f"the rootfs-diff.tar listing stops at {limits.max_listed_files} entries")
                break
            diff.files.append(RootfsEntry(name, _member_kind(member), member.size if member.isreg() else 0, link))
    finally:
        members.close()
    return diff


# -- the pass ---------------------------------------------------------------------------------


def _inspect_tar(reader: _Reader, result: Inspection, what: str, limits: Limits, *, drain: bool) -> Inspection:
    """The one pass: sizes from headers, metadata files into memory, then the trailer."""
    files: dict[str, bytes] = {}
    cores: dict[int, tuple[str, str] | None] = {}
    has_checkpoint_dir = False
    sizes = result.checkpoint_size
    tar_pass = _TarPass(reader, what, limits)
    rules = MemberRules(what, limits)  # the rules restore and verify apply, too
    for tar, member in tar_pass.members():
        result.members += 1
        kind = tarfile.GNUTYPE_SPARSE if member.sparse is not None else member.type
        name = rules.check(member.name, kind, member.size, member.linkname)
        if member.isdir():
            has_checkpoint_dir |= name == "checkpoint"
            continue
        if name.startswith("checkpoint/"):
            has_checkpoint_dir = True
            sizes.total_size += member.size
            leaf = name[len("checkpoint/") :]
            if leaf.startswith("pages-"):
                sizes.memory_pages_size += member.size
            elif leaf.startswith("amdgpu-pages-"):
                sizes.amd_gpu_memory_pages_size += member.size
        core = _CORE_RE.match(name)
        if core:
            pid = int(core[1])
            cores[pid] = _decode_core(_read_member(tar, member, name, what, limits.max_metadata_bytes), pid, what)
        elif name in _METADATA:
            files[name] = _read_member(tar, member, name, what, limits.max_metadata_bytes)
        elif name == "rootfs-diff.tar":
            sizes.root_fs_diff_size = member.size
            inner = tar.extractfile(member)
            if inner is not None:
                result.rootfs_diff = _list_rootfs_diff(inner, result, what, limits)
    if drain:
        for _ in tar_pass.rest():
            pass
    else:
        _scan_trailer(tar_pass, result)
    result.tar_size = reader.pos
    if not has_checkpoint_dir:
        raise IntegrityError(f"{what} is not a container checkpoint archive: it has no checkpoint/ directory")
    _apply_metadata(result, files, what)
    if "checkpoint/pstree.img" in files:
        result.process_tree = _process_tree(files["checkpoint/pstree.img"], cores, what, limits)
    return result


def _scan_trailer(tar_pass: _TarPass, result: Inspection) -> None:
    nonzero = scanned = 0
    for chunk in tar_pass.rest():
        scanned += len(chunk)
        nonzero += len(chunk) - chunk.count(0)
        if scanned > _TRAILER_SCAN:
            break
    if nonzero:
        more = "at least " if scanned > _TRAILER_SCAN else ""
        result.warnings.append(f"{more}{nonzero} non-zero bytes follow the end-of-archive block (ignored, as tar "
                               "readers do: stale data of an overwritten file, or something appended)")  # fmt: skip


# -- entry points -----------------------------------------------------------------------------


def inspect_tar_stream(stream: Any, unreadable: Callable[[Exception], BackupdError], *, source: str,
                       archive: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """Inspect the plain tar read from ``stream`` to its end (a catalog archive already
    decompressed and checked as it is read); read errors become ``unreadable(exc)``."""
    result = Inspection(source=source, compression="zstd", archive=archive)
    return _inspect_tar(_Reader(stream, unreadable), result, source, limits, drain=True)


def inspect_stream(raw: Any, *, source: str, limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """Inspect an archive read from ``raw`` (anything with ``read(n)``; plain or compressed
    tar), e.g. stdin. ``source`` names it in messages; read errors become StorageError."""

    def unreadable(exc: Exception) -> BackupdError:
        return StorageError(f"cannot read {source}: {exc}")

    kind, data = _decompressing(_Reader(raw, unreadable), source)
    if kind == "age":
        raise InvalidInput(f"{source} is encrypted with age: decrypt it first (age -d -i KEYFILE), then inspect "
                           "the result")  # fmt: skip
    reader = data if isinstance(data, _Reader) else _Reader(data, unreadable)
    return _inspect_tar(reader, Inspection(source=source, compression=kind), source, limits, drain=False)


def inspect_file(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """Inspect a local archive file. A symlink the user names is followed (their choice), but
    the file must be a regular one: a FIFO or a device could hang or flood the reader."""
    shown = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no file {shown!r}") from None
    except OSError as exc:
        raise InvalidInput(f"cannot open {shown!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInput(f"{shown!r} is not a regular file; give a checkpoint archive (.tar, .tar.zst, .tar.gz)")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb", buffering=_READ)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        return inspect_stream(fh, source=shown, limits=limits)


def looks_like_archive_id(target: str) -> bool:
    """Whether a CLI argument that is not an existing file can be a catalog id (prefix)."""
    return re.fullmatch(r"[0-9a-f]{4,32}", target) is not None
