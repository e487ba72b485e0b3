"""Which tar members backupd accepts: the limits, the name rules, and the two rule sets.

:class:`MemberRules` is what a checkpoint archive may hold (regular files and directories with
safe, unique names); :class:`ContentRules` is what ``rootfs-diff.tar`` -- the container's changed
files, where links and device nodes are legitimate content -- may hold. Both are applied by the
one tar reader, :class:`backupd.archive.tar.TarScanner`; its docstring lists every refusal.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import Protocol

from backupd.errors import UnsafeArchive

REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LINKS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink"}
_SPECIAL = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
            tarfile.GNUTYPE_SPARSE: "a sparse file"}  # fmt: skip
_KINDS = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
          tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo", tarfile.GNUTYPE_SPARSE: "file"}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Bounds that make a hostile archive cost little; anything beyond them is refused."""

    max_metadata_bytes: int = 16 << 20  # per metadata file held in memory
    max_header_bytes: int = 1 << 20  # one member's headers, PAX and GNU extensions included
    max_extended_headers: int = 8  # extended headers chained before one member
    max_member_size: int = 1 << 44  # 16 TiB declared for one member is not a checkpoint
    max_members: int = 500_000
    max_name_length: int = 4096
    max_listed_files: int = 10_000  # inspect: rootfs-diff.tar entries listed (then ``truncated``)
    max_process_depth: int = 128  # inspect: process tree depth


DEFAULT_LIMITS = Limits()


def short(name: str, limit: int = 160) -> str:
    """A member name for a message: quoted, and cut when absurdly long."""
    return repr(name if len(name) <= limit else name[:limit] + "…")


def member_name(name: str, what: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """The normalised member name (no ``./`` prefix, no trailing ``/``; ``.`` for the root).

    Refuses what could escape a directory it were extracted to: absolute names, ``..``
    segments, empty segments or a NUL, and names longer than ``limits.max_name_length``.
    """
    if len(name) > limits.max_name_length:
        raise UnsafeArchive(f"{what}: member name {short(name)} is longer than {limits.max_name_length} characters; "
                            "refused as hostile")  # fmt: skip
    n = name
    while n.startswith("./"):
        n = n[2:]
    if n.startswith("/"):
        raise UnsafeArchive(f"{what}: member {short(name)} has an absolute name; the archive is refused (nothing "
                            "was extracted); do not restore it with a tool that would write it")  # fmt: skip
    n = n.rstrip("/")
    if n in ("", "."):
        return "."
    parts = n.split("/")
    if ".." in parts:
        raise UnsafeArchive(f"{what}: member {short(name)} climbs out of the archive with '..' (path traversal); "
                            "the archive is refused (nothing was extracted)")  # fmt: skip
    if "" in parts or "\x00" in n:
        raise UnsafeArchive(f"{what}: member {short(name)} has an empty path segment or a NUL; the archive is "
                            "refused")  # fmt: skip
    return n


def member_size(name: str, size: int, what: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """``size`` as a member declares it, refused when negative or over ``limits.max_member_size``
    (judged before any data is read)."""
    if size < 0 or size > limits.max_member_size:
        raise UnsafeArchive(f"{what}: member {short(name)} declares {size} bytes (limit "
                            f"{limits.max_member_size}); refused as hostile")  # fmt: skip
    return size


class Rules(Protocol):
    """What a scanner asks of each member header: its normalised name, or a refusal."""

    members: int

    def check(self, name: str, kind: bytes, size: int, linkname: str = "") -> str: ...


class MemberRules:
    """The rules of the module docstring for a checkpoint archive, member by member."""

    def __init__(self, what: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.what = what
        self.limits = limits
        self.members = 0
        self._files: set[bytes] = set()  # digests of the names: bounded memory per member

    def check(self, name: str, kind: bytes, size: int, linkname: str = "") -> str:
        """The normalised name of an acceptable member, or :class:`UnsafeArchive`."""
        what, limits = self.what, self.limits
        self.members += 1
        if self.members > limits.max_members:
            raise UnsafeArchive(f"{what} has more than {limits.max_members} members; refused as hostile")
        normal = member_name(name, what, limits)
        if kind in _LINKS:
            raise UnsafeArchive(f"{what}: member {short(name)} is a link ({_LINKS[kind]} to {short(linkname)}), not a "
                                "regular file or directory; links are never followed, and the archive is "
                                "refused")  # fmt: skip
        if kind not in REGULAR and kind != tarfile.DIRTYPE:
            label = _SPECIAL.get(kind, f"of type {kind!r}")
            raise UnsafeArchive(f"{what}: member {short(name)} is {label}, not a regular file or directory; device "
                                "files are never created, and the archive is refused")  # fmt: skip
        member_size(name, size, what, limits)
        if kind == tarfile.DIRTYPE:
            return normal
        if normal == ".":
            raise UnsafeArchive(f"{what}: member {short(name)} is a file without a name; the archive is refused")
        digest = hashlib.blake2b(normal.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if digest in self._files:
            raise UnsafeArchive(f"{what}: member {short(normal)} appears twice (tools would disagree on which one "
                                "counts); the archive is refused")  # fmt: skip
        self._files.add(digest)
        return normal


class ContentRules:
    """The rules for a tar that is content (``rootfs-diff.tar``): any member type is listed,
    never followed, but names must stay inside the tree, hardlinks too."""

    def __init__(self, what: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.what = what
        self.limits = limits
        self.members = 0

    def check(self, name: str, kind: bytes, size: int, linkname: str = "") -> str:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchive(f"{self.what} has more than {self.limits.max_members} members; refused as hostile")
        normal = member_name(name, self.what, self.limits)
        member_size(name, size, self.what, self.limits)
        if kind == tarfile.LNKTYPE:
            target = linkname.removeprefix("./")
            if target.startswith("/") or ".." in target.split("/"):
                raise UnsafeArchive(f"{self.what}: hardlink {short(name)} points outside the tree "
                                    f"({short(linkname)}); the archive is refused")  # fmt: skip
        return normal


@dataclass(frozen=True)
class Member:
    """One accepted member: ``name`` normalised, ``kind`` its tar type flag, ``size`` the data
    bytes it has in the archive, ``apparent_size`` the file's size (a sparse file's is larger)."""

    name: str
    kind: bytes
    size: int
    apparent_size: int
    linkname: str

    @property
    def kind_name(self) -> str:
        """``file``, ``dir``, ``symlink``, ``hardlink``, ``char``, ``block``, ``fifo`` or ``type b'Z'``."""
        return "file" if self.kind in REGULAR else _KINDS.get(self.kind, f"type {self.kind!r}")

    @property
    def is_file(self) -> bool:
        return self.kind in REGULAR or self.kind == tarfile.GNUTYPE_SPARSE


class MemberSink(Protocol):
    """Where a member's data goes as it passes: ``write`` in any chunking, then ``close``."""

    def write(self, data: memoryview) -> object: ...

    def close(self) -> None: ...


def kept_size(name: str, size: int, limit: int, what: str) -> None:
    """Refuse a member to be held in memory whose declared size is over ``limit``."""
    if size > limit:
        raise UnsafeArchive(f"{what}: {name} is {size} bytes, over the {limit}-byte limit for a metadata file; "
                            "refused as hostile")  # fmt: skip
