"""Which tar members backupd accepts, and a push-mode reader that applies the rules as bytes pass.

Every reader of a checkpoint archive applies the same rules, through :class:`MemberRules`:
``restore`` (to a file, an OCI layout or a registry), ``verify`` and restore drills (all through
:class:`TarScanner`) and ``inspect`` (its tarfile pass). So an archive one of them refuses,
every one refuses, with the same message. An archive is refused with
:class:`~backupd.errors.UnsafeArchive` (exit code 7), naming the member, when

* a name is absolute, has a ``..`` or empty segment or a NUL, or is longer than
  ``Limits.max_name_length``;
* a member is anything but a regular file or a directory: symlinks, hardlinks, character and
  block devices, FIFOs, sparse files, unknown types (a checkpoint archive holds none, and a
  reader that met one could be led outside its target);
* a member declares a negative size or more than ``Limits.max_member_size``;
* a name appears twice (tools would disagree on which one counts);
* there are more than ``Limits.max_members`` members, or one member's extended (PAX, GNU)
  headers run past ``Limits.max_header_bytes``.

``rootfs-diff.tar`` inside an archive is the container's changed files, where links and device
nodes are legitimate content: inspect lists it with the name rules only (:func:`member_name`).

Two parsers remain: inspect walks the tar with tarfile (it reads members as streams -- the inner
``rootfs-diff.tar`` is listed while it passes -- and decompresses gzip/xz/bzip2 local files),
the others with :class:`TarScanner`. They share the rules, not the header parsing; moving
inspect onto the scanner needs a pull-mode member API and is left to the module reorganisation.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from backupd.backends.base import Readable
from backupd.errors import BackupdError, UnsafeArchive

BLOCK = tarfile.BLOCKSIZE
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LINKS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink"}
_SPECIAL = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
            tarfile.GNUTYPE_SPARSE: "a sparse file"}  # fmt: skip
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Bounds that make a hostile archive cost little; anything beyond them is refused."""

    max_metadata_bytes: int = 16 << 20  # per metadata file held in memory
    max_header_bytes: int = 1 << 20  # one member's headers, PAX and GNU extensions included
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


class MemberRules:
    """The rules of the module docstring, applied member by member to one archive."""

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
        if kind not in _REGULAR and kind != tarfile.DIRTYPE:
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


class TarScanner:
    """A push-mode reader of a tar stream: ``feed`` it bytes in any chunking, then ``close``.

    Every member is checked by :class:`MemberRules` as its header passes; the data of regular
    files for which ``keep(name)`` is true is kept in :attr:`files` (each at most ``max_kept``
    bytes). Memory use is bounded by the kept files, one header and the rules' name digests,
    whatever the archive's size. Understands ustar, PAX (``x``, ``g``) and GNU long names; the
    stream must end with the end-of-archive block, with nothing but zeros after it.
    """

    def __init__(self, what: str, keep: Callable[[str], bool], *, max_kept: int | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.what = what
        self.keep = keep
        self.limits = limits
        self.max_kept = limits.max_metadata_bytes if max_kept is None else max_kept
        self.rules = MemberRules(what, limits)
        self.files: dict[str, bytes] = {}
        self.top_level: set[str] = set()
        self.offset = 0  # bytes fed so far
        self._header = bytearray()
        self._state = "header"  # header | data | end
        self._data_left = 0
        self._pad_left = 0
        self._capture: bytearray | None = None
        self._capture_kind = ""
        self._member = ""
        self._pax: dict[str, str] = {}
        self._long_name: str | None = None
        self._extended = 0  # bytes of extended headers before the current member
        self._closed = False

    @property
    def members(self) -> int:
        return self.rules.members

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._state == "end":
                if any(view[pos:]):
                    raise UnsafeArchive(f"{self.what}: data after the end-of-archive marker")
                self.offset += end - pos
                return
            if self._state == "header":
                take = min(BLOCK - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                self.offset += take
                if len(self._header) == BLOCK:
                    block = bytes(self._header)
                    self._header.clear()
                    self._on_header(block)
                continue
            if self._data_left:
                take = min(self._data_left, end - pos)
                if self._capture is not None:
                    self._capture += view[pos : pos + take]
                self._data_left -= take
            else:
                take = min(self._pad_left, end - pos)
                self._pad_left -= take
            pos += take
            self.offset += take
            if not self._data_left and not self._pad_left:
                self._end_member()

    def close(self) -> None:
        """The stream ended: it must have ended at the end-of-archive marker."""
        if self._closed:
            return
        self._closed = True
        if self._state == "data" or self._header:
            raise UnsafeArchive(f"{self.what}: the tar stream ends inside member {short(self._member)}")
        if self._state != "end":
            raise UnsafeArchive(f"{self.what}: the tar stream ends without an end-of-archive marker")

    def _on_header(self, block: bytes) -> None:
        if not any(block):
            if self._pax or self._long_name is not None:
                raise UnsafeArchive(f"{self.what}: an extended header is followed by the end of the archive")
            self._state = "end"
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise UnsafeArchive(f"{self.what}: invalid tar header at byte {self.offset - BLOCK} ({exc})") from None
        size = info.size
        kind = info.type
        if kind in _EXTENDED:
            self._extended += BLOCK + max(size, 0)
            if size < 0 or self._extended > self.limits.max_header_bytes:
                raise UnsafeArchive(f"{self.what}: a member header near byte {self.offset - BLOCK} runs past the "
                                    f"{self.limits.max_header_bytes}-byte limit (an enormous PAX or GNU long-name "
                                    "header); the archive is refused")  # fmt: skip
            self._start_data(size, capture=True, kind=kind.decode("latin-1"), member=info.name)
            return
        self._extended = 0
        name = self._pax.pop("path", None) or self._long_name or info.name
        if "size" in self._pax:
            try:
                size = int(self._pax.pop("size"))
            except ValueError:
                raise UnsafeArchive(f"{self.what}: member {short(name)} has an invalid PAX size") from None
        if any(k.startswith("GNU.sparse.") for k in self._pax):
            kind = tarfile.GNUTYPE_SPARSE
        elif kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # a V7 directory, as tarfile reads it
        self._pax.clear()
        self._long_name = None
        normal = self.rules.check(name, kind, size, info.linkname)
        if len(self.top_level) < 10_000:
            self.top_level.add(normal.split("/")[0])
        keep = kind in _REGULAR and self.keep(normal)
        if keep and size > self.max_kept:
            raise UnsafeArchive(f"{self.what}: {normal} is {size} bytes, over the {self.max_kept}-byte limit for "
                                "metadata; refusing the archive")
        self._start_data(size, capture=keep, kind="file", member=normal)

    def _start_data(self, size: int, *, capture: bool, kind: str, member: str) -> None:
        self._member = member
        self._capture_kind = kind
        self._capture = bytearray() if capture else None
        self._data_left = size
        self._pad_left = -size % BLOCK
        self._state = "data"
        if not size:
            self._end_member()

    def _end_member(self) -> None:
        self._state = "header"
        captured, self._capture = self._capture, None
        if captured is None:
            return
        kind = self._capture_kind
        if kind == "file":
            self.files[self._member] = bytes(captured)
        elif kind in ("x", "X"):
            self._pax.update(_pax_records(bytes(captured), self.what))
        elif kind == "L":
            self._long_name = bytes(captured).split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        # "g" (global PAX) and "K" (long link name) carry nothing a checkpoint archive needs.


def _pax_records(data: bytes, what: str) -> dict[str, str]:
    """Parse ``"<len> <key>=<value>\\n"`` records (POSIX.1-2001 extended headers)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding some writers leave
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise UnsafeArchive(f"{what}: malformed PAX header") from None
        record = data[space + 1 : pos + length]
        if space < 0 or length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise UnsafeArchive(f"{what}: malformed PAX header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class ScanningReader:
    """A ``read(n)`` source that feeds everything it hands out to a :class:`TarScanner` and
    closes the scanner at the end of the stream.

    ``explain`` turns the scanner's refusal into what to raise instead (e.g.
    :meth:`backupd.storage.transfer.UnpackingReader.explain`: a corrupt stored object before a malformed tar).
    """

    def __init__(self, source: Readable, scanner: TarScanner,
                 explain: Callable[[BackupdError], BackupdError] | None = None) -> None:
        self.source = source
        self.scanner = scanner
        self.explain = explain

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        try:
            if data:
                self.scanner.feed(data)
            else:
                self.scanner.close()
        except BackupdError as exc:
            if self.explain is None:
                raise
            raise self.explain(exc) from None
        return data
