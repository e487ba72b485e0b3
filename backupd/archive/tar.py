"""The one tar reader of backupd: a push-mode scanner that applies the member rules as bytes pass.

Every reader of a checkpoint archive goes through :class:`TarScanner`: ``restore`` (to a file,
an OCI layout or a registry), ``verify`` and restore drills (through :class:`ScanningReader`,
which scans the bytes it passes on) and ``inspect`` (which feeds it what it reads, and lists the
inner ``rootfs-diff.tar`` with a second scanner). So there is one header parser, one set of
limits (:class:`~backupd.archive.members.Limits`) and one set of messages. An archive is refused
with :class:`~backupd.errors.UnsafeArchive` (exit code 7), naming the member, when

* a name is absolute, has a ``..`` or empty segment or a NUL, or is longer than
  ``Limits.max_name_length``;
* a member is anything but a regular file or a directory: symlinks, hardlinks, character and
  block devices, FIFOs, sparse files, unknown types (a checkpoint archive holds none, and a
  reader that met one could be led outside its target);
* a member declares a negative size or more than ``Limits.max_member_size``;
* a name appears twice (tools would disagree on which one counts);
* there are more than ``Limits.max_members`` members, one member's extended headers (PAX, GNU
  long names, a GNU sparse map) run past ``Limits.max_header_bytes``, or more than
  ``Limits.max_extended_headers`` of them are chained before one member;
* the stream is not a tar, is cut short (it must end with the end-of-archive block) or, unless
  the reader asks to judge them itself (``after_end="count"``), has anything but zeros after it.

Those are :class:`~backupd.archive.members.MemberRules`; ``rootfs-diff.tar`` is read with
:class:`~backupd.archive.members.ContentRules` (links and devices are its legitimate content).

The scanner understands ustar, PAX (``x``; a global ``g`` header is skipped, as Go's
``archive/tar`` does), GNU long names and link names, and GNU sparse members (``S`` headers with
extension blocks, PAX 0.x and 1.0 maps), which only content may hold. Header-only types (links,
devices, directories, FIFOs) carry no data whatever their size field says, as tarfile and Go's
``archive/tar`` read them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable

from backupd.archive.members import (
    DEFAULT_LIMITS,
    REGULAR,
    ContentRules,
    Limits,
    Member,
    MemberRules,
    MemberSink,
    Rules,
    kept_size,
    member_name,
    member_size,
    short,
)
from backupd.backends.base import Readable
from backupd.errors import BackupdError, UnsafeArchive

__all__ = [
    "BLOCK",
    "DEFAULT_LIMITS",
    "ContentRules",
    "Limits",
    "Member",
    "MemberRules",
    "MemberSink",
    "ScanningReader",
    "TarScanner",
    "member_name",
    "member_size",
    "short",
]

BLOCK = tarfile.BLOCKSIZE
_HEADER_ONLY = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)  # fmt: skip


class _Kept:
    """A regular file held in memory, handed on when its data is complete."""

    def __init__(self, name: str, on_kept: Callable[[str, bytes], None]) -> None:
        self.name, self.on_kept, self.data = name, on_kept, bytearray()

    def write(self, data: memoryview) -> None:
        self.data += data

    def close(self) -> None:
        self.on_kept(self.name, bytes(self.data))


class TarScanner:
    """A push-mode reader of a tar stream: ``feed`` it bytes in any chunking, then ``close``.

    Every member is checked by ``rules`` (:class:`MemberRules` unless given) as its header
    passes. Regular files for which ``keep(name)`` is true are held (each at most ``max_kept``
    bytes) and handed to ``on_kept(name, data)`` -- by default stored in :attr:`files`.
    ``on_member(member)`` is told of every member as its header passes, and for one not kept
    may return a :class:`MemberSink` its data streams to.
    Memory use is bounded by the kept files, one member's headers and the rules' name digests,
    whatever the archive's size.

    After the end-of-archive block, ``after_end="refuse"`` refuses anything but zeros;
    ``"count"`` counts the bytes (:attr:`trailing_bytes`) and the non-zero ones
    (:attr:`trailing_nonzero`) for the caller to judge.
    """

    def __init__(self, what: str, keep: Callable[[str], bool] = lambda name: False, *, max_kept: int | None = None,
                 limits: Limits = DEFAULT_LIMITS, rules: Rules | None = None,
                 on_kept: Callable[[str, bytes], None] | None = None,
                 on_member: Callable[[Member], MemberSink | None] | None = None,
                 after_end: str = "refuse") -> None:  # fmt: skip
        if after_end not in ("refuse", "count"):
            raise ValueError(f"after_end must be 'refuse' or 'count', not {after_end!r}")
        self.what = what
        self.keep = keep
        self.limits = limits
        self.max_kept = limits.max_metadata_bytes if max_kept is None else max_kept
        self.rules: Rules = rules if rules is not None else MemberRules(what, limits)
        self.on_kept = on_kept if on_kept is not None else self._store
        self.on_member = on_member
        self.after_end = after_end
        self.files: dict[str, bytes] = {}
        self.top_level: set[str] = set()
        self.offset = 0  # bytes fed so far
        self.trailing_bytes = 0  # after the end-of-archive block
        self.trailing_nonzero = 0
        self._block = bytearray()  # a header (or sparse map/extension) block being filled
        self._state = "header"  # header | sparse-extension | sparse-map | data | end
        self._data_left = 0
        self._pad_left = 0
        self._sink: MemberSink | None = None
        self._capture: bytearray | None = None  # an extended header's data
        self._capture_kind = b""
        self._member = ""  # the member being read, for messages
        self._previous = ""  # the last complete member, for messages
        self._pax: dict[str, str] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._extended = 0  # bytes of extended headers before the current member
        self._chained = 0  # extended headers before the current member
        self._pending: Member | None = None  # a sparse member whose map or extension blocks are read
        self._sparse_map = bytearray()
        self._sparse_lines: int | None = None  # newlines the sparse map needs, once its count is read
        self._closed = False

    @property
    def members(self) -> int:
        return self.rules.members

    @property
    def ended(self) -> bool:
        """Whether the end-of-archive block has passed."""
        return self._state == "end"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            state = self._state
            if state == "end":
                self._after_end(view[pos:])
                self.offset += end - pos
                return
            if state != "data":  # header, sparse-extension or sparse-map: whole blocks
                take = min(BLOCK - len(self._block), end - pos)
                self._block += view[pos : pos + take]
                pos += take
                self.offset += take
                if len(self._block) == BLOCK:
                    block = bytes(self._block)
                    self._block.clear()
                    if state == "header":
                        self._on_header(block)
                    elif state == "sparse-extension":
                        self._on_sparse_extension(block)
                    else:
                        self._on_sparse_map(block)
                continue
            if self._data_left:
                take = min(self._data_left, end - pos)
                chunk = view[pos : pos + take]
                if self._capture is not None:
                    self._capture += chunk
                elif self._sink is not None:
                    self._sink.write(chunk)
                self._data_left -= take
            else:
                take = min(self._pad_left, end - pos)
                self._pad_left -= take
            pos += take
            self.offset += take
            if not self._data_left and not self._pad_left:
                self._end_data()

    def close(self) -> None:
        """The stream ended: it must have ended at the end-of-archive marker."""
        if self._closed:
            return
        self._closed = True
        if self._state in ("data", "sparse-map", "sparse-extension"):
            raise UnsafeArchive(f"{self.what} is truncated: the tar stream ends inside member {short(self._member)}")
        if self._state == "header" and self._block:
            raise UnsafeArchive(f"{self.what} is truncated: the tar stream ends inside a header{self._after()}")
        if self._state != "end":
            raise UnsafeArchive(f"{self.what} is truncated: the tar stream ends{self._after()} without an "
                                "end-of-archive marker")  # fmt: skip

    # -- headers -------------------------------------------------------------------------------

    def _after(self) -> str:
        return f" after member {short(self._previous)}" if self._previous else ""

    def _on_header(self, block: bytes) -> None:
        what = self.what
        at = self.offset - BLOCK
        if not any(block):
            if self._pax or self._long_name is not None or self._long_link is not None:
                raise UnsafeArchive(f"{what}: an extended header is followed by the end of the archive")
            self._state = "end"
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            if at == 0:
                raise UnsafeArchive(f"{what} is not a tar archive (invalid tar header at byte 0: {exc})") from None
            raise UnsafeArchive(f"{what}: invalid tar header at offset {at}{self._after()} (corrupt, or garbage "
                                "where a header should be); the rest cannot be read") from None  # fmt: skip
        size, kind = info.size, info.type
        if kind in _EXTENDED:
            self._chained += 1
            if self._chained > self.limits.max_extended_headers:
                raise UnsafeArchive(f"{what}: more than {self.limits.max_extended_headers} extended headers are "
                                    f"chained before one member near offset {at}; refused")  # fmt: skip
            self._count_header_bytes(BLOCK + max(size, 0), at)
            if size < 0:
                raise UnsafeArchive(f"{what}: an extended header at offset {at} declares {size} bytes; refused")
            self._member = info.name
            self._capture, self._capture_kind = bytearray(), kind
            self._start_data(size)
            return
        pax = self._pax
        name = pax.pop("GNU.sparse.name", None) or pax.pop("path", None) or self._long_name or info.name
        linkname = pax.pop("linkpath", None) or self._long_link or info.linkname
        if "size" in pax:
            try:
                size = int(pax.pop("size"))
            except ValueError:
                raise UnsafeArchive(f"{what}: member {short(name)} has an invalid PAX size") from None
        apparent = size
        sparse_map = False
        if kind == tarfile.GNUTYPE_SPARSE:
            apparent = _number(block[483:495], size)
        elif any(k.startswith("GNU.sparse.") for k in pax):
            kind = tarfile.GNUTYPE_SPARSE
            sparse_map = pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0"
            try:
                apparent = int(pax.get("GNU.sparse.realsize") or pax.get("GNU.sparse.size") or size)
            except ValueError:
                raise UnsafeArchive(f"{what}: member {short(name)} has an invalid GNU sparse size") from None
        elif kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # a V7 directory, as tarfile reads it
        pax.clear()
        self._long_name = self._long_link = None
        member = Member(name, kind, 0 if kind in _HEADER_ONLY else size, apparent, linkname)
        self._member = name
        if kind == tarfile.GNUTYPE_SPARSE and info.type == tarfile.GNUTYPE_SPARSE and block[482]:
            self._pending, self._state = member, "sparse-extension"
        elif sparse_map:
            member_size(name, size, what, self.limits)
            self._pending, self._state = member, "sparse-map"
            self._sparse_map.clear()
            self._sparse_lines = None
        else:
            self._begin(member)

    def _count_header_bytes(self, n: int, at: int) -> None:
        self._extended += n
        if self._extended > self.limits.max_header_bytes:
            raise UnsafeArchive(f"{self.what}: a member header near offset {at} runs past the "
                                f"{self.limits.max_header_bytes}-byte limit (an enormous PAX or GNU long-name "
                                "header, or GNU sparse map); the archive is refused")  # fmt: skip

    def _on_sparse_extension(self, block: bytes) -> None:
        """Old GNU sparse: 512-byte blocks of more sparse entries, while byte 504 says so."""
        self._count_header_bytes(BLOCK, self.offset - BLOCK)
        if not block[504]:
            self._begin_pending(self._pending_member().size)

    def _on_sparse_map(self, block: bytes) -> None:
        """GNU sparse 1.0: the data starts with ``count\\n`` and 2 x count ``number\\n`` lines,
        padded to a block; it is header, counted against the header budget."""
        member = self._pending_member()
        at = self.offset - BLOCK
        self._count_header_bytes(BLOCK, at)
        self._sparse_map += block
        if len(self._sparse_map) > member.size:
            raise UnsafeArchive(f"{self.what}: member {short(member.name)} has a GNU sparse map longer than its "
                                "data; refused")  # fmt: skip
        if self._sparse_lines is None:
            first, newline, _ = bytes(self._sparse_map).partition(b"\n")
            if not newline:
                return
            if not first.isdigit():
                raise UnsafeArchive(f"{self.what}: member {short(member.name)} has a malformed GNU sparse map")
            self._sparse_lines = 1 + 2 * int(first)
        if self._sparse_map.count(b"\n") < self._sparse_lines:
            return
        lines = bytes(self._sparse_map).split(b"\n", self._sparse_lines)[: self._sparse_lines]
        if not all(line.isdigit() for line in lines):
            raise UnsafeArchive(f"{self.what}: member {short(member.name)} has a malformed GNU sparse map")
        self._begin_pending(member.size - len(self._sparse_map))

    def _pending_member(self) -> Member:
        assert self._pending is not None
        return self._pending

    def _begin_pending(self, data_size: int) -> None:
        member = self._pending_member()
        self._pending = None
        self._sparse_map.clear()
        self._begin(Member(member.name, member.kind, data_size, member.apparent_size, member.linkname),
                    pad=-member.size % BLOCK)  # fmt: skip

    def _begin(self, member: Member, pad: int | None = None) -> None:
        """A member's headers are complete: judge it, then read its data to where it goes."""
        self._chained = self._extended = 0
        normal = self.rules.check(member.name, member.kind, member.apparent_size, member.linkname)
        self._member = normal
        if len(self.top_level) < 10_000:
            self.top_level.add(normal.split("/")[0])
        member = Member(normal, member.kind, member.size, member.apparent_size, member.linkname)
        if self.on_member is not None:
            self._sink = self.on_member(member)
        if member.kind in REGULAR and self.keep(normal):
            kept_size(normal, member.size, self.max_kept, self.what)
            self._sink = _Kept(normal, self.on_kept)
        self._start_data(member.size, pad)

    # -- data ----------------------------------------------------------------------------------

    def _start_data(self, size: int, pad: int | None = None) -> None:
        self._data_left = size
        self._pad_left = -size % BLOCK if pad is None else pad
        self._state = "data"
        if not size and not self._pad_left:
            self._end_data()

    def _end_data(self) -> None:
        self._state = "header"
        captured, self._capture = self._capture, None
        if captured is not None:
            self._on_extended(self._capture_kind, bytes(captured))
            return
        sink, self._sink = self._sink, None
        self._previous = self._member
        if sink is not None:
            sink.close()

    def _on_extended(self, kind: bytes, data: bytes) -> None:
        if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            self._pax.update(_pax_records(data, self.what))
        elif kind == tarfile.GNUTYPE_LONGNAME:
            self._long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == tarfile.GNUTYPE_LONGLINK:
            self._long_link = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        # "g" (global PAX) carries nothing a checkpoint archive needs; Go's archive/tar skips it too.

    def _store(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def _after_end(self, data: memoryview) -> None:
        nonzero = len(data) - bytes(data).count(0)
        if nonzero and self.after_end == "refuse":
            raise UnsafeArchive(f"{self.what}: data after the end-of-archive marker")
        self.trailing_bytes += len(data)
        self.trailing_nonzero += nonzero


def _number(field: bytes, default: int) -> int:
    """A numeric header field (octal, or base-256 with the high bit set); ``default`` if unreadable."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else default
    except ValueError:
        return default


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
