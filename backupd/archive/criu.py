"""CRIU image files: CRIU's framing around CRIU's own protobuf messages.

CRIU image files (https://criu.org/Images) are::

    IMAGE ::= [IMG_COMMON | IMG_SERVICE] MAGIC { u32le SIZE, SIZE bytes of protobuf }

``inventory.img`` carries only its own magic; ``stats-dump`` (and the irmap cache) start with
``IMG_SERVICE``; every other image starts with ``IMG_COMMON``. ``pagemap-*.img`` holds one
``pagemap_head`` followed by ``pagemap_entry`` messages. ``pages-*.img`` is raw memory, not an
image in this sense.

The framing and the magic numbers (CRIU's ``criu/include/magic.h``) are this module's; the
messages are the classes protoc generated from CRIU's ``images/*.proto``
(:mod:`backupd.archive.criu_proto`, vendored with CRIU's MIT licence), exported here under the
names backupd uses (``PstreeEntry`` is CRIU's ``pstree_entry`` ...). The simulator encodes its
synthetic images with the same classes and :func:`encode_image`.

Contract for every ``decode_*`` function: the input is untrusted. Malformed, truncated, oversized
or unexpected data raises :class:`CriuImageError` (an ``UnsafeArchive`` and a ``ValueError``)
with a message naming the problem. The bounds: an image file over ``MAX_IMAGE_BYTES`` is refused
before it is read (:func:`read_image_file`), an entry size running past the data or more than
``MAX_ENTRIES`` entries are refused by the framing before any message is parsed, and protobuf's
parser refuses lengths running past an entry and nesting deeper than its limit (100 levels; the
CRIU messages backupd decodes nest at most 4 deep). Fields this module does not model are
parsed and dropped, as protobuf does; a message missing a ``required`` field is refused.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from google.protobuf.message import DecodeError, Message

from backupd.archive.criu_proto import core_pb2, inventory_pb2, mm_pb2, pagemap_pb2, pstree_pb2, stats_pb2, vma_pb2
from backupd.errors import UnsafeArchive

__all__ = [
    "CriuImageError",
    "IMG_COMMON",
    "IMG_SERVICE",
    "MAGICS",
    "MACHINES",
    "PAGE_SIZE",
    "PE_PARENT",
    "PE_LAZY",
    "PE_PRESENT",
    "TASK_STATES",
    "IMAGE_TYPES",
    "MAX_ENTRIES",
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
    "machine_name",
    "pagemap_pages",
    "task_comm",
    "task_state_name",
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


# -- CRIU's messages (images/*.proto), under the names backupd uses ---------------------------

InventoryEntry = inventory_pb2.inventory_entry
PluginsEntry = inventory_pb2.plugins_entry
TaskKobjIdsEntry = core_pb2.task_kobj_ids_entry
PstreeEntry = pstree_pb2.pstree_entry
CoreEntry = core_pb2.core_entry
TaskCoreEntry = core_pb2.task_core_entry
ThreadCoreEntry = core_pb2.thread_core_entry
PagemapHead = pagemap_pb2.pagemap_head
PagemapEntry = pagemap_pb2.pagemap_entry
StatsEntry = stats_pb2.stats_entry
DumpStatsEntry = stats_pb2.dump_stats_entry
RestoreStatsEntry = stats_pb2.restore_stats_entry
MmEntry = mm_pb2.mm_entry
VmaEntry = vma_pb2.vma_entry

# Which message each image holds. PAGEMAP is special: a head, then entries.
IMAGE_TYPES: dict[str, type[Message]] = {
    "INVENTORY": InventoryEntry,
    "PSTREE": PstreeEntry,
    "CORE": CoreEntry,
    "PAGEMAP": PagemapEntry,
    "STATS": StatsEntry,
    "MM": MmEntry,
    "IDS": TaskKobjIdsEntry,
}

#: CRIU's ``core_entry.march`` name (``X86_64`` ...) by machine as ``uname -m`` spells it (``x86_64``,
#: ``aarch64`` ...); CRIU's PPC64 and S390 are the little-endian ppc64le and s390x it supports.
_UNAME = {"PPC64": "ppc64le", "S390": "s390x"}
MACHINES: dict[str, str] = {
    _UNAME.get(name, name.lower()): name for name in CoreEntry.march.keys() if name != "UNKNOWN"
}

M = TypeVar("M", bound=Message)


def task_state_name(tc: core_pb2.task_core_entry) -> str:
    """``Alive``, ``Dead``, ``Stopped``, ``Zombie`` (what checkpointctl shows) or ``Unknown``."""
    return TASK_STATES.get(tc.task_state, "Unknown")


def task_comm(tc: core_pb2.task_core_entry) -> str:
    """The task's command name. A comm may hold any byte; protobuf hands a proto2 string that is
    not UTF-8 back as bytes, kept here with ``surrogateescape`` so it round-trips."""
    comm: str | bytes = tc.comm
    return comm.decode("utf-8", "surrogateescape") if isinstance(comm, bytes) else comm


def pagemap_pages(entry: pagemap_pb2.pagemap_entry) -> int:
    """The page count, from ``nr_pages`` or, in old images, ``compat_nr_pages``."""
    return entry.nr_pages if entry.HasField("nr_pages") else entry.compat_nr_pages


def machine_name(mtype: int) -> str | None:
    """The machine (``x86_64`` ...) of a ``core_entry.mtype``; None for UNKNOWN or a new one."""
    for machine, name in MACHINES.items():
        if CoreEntry.march.Value(name) == mtype:
            return machine
    return None


# -- messages ----------------------------------------------------------------------------------


def decode_message(cls: type[M], data: bytes | memoryview) -> M:
    """Parse one protobuf message of type ``cls`` from untrusted bytes; every ``required``
    field must be there (protobuf's parser does not check that itself)."""
    message = cls()
    name = cls.DESCRIPTOR.name
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise CriuImageError(f"malformed {name} message ({exc})") from None
    if not message.IsInitialized():
        missing = message.FindInitializationErrors()  # type: ignore[attr-defined]  # not in types-protobuf
        raise CriuImageError(f"{name} lacks required field(s): {', '.join(missing)}")
    message.DiscardUnknownFields()
    return message


def encode_message(message: Message) -> bytes:
    """Serialise one message. ``required`` fields left unset are written with their proto2
    default (zero), as CRIU's own writer fills them; ``message`` itself is not changed."""
    complete = type(message)()
    complete.CopyFrom(message)
    _default_required_fields(complete)
    return complete.SerializeToString()


def _default_required_fields(message: Message) -> None:
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                for item in value:
                    _default_required_fields(item)
            elif field.is_required or message.HasField(field.name):
                value.SetInParent()
                _default_required_fields(value)
        elif field.is_required and not message.HasField(field.name):
            setattr(message, field.name, field.default_value)


# -- image files -------------------------------------------------------------------------------


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


def split_image(data: bytes | memoryview, *, expect: str | None = None,
                max_entries: int = MAX_ENTRIES) -> tuple[str, list[memoryview]]:
    """Parse the framing of an image: return its magic name and the raw protobuf entries.

    Refuses unknown magics, an ``expect``-ed magic that does not match, sizes that run past
    the end of the data and more than ``max_entries`` entries.
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
            raise CriuImageError(f"{name} image entry {len(entries)} claims {size} bytes, only {end - pos} left")
        if len(entries) >= max_entries:
            raise CriuImageError(f"{name} image has more than {max_entries} entries")
        entries.append(view[pos : pos + size])
        pos += size
    return name, entries


def _decode_entry(cls: type[M], raw: memoryview, image: str, index: int) -> M:
    try:
        return decode_message(cls, raw)
    except CriuImageError as exc:
        raise CriuImageError(f"{image} image entry {index}: {exc}") from None


def decode_image(data: bytes | memoryview, *, expect: str | None = None) -> CriuImage:
    """Decode an image of one of the types in ``IMAGE_TYPES`` (see module contract)."""
    name, raw = split_image(data, expect=expect)
    cls = IMAGE_TYPES.get(name)
    if cls is None:
        raise CriuImageError(f"no decoder for CRIU {name} images")
    if name == "PAGEMAP":
        if not raw:
            raise CriuImageError("PAGEMAP image has no pagemap_head")
        head: list[Any] = [_decode_entry(PagemapHead, raw[0], name, 0)]
        return CriuImage(name, head + [_decode_entry(PagemapEntry, e, name, i) for i, e in enumerate(raw[1:], 1)])
    return CriuImage(name, [_decode_entry(cls, e, name, i) for i, e in enumerate(raw)])


def encode_image(magic: str, entries: Sequence[Message]) -> bytes:
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


def decode_stats(data: bytes | memoryview) -> stats_pb2.stats_entry:
    """Decode a ``stats-dump``/``stats-restore`` file: exactly one ``stats_entry``."""
    image = decode_image(data, expect="STATS")
    if len(image.entries) != 1:
        raise CriuImageError(f"STATS image has {len(image.entries)} entries, expected 1")
    entry: stats_pb2.stats_entry = image.entries[0]
    return entry


def encode_stats(stats: stats_pb2.stats_entry) -> bytes:
    return encode_image("STATS", [stats])
