"""A small, hostile-input-safe codec for the CRIU images backupd needs to read and write.

CRIU image files (https://criu.org/Images) are::

    IMAGE ::= [IMG_COMMON | IMG_SERVICE] MAGIC { u32le SIZE, SIZE bytes of protobuf }

``inventory.img`` carries only its own magic; ``stats-dump`` (and the irmap cache) start with
``IMG_SERVICE``; every other image starts with ``IMG_COMMON``. ``pagemap-*.img`` holds one
``pagemap_head`` followed by ``pagemap_entry`` messages. ``pages-*.img`` is raw memory, not an
image in this sense.

Magic numbers come from CRIU's ``criu/include/magic.h``; message layouts and field numbers from
CRIU's ``images/*.proto`` (both MIT licensed; checked against checkpoint-restore/criu
2cf8f13c and go-criu ``magic/magic.go``). Only the messages listed in ``IMAGE_TYPES`` are
modelled; fields this module does not know are skipped on decode, as protobuf does.

Contract for every ``decode_*`` function: the input is untrusted. Malformed, truncated, oversized
or unexpected data raises :class:`CriuImageError` (an ``UnsafeArchive`` and a ``ValueError``)
with a message naming the problem; nothing is ever allocated beyond the size of the input
already in memory, and nesting depth and entry counts are bounded.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, TypeVar

from backupd.errors import UnsafeArchive

__all__ = [
    "CriuImageError",
    "IMG_COMMON",
    "IMG_SERVICE",
    "MAGICS",
    "PAGE_SIZE",
    "PE_PARENT",
    "PE_LAZY",
    "PE_PRESENT",
    "TASK_STATES",
    "IMAGE_TYPES",
    "MAX_IMAGE_BYTES",
    "CriuImage",
    "InventoryEntry",
    "PluginsEntry",
    "TaskKobjIdsEntry",
    "PstreeEntry",
    "CoreEntry",
    "TaskCoreEntry",
    "ThreadCoreEntry",
    "PagemapHead",
    "PagemapEntry",
    "StatsEntry",
    "DumpStatsEntry",
    "RestoreStatsEntry",
    "MmEntry",
    "VmaEntry",
    "decode_image",
    "encode_image",
    "split_image",
    "read_image_file",
    "decode_stats",
    "encode_stats",
    "decode_message",
    "encode_message",
]


class CriuImageError(UnsafeArchive, ValueError):
    """CRIU image data is malformed, truncated, oversized or not the expected image."""


# -- magics (criu/include/magic.h) ---------------------------------------------------------

IMG_COMMON = 0x54564319
IMG_SERVICE = 0x55105940

MAGICS: dict[str, int] = {
    "INVENTORY": 0x58313116,
    "PSTREE": 0x50273030,
    "FDINFO": 0x56213732,
    "PAGEMAP": 0x56084025,
    "CORE": 0x55053847,
    "IDS": 0x54432030,
    "VMAS": 0x54123737,
    "PIPES": 0x56513555,
    "PIPES_DATA": 0x56453709,
    "FIFO": 0x58364939,
    "FIFO_DATA": 0x59333054,
    "SIGACT": 0x55344201,
    "UNIXSK": 0x54373943,
    "INETSK": 0x56443851,
    "PACKETSK": 0x60454618,
    "ITIMERS": 0x57464056,
    "POSIX_TIMERS": 0x52603957,
    "SK_QUEUES": 0x56264026,
    "UTSNS": 0x54473203,
    "CREDS": 0x54023547,
    "IPC_VAR": 0x53115007,
    "IPCNS_SHM": 0x46283044,
    "IPCNS_MSG": 0x55453737,
    "IPCNS_SEM": 0x59573019,
    "REG_FILES": 0x50363636,
    "EXT_FILES": 0x59255641,
    "FS": 0x51403912,
    "MM": 0x57492820,
    "REMAP_FPATH": 0x59133954,
    "GHOST_FILE": 0x52583605,
    "TCP_STREAM": 0x51465506,
    "EVENTFD_FILE": 0x44523722,
    "EVENTPOLL_FILE": 0x45023858,
    "EVENTPOLL_TFD": 0x44433746,
    "SIGNALFD": 0x57323820,
    "INOTIFY_FILE": 0x48424431,
    "INOTIFY_WD": 0x54562009,
    "MNTS": 0x55563928,
    "NETDEV": 0x57373951,
    "NETNS": 0x55933752,
    "TTY_FILES": 0x59433025,
    "TTY_INFO": 0x59453036,
    "TTY_DATA": 0x59413026,
    "FILE_LOCKS": 0x54323616,
    "RLIMIT": 0x57113925,
    "FANOTIFY_FILE": 0x55096122,
    "FANOTIFY_MARK": 0x56506035,
    "SIGNAL": 0x59255647,
    "NETLINK_SK": 0x58005614,
    "NS_FILES": 0x61394011,
    "TUNFILE": 0x57143751,
    "CGROUP": 0x59383330,
    "TIMERFD": 0x50493712,
    "CPUINFO": 0x61404013,
    "USERNS": 0x55474906,
    "SECCOMP": 0x64413049,
    "BINFMT_MISC": 0x67343323,
    "AUTOFS": 0x49353943,
    "FILES": 0x56303138,
    "MEMFD_INODE": 0x48453499,
    "TIMENS": 0x43114433,
    "PIDNS": 0x61157326,
    "BPFMAP_FILE": 0x57506142,
    "BPFMAP_DATA": 0x64324033,
    "APPARMOR": 0x59423047,
    "PIDFD": 0x54435556,
    "STATS": 0x57093306,
    "IRMAP_CACHE": 0x57004059,
}
_MAGIC_NAMES: dict[int, str] = {}
for _name, _value in MAGICS.items():
    # CPUINFO and NS_FILES share a town name but not a value; keep the first name per value.
    _MAGIC_NAMES.setdefault(_value, _name)

_SERVICE_IMAGES = frozenset({"STATS", "IRMAP_CACHE"})
_BARE_IMAGES = frozenset({"INVENTORY"})

PAGE_SIZE = 4096

# pagemap_entry.flags (criu/include/pagemap.h)
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# task_core_entry.task_state (compel/include/uapi/task-state.h)
TASK_STATES: dict[int, str] = {1: "Alive", 2: "Dead", 3: "Stopped", 6: "Zombie"}

# Bounds for untrusted input. An image bigger than this is refused before it is read.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
MAX_ENTRIES = 4_000_000
MAX_DEPTH = 16


# -- protobuf wire format ----------------------------------------------------------------

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_SGROUP, _WIRE_EGROUP, _WIRE_FIXED32 = range(6)
_U64 = (1 << 64) - 1


def _read_varint(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buf)
    for _ in range(10):
        if pos >= end:
            raise CriuImageError(f"truncated varint in {what}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _U64:
                raise CriuImageError(f"varint overflows 64 bits in {what}")
            return result, pos
        shift += 7
    raise CriuImageError(f"varint longer than 10 bytes in {what}")


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value &= _U64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _iter_fields(buf: memoryview, what: str) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, raw value) for each field of one message."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos, what)
        number, wire = key >> 3, key & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise CriuImageError(f"invalid field number {number} in {what}")
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos, what)
        elif wire == _WIRE_FIXED64:
            if pos + 8 > end:
                raise CriuImageError(f"truncated fixed64 field {number} in {what}")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == _WIRE_FIXED32:
            if pos + 4 > end:
                raise CriuImageError(f"truncated fixed32 field {number} in {what}")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos, what)
            if length > end - pos:
                raise CriuImageError(
                    f"field {number} in {what} claims {length} bytes, only {end - pos} left"
                )
            value = buf[pos : pos + length]
            pos += length
        else:
            raise CriuImageError(f"unsupported wire type {wire} (field {number}) in {what}")
        yield number, wire, value


# -- message schema ----------------------------------------------------------------------

_VARINT_KINDS = frozenset({"uint32", "uint64", "int32", "int64", "sint32", "sint64", "bool", "enum"})


@dataclass(frozen=True)
class _Field:
    number: int
    attr: str
    kind: str  # a scalar kind, "string", "bytes", "fixed32", "fixed64" or "message"
    required: bool = False
    repeated: bool = False
    message: type | None = None


class _Message:
    """Base of the modelled messages: a dataclass plus a ``_schema`` of protobuf fields."""

    _schema: ClassVar[tuple[_Field, ...]] = ()
    _by_number: ClassVar[dict[int, _Field]] = {}


M = TypeVar("M", bound=_Message)


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _scalar_from_varint(kind: str, value: int) -> Any:
    if kind == "uint32":
        return value & 0xFFFFFFFF
    if kind == "uint64":
        return value
    if kind in ("int32", "enum"):
        return _signed(value, 32)
    if kind == "int64":
        return _signed(value, 64)
    if kind == "sint32":
        value &= 0xFFFFFFFF
        return (value >> 1) ^ -(value & 1)
    if kind == "sint64":
        return (value >> 1) ^ -(value & 1)
    if kind == "bool":
        return value != 0
    raise AssertionError(kind)


def _convert(f: _Field, wire: int, value: Any, what: str, depth: int) -> list[Any]:
    """Turn one wire value into a list of Python values (packed repeated fields give many)."""
    kind = f.kind
    if kind in _VARINT_KINDS:
        if wire == _WIRE_VARINT:
            return [_scalar_from_varint(kind, value)]
        if wire == _WIRE_LEN and f.repeated:
            out: list[Any] = []
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos, what)
                out.append(_scalar_from_varint(kind, item))
            return out
    elif kind in ("fixed32", "fixed64"):
        size, expected = (4, _WIRE_FIXED32) if kind == "fixed32" else (8, _WIRE_FIXED64)
        if wire == expected:
            return [value]
        if wire == _WIRE_LEN and f.repeated:
            if len(value) % size:
                raise CriuImageError(f"packed {kind} field {f.attr} in {what} has a ragged length")
            return [int.from_bytes(value[i : i + size], "little") for i in range(0, len(value), size)]
    elif wire == _WIRE_LEN:
        if kind == "bytes":
            return [bytes(value)]
        if kind == "string":
            # surrogateescape keeps non-UTF-8 bytes (a comm may hold any byte) round-trippable
            return [bytes(value).decode("utf-8", "surrogateescape")]
        if kind == "message":
            assert f.message is not None
            return [_decode_message(f.message, value, depth + 1)]
    raise CriuImageError(f"field {f.attr} ({f.number}) of {what} has wire type {wire}, not {kind}")


def _decode_message(cls: type[M], buf: memoryview | bytes, depth: int = 0) -> M:
    what = cls.__name__
    if depth > MAX_DEPTH:
        raise CriuImageError(f"messages nested deeper than {MAX_DEPTH} at {what}")
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    by_number = cls._by_number
    values: dict[str, Any] = {}
    seen: set[int] = set()
    for number, wire, raw in _iter_fields(view, what):
        f = by_number.get(number)
        if f is None:
            continue
        items = _convert(f, wire, raw, what, depth)
        if f.repeated:
            values.setdefault(f.attr, []).extend(items)
        else:
            values[f.attr] = items[-1]
        seen.add(number)
    missing = [f.attr for f in cls._schema if f.required and f.number not in seen]
    if missing:
        raise CriuImageError(f"{what} lacks required field(s): {', '.join(missing)}")
    return cls(**values)


def _encode_field(f: _Field, value: Any) -> bytes:
    kind = f.kind
    if kind in _VARINT_KINDS:
        if kind == "bool":
            value = 1 if value else 0
        elif kind == "sint32":
            value = ((value << 1) ^ (value >> 31)) & 0xFFFFFFFF
        elif kind == "sint64":
            value = ((value << 1) ^ (value >> 63)) & _U64
        return _encode_varint(f.number << 3 | _WIRE_VARINT) + _encode_varint(int(value))
    if kind == "fixed32":
        return _encode_varint(f.number << 3 | _WIRE_FIXED32) + struct.pack("<I", value)
    if kind == "fixed64":
        return _encode_varint(f.number << 3 | _WIRE_FIXED64) + struct.pack("<Q", value)
    if kind == "string":
        payload = value.encode("utf-8", "surrogateescape")
    elif kind == "bytes":
        payload = bytes(value)
    else:
        payload = encode_message(value)
    return _encode_varint(f.number << 3 | _WIRE_LEN) + _encode_varint(len(payload)) + payload


def encode_message(msg: _Message) -> bytes:
    """Serialise one modelled message (proto2: required fields always, optional when not None)."""
    out = bytearray()
    for f in type(msg)._schema:
        value = getattr(msg, f.attr)
        if f.repeated:
            for item in value or ():
                out += _encode_field(f, item)
        elif value is None:
            if f.required:
                raise ValueError(f"{type(msg).__name__}.{f.attr} is required")
        else:
            out += _encode_field(f, value)
    return bytes(out)


def decode_message(cls: type[M], data: bytes | memoryview) -> M:
    """Parse one protobuf message of type ``cls`` from untrusted bytes."""
    return _decode_message(cls, data)


def _schema(*fields: _Field):
    def attach(cls: type[M]) -> type[M]:
        cls._schema = fields
        cls._by_number = {f.number: f for f in fields}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        assert names == {f.attr for f in fields}, (cls.__name__, names ^ {f.attr for f in fields})
        return cls

    return attach


def _req(number: int, attr: str, kind: str, message: type | None = None) -> _Field:
    return _Field(number, attr, kind, required=True, message=message)


def _opt(number: int, attr: str, kind: str, message: type | None = None) -> _Field:
    return _Field(number, attr, kind, message=message)


def _rep(number: int, attr: str, kind: str, message: type | None = None) -> _Field:
    return _Field(number, attr, kind, repeated=True, message=message)


# -- messages (images/*.proto) -------------------------------------------------------------


@_schema(
    _req(1, "vm_id", "uint32"),
    _req(2, "files_id", "uint32"),
    _req(3, "fs_id", "uint32"),
    _req(4, "sighand_id", "uint32"),
    _opt(5, "pid_ns_id", "uint32"),
    _opt(6, "net_ns_id", "uint32"),
    _opt(7, "ipc_ns_id", "uint32"),
    _opt(8, "uts_ns_id", "uint32"),
    _opt(9, "mnt_ns_id", "uint32"),
    _opt(10, "user_ns_id", "uint32"),
    _opt(11, "cgroup_ns_id", "uint32"),
    _opt(12, "time_ns_id", "uint32"),
)
@dataclass
class TaskKobjIdsEntry(_Message):
    vm_id: int = 0
    files_id: int = 0
    fs_id: int = 0
    sighand_id: int = 0
    pid_ns_id: int | None = None
    net_ns_id: int | None = None
    ipc_ns_id: int | None = None
    uts_ns_id: int | None = None
    mnt_ns_id: int | None = None
    user_ns_id: int | None = None
    cgroup_ns_id: int | None = None
    time_ns_id: int | None = None


@_schema(_rep(12, "plugins", "string"))
@dataclass
class PluginsEntry(_Message):
    plugins: list[str] = field(default_factory=list)


@_schema(
    _req(1, "img_version", "uint32"),
    _opt(2, "fdinfo_per_id", "bool"),
    _opt(3, "root_ids", "message", TaskKobjIdsEntry),
    _opt(4, "ns_per_id", "bool"),
    _opt(5, "root_cg_set", "uint32"),
    _opt(6, "lsmtype", "enum"),
    _opt(8, "dump_uptime", "uint64"),
    _opt(9, "pre_dump_mode", "uint32"),
    _opt(10, "tcp_close", "bool"),
    _opt(11, "network_lock_method", "uint32"),
    _opt(12, "plugins_entry", "message", PluginsEntry),
    _opt(13, "dump_criu_run_id", "string"),
    _opt(14, "allow_uprobes", "bool"),
)
@dataclass
class InventoryEntry(_Message):
    """``inventory_entry``; img_version is 2 (CRTOOLS_IMAGES_V1_1) for every current CRIU."""

    img_version: int = 2
    fdinfo_per_id: bool | None = None
    root_ids: TaskKobjIdsEntry | None = None
    ns_per_id: bool | None = None
    root_cg_set: int | None = None
    lsmtype: int | None = None  # 0 NO_LSM, 1 SELINUX, 2 APPARMOR
    dump_uptime: int | None = None
    pre_dump_mode: int | None = None
    tcp_close: bool | None = None
    network_lock_method: int | None = None
    plugins_entry: PluginsEntry | None = None
    dump_criu_run_id: str | None = None
    allow_uprobes: bool | None = None


@_schema(
    _req(1, "pid", "uint32"),
    _req(2, "ppid", "uint32"),
    _req(3, "pgid", "uint32"),
    _req(4, "sid", "uint32"),
    _rep(5, "threads", "uint32"),
)
@dataclass
class PstreeEntry(_Message):
    pid: int = 0
    ppid: int = 0
    pgid: int = 0
    sid: int = 0
    threads: list[int] = field(default_factory=list)


@_schema(
    _req(1, "task_state", "uint32"),
    _req(2, "exit_code", "uint32"),
    _req(3, "personality", "uint32"),
    _req(4, "flags", "uint32"),
    _req(5, "blk_sigset", "uint64"),
    _req(6, "comm", "string"),
    _opt(9, "cg_set", "uint32"),
    _opt(11, "old_seccomp_mode", "enum"),
    _opt(12, "old_seccomp_filter", "uint32"),
    _opt(13, "loginuid", "uint32"),
    _opt(14, "oom_score_adj", "int32"),
    _opt(18, "child_subreaper", "bool"),
    _opt(20, "blk_sigset_extended", "uint64"),
    _opt(21, "stop_signo", "uint32"),
    _opt(22, "membarrier_registration_mask", "uint32"),
)
@dataclass
class TaskCoreEntry(_Message):
    """``task_core_entry`` without timers, rlimits, signals and sigactions (skipped on decode)."""

    task_state: int = 1
    exit_code: int = 0
    personality: int = 0
    flags: int = 0
    blk_sigset: int = 0
    comm: str = ""
    cg_set: int | None = None
    old_seccomp_mode: int | None = None
    old_seccomp_filter: int | None = None
    loginuid: int | None = None
    oom_score_adj: int | None = None
    child_subreaper: bool | None = None
    blk_sigset_extended: int | None = None
    stop_signo: int | None = None
    membarrier_registration_mask: int | None = None

    @property
    def state_name(self) -> str:
        return TASK_STATES.get(self.task_state, "Unknown")


@_schema(
    _req(1, "futex_rla", "uint64"),
    _req(2, "futex_rla_len", "uint32"),
    _opt(3, "sched_nice", "sint32"),
    _opt(4, "sched_policy", "uint32"),
    _opt(5, "sched_prio", "uint32"),
    _opt(6, "blk_sigset", "uint64"),
    _opt(8, "pdeath_sig", "uint32"),
    _opt(13, "comm", "string"),
    _opt(16, "cg_set", "uint32"),
)
@dataclass
class ThreadCoreEntry(_Message):
    """``thread_core_entry`` without sas, signals, creds and rseq (skipped on decode)."""

    futex_rla: int = 0
    futex_rla_len: int = 0
    sched_nice: int | None = None
    sched_policy: int | None = None
    sched_prio: int | None = None
    blk_sigset: int | None = None
    pdeath_sig: int | None = None
    comm: str | None = None
    cg_set: int | None = None


@_schema(
    _req(1, "mtype", "enum"),
    _opt(3, "tc", "message", TaskCoreEntry),
    _opt(4, "ids", "message", TaskKobjIdsEntry),
    _opt(5, "thread_core", "message", ThreadCoreEntry),
)
@dataclass
class CoreEntry(_Message):
    """``core_entry``; per-architecture register sets (thread_info …) are skipped on decode."""

    MTYPES: ClassVar[dict[str, int]] = {
        "x86_64": 1, "arm": 2, "aarch64": 3, "ppc64le": 4, "s390x": 5, "mips": 6,
        "loongarch64": 7, "riscv64": 8,
    }  # fmt: skip

    mtype: int = 1
    tc: TaskCoreEntry | None = None
    ids: TaskKobjIdsEntry | None = None
    thread_core: ThreadCoreEntry | None = None


@_schema(_req(1, "pages_id", "uint32"))
@dataclass
class PagemapHead(_Message):
    pages_id: int = 0


@_schema(
    _req(1, "vaddr", "uint64"),
    _req(2, "compat_nr_pages", "uint32"),
    _opt(3, "in_parent", "bool"),
    _opt(4, "flags", "uint32"),
    _opt(5, "nr_pages", "uint64"),
)
@dataclass
class PagemapEntry(_Message):
    vaddr: int = 0
    compat_nr_pages: int = 0
    in_parent: bool | None = None
    flags: int | None = None
    nr_pages: int | None = None

    @property
    def pages(self) -> int:
        """The page count, from ``nr_pages`` or, in old images, ``compat_nr_pages``."""
        return self.nr_pages if self.nr_pages is not None else self.compat_nr_pages


@_schema(
    _req(1, "freezing_time", "uint32"),
    _req(2, "frozen_time", "uint32"),
    _req(3, "memdump_time", "uint32"),
    _req(4, "memwrite_time", "uint32"),
    _req(5, "pages_scanned", "uint64"),
    _req(6, "pages_skipped_parent", "uint64"),
    _req(7, "pages_written", "uint64"),
    _opt(8, "irmap_resolve", "uint32"),
    _req(9, "pages_lazy", "uint64"),
    _opt(10, "page_pipes", "uint64"),
    _opt(11, "page_pipe_bufs", "uint64"),
    _opt(12, "shpages_scanned", "uint64"),
    _opt(13, "shpages_skipped_parent", "uint64"),
    _opt(14, "shpages_written", "uint64"),
)
@dataclass
class DumpStatsEntry(_Message):
    """``dump_stats_entry``: times in microseconds, counts in pages."""

    freezing_time: int = 0
    frozen_time: int = 0
    memdump_time: int = 0
    memwrite_time: int = 0
    pages_scanned: int = 0
    pages_skipped_parent: int = 0
    pages_written: int = 0
    irmap_resolve: int | None = None
    pages_lazy: int = 0
    page_pipes: int | None = None
    page_pipe_bufs: int | None = None
    shpages_scanned: int | None = None
    shpages_skipped_parent: int | None = None
    shpages_written: int | None = None


@_schema(
    _req(1, "pages_compared", "uint64"),
    _req(2, "pages_skipped_cow", "uint64"),
    _req(3, "forking_time", "uint32"),
    _req(4, "restore_time", "uint32"),
    _opt(5, "pages_restored", "uint64"),
)
@dataclass
class RestoreStatsEntry(_Message):
    pages_compared: int = 0
    pages_skipped_cow: int = 0
    forking_time: int = 0
    restore_time: int = 0
    pages_restored: int | None = None


@_schema(
    _opt(1, "dump", "message", DumpStatsEntry),
    _opt(2, "restore", "message", RestoreStatsEntry),
)
@dataclass
class StatsEntry(_Message):
    dump: DumpStatsEntry | None = None
    restore: RestoreStatsEntry | None = None


@_schema(
    _req(1, "start", "uint64"),
    _req(2, "end", "uint64"),
    _req(3, "pgoff", "uint64"),
    _req(4, "shmid", "uint64"),
    _req(5, "prot", "uint32"),
    _req(6, "flags", "uint32"),
    _req(7, "status", "uint32"),
    _req(8, "fd", "sint64"),
    _opt(9, "madv", "uint64"),
    _opt(10, "fdflags", "uint32"),
)
@dataclass
class VmaEntry(_Message):
    start: int = 0
    end: int = 0
    pgoff: int = 0
    shmid: int = 0
    prot: int = 0
    flags: int = 0
    status: int = 0
    fd: int = -1
    madv: int | None = None
    fdflags: int | None = None


@_schema(
    _req(1, "mm_start_code", "uint64"),
    _req(2, "mm_end_code", "uint64"),
    _req(3, "mm_start_data", "uint64"),
    _req(4, "mm_end_data", "uint64"),
    _req(5, "mm_start_stack", "uint64"),
    _req(6, "mm_start_brk", "uint64"),
    _req(7, "mm_brk", "uint64"),
    _req(8, "mm_arg_start", "uint64"),
    _req(9, "mm_arg_end", "uint64"),
    _req(10, "mm_env_start", "uint64"),
    _req(11, "mm_env_end", "uint64"),
    _req(12, "exe_file_id", "uint32"),
    _rep(13, "mm_saved_auxv", "uint64"),
    _rep(14, "vmas", "message", VmaEntry),
    _opt(15, "dumpable", "int32"),
    _opt(17, "thp_disabled", "bool"),
)
@dataclass
class MmEntry(_Message):
    """``mm_entry`` without aio rings (skipped on decode)."""

    mm_start_code: int = 0
    mm_end_code: int = 0
    mm_start_data: int = 0
    mm_end_data: int = 0
    mm_start_stack: int = 0
    mm_start_brk: int = 0
    mm_brk: int = 0
    mm_arg_start: int = 0
    mm_arg_end: int = 0
    mm_env_start: int = 0
    mm_env_end: int = 0
    exe_file_id: int = 0
    mm_saved_auxv: list[int] = field(default_factory=list)
    vmas: list[VmaEntry] = field(default_factory=list)
    dumpable: int | None = None
    thp_disabled: bool | None = None


# Which message each image holds. PAGEMAP is special: a head, then entries.
IMAGE_TYPES: dict[str, type[_Message]] = {
    "INVENTORY": InventoryEntry,
    "PSTREE": PstreeEntry,
    "CORE": CoreEntry,
    "PAGEMAP": PagemapEntry,
    "STATS": StatsEntry,
    "MM": MmEntry,
    "IDS": TaskKobjIdsEntry,
}


# -- image files -------------------------------------------------------------------------


@dataclass
class CriuImage:
    """A decoded image: its magic name and its entries (for PAGEMAP, a PagemapHead first)."""

    magic: str
    entries: list[Any]


def _magic_header(magic: str) -> bytes:
    try:
        value = MAGICS[magic]
    except KeyError:
        raise ValueError(f"unknown CRIU image magic name {magic!r}") from None
    if magic in _BARE_IMAGES:
        return struct.pack("<I", value)
    lead = IMG_SERVICE if magic in _SERVICE_IMAGES else IMG_COMMON
    return struct.pack("<II", lead, value)


def split_image(data: bytes | memoryview, *, expect: str | None = None) -> tuple[str, list[memoryview]]:
    """Parse the framing of an image: return its magic name and the raw protobuf entries.

    Refuses unknown magics, an ``expect``-ed magic that does not match, sizes that run past
    the end of the data and more than ``MAX_ENTRIES`` entries.
    """
    view = data if isinstance(data, memoryview) else memoryview(data)
    if len(view) < 4:
        raise CriuImageError(f"CRIU image too short ({len(view)} bytes) to hold a magic")
    (first,) = struct.unpack_from("<I", view, 0)
    pos = 4
    if first in (IMG_COMMON, IMG_SERVICE):
        if len(view) < 8:
            raise CriuImageError("CRIU image truncated after its common magic")
        (value,) = struct.unpack_from("<I", view, 4)
        pos = 8
    else:
        value = first
    name = _MAGIC_NAMES.get(value)
    if name is None:
        raise CriuImageError(f"not a CRIU image: unknown magic 0x{value:08x}")
    if expect is not None and name != expect:
        raise CriuImageError(f"expected a CRIU {expect} image, found {name}")
    entries: list[memoryview] = []
    end = len(view)
    while pos < end:
        if end - pos < 4:
            raise CriuImageError(f"{name} image truncated in an entry size ({end - pos} bytes left)")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if size > end - pos:
            raise CriuImageError(
                f"{name} image entry {len(entries)} claims {size} bytes, only {end - pos} left"
            )
        if len(entries) >= MAX_ENTRIES:
            raise CriuImageError(f"{name} image has more than {MAX_ENTRIES} entries")
        entries.append(view[pos : pos + size])
        pos += size
    return name, entries


def decode_image(data: bytes | memoryview, *, expect: str | None = None) -> CriuImage:
    """Decode an image of one of the types in ``IMAGE_TYPES`` (see module contract)."""
    name, raw = split_image(data, expect=expect)
    cls = IMAGE_TYPES.get(name)
    if cls is None:
        raise CriuImageError(f"no decoder for CRIU {name} images")
    if name == "PAGEMAP":
        if not raw:
            raise CriuImageError("PAGEMAP image has no pagemap_head")
        head: list[Any] = [_decode_message(PagemapHead, raw[0])]
        return CriuImage(name, head + [_decode_message(PagemapEntry, e) for e in raw[1:]])
    return CriuImage(name, [_decode_message(cls, e) for e in raw])


def encode_image(magic: str, entries: Sequence[_Message]) -> bytes:
    """Frame ``entries`` as an image with ``magic`` (e.g. ``"PSTREE"``); the right leading
    magic (none, IMG_COMMON or IMG_SERVICE) is chosen from the image type."""
    out = bytearray(_magic_header(magic))
    for entry in entries:
        payload = encode_message(entry)
        out += struct.pack("<I", len(payload))
        out += payload
    return bytes(out)


def read_image_file(source: str | os.PathLike[str] | BinaryIO, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Read an image file (path or binary stream), refusing anything over ``max_bytes``."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            data = fh.read(max_bytes + 1)
    else:
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CriuImageError(f"CRIU image larger than the {max_bytes}-byte limit")
    return data


def decode_stats(data: bytes | memoryview) -> StatsEntry:
    """Decode a ``stats-dump``/``stats-restore`` file: exactly one ``stats_entry``."""
    image = decode_image(data, expect="STATS")
    if len(image.entries) != 1:
        raise CriuImageError(f"STATS image has {len(image.entries)} entries, expected 1")
    return image.entries[0]


def encode_stats(stats: StatsEntry) -> bytes:
    return encode_image("STATS", [stats])
