"""A tar byte stream split into header bytes and member data, streaming, without trusting it.

:class:`TarSplitter` reads a tar as the kubelet's runtimes write it (Go's ``archive/tar``:
ustar headers, pax ``x`` records for long names or big sizes, GNU ``L``/``K`` long names
from other writers) and yields, in order, every byte of the input exactly once:

* :class:`Member` -- the *literal* bytes before a member's data: the zero padding of the
  previous member, any pax/GNU extended headers with their data, and the member's own
  512-byte header; plus the member's effective name, type and data size;
* the member's data, pulled with :meth:`TarSplitter.read_data` in pieces of a caller-chosen
  size (the caller chunks it);
* at the end, :attr:`TarSplitter.trailer`: the last padding, the end-of-archive blocks and
  any record padding after them.

Concatenating those pieces gives back the input byte for byte; that is the whole point (a
recipe rebuilds the kubelet's tar exactly, so its SHA-256 still matches the manifest).

Memory is one read block (1 MiB) plus at most :data:`MAX_EXTENDED_HEADER` of extended
header data per member: sizes are never trusted for allocation, and a size that runs past
the end of the input, past ``total_size`` when the caller knows it, or past
``max_member_size``, is refused. Refused input raises :class:`~backupd.errors.IntegrityError`
(truncated or corrupt: a bad header checksum, no end-of-archive marker, data after it) or
:class:`~backupd.errors.UnsafeArchive` (well-formed but odd: sparse or multi-volume members,
a link or directory that claims data, a negative size). Names are not judged here -- the
bytes are only stored and given back -- but consumers that extract (inspect, restore to an
image) keep their own checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from backupd.backends.base import Readable
from backupd.errors import IntegrityError, UnsafeArchive

BLOCK = 512
READ_SIZE = 1 << 20
MAX_EXTENDED_HEADER = 1 << 20  # pax/GNU long-name data per member; Go writes a few hundred bytes
MAX_TRAILER = 1 << 20  # end blocks plus record padding (GNU tar pads to 10 KiB by default)
MAX_MEMBER_SIZE = 1 << 40

REGULAR = frozenset("07")  # regular file (NUL, the old spelling, is reported as "0"), contiguous file
HEADER_ONLY = frozenset("123456")  # hard link, symlink, char/block device, directory, fifo
_PAX_RECORD = re.compile(rb"(\d+) ")


@dataclass(frozen=True)
class Member:
    """One member: the literal bytes in front of its data, and what the data is."""

    literal: bytes
    name: str  # effective name (pax path, GNU long name or prefix/name), leading "./" removed
    kind: str  # typeflag of the member's own header, e.g. "0" or "5"
    size: int  # bytes of data after ``literal`` (before the zero padding)
    offset: int  # where the data starts in the tar


class TarSplitter:
    """Iterate over :class:`Member`\\ s; read each member's data before asking for the next."""

    def __init__(self, source: Readable, *, what: str, total_size: int | None = None,
                 max_member_size: int = MAX_MEMBER_SIZE) -> None:
        self.what = what
        self._source = source
        self._buf = memoryview(b"")
        self._eof = False
        self.offset = 0  # bytes handed out so far
        self._total = total_size
        self._max_member = max_member_size
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0  # zero padding after the current member's data
        self.trailer = b""
        self.done = False

    # -- input ------------------------------------------------------------------------------

    def _fill(self, n: int) -> None:
        """Make at least ``n`` bytes available in the buffer unless the input ends first."""
        if len(self._buf) >= n or self._eof:
            return
        parts: list[bytes | memoryview] = [self._buf] if self._buf else []
        have = len(self._buf)
        while have < n:
            data = self._source.read(max(READ_SIZE, n - have))
            if not data:
                self._eof = True
                break
            parts.append(data)
            have += len(data)
        self._buf = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))

    def _take(self, n: int, *, exact: bool, context: str) -> memoryview:
        self._fill(n)
        out = self._buf[:n]
        if exact and len(out) < n:
            raise IntegrityError(f"{self.what}: the tar is truncated at byte {self.offset + len(out)} "
                                 f"({context}: {n - len(out)} more bytes expected)")
        self._buf = self._buf[len(out):]
        self.offset += len(out)
        return out

    # -- headers ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Member]:
        while (member := self.next_member()) is not None:
            yield member

    def next_member(self) -> Member | None:
        """The next member, or None at the end of the archive (then :attr:`trailer` is set)."""
        if self.done:
            return None
        if self._remaining:
            raise RuntimeError("read the member's data before asking for the next member")
        literal = bytearray(self._take(self._padding, exact=True, context="member padding"))
        self._padding = 0
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            start = self.offset
            block = bytes(self._take(BLOCK, exact=False, context="header"))
            if len(block) < BLOCK:
                raise IntegrityError(f"{self.what}: the tar is truncated at byte {self.offset} "
                                     "(no end-of-archive marker)")
            if block == bytes(BLOCK):
                self._finish(literal + block)
                return None
            kind = _check_header(block, start, self.what)
            size = _header_size(block, start, self.what)
            literal += block
            if kind in "xgLK":
                if size > MAX_EXTENDED_HEADER:
                    raise UnsafeArchive(f"{self.what}: extended header at byte {start} claims {size} bytes "
                                        f"(more than {MAX_EXTENDED_HEADER})")
                data = bytes(self._take(size, exact=True, context="extended header"))
                literal += data
                literal += self._take(-size % BLOCK, exact=True, context="extended header padding")
                if kind == "x":
                    pax.update(_pax_records(data, start, self.what))
                elif kind == "g":
                    if "size" in _pax_records(data, start, self.what):
                        raise UnsafeArchive(f"{self.what}: global pax header at byte {start} sets a size")
                elif kind == "L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if any(k.startswith("GNU.sparse") for k in pax):
                raise UnsafeArchive(f"{self.what}: sparse member at byte {start} is not supported")
            if "size" in pax:
                text = pax["size"]
                if not text.isdigit():
                    raise IntegrityError(f"{self.what}: pax size {text!r} at byte {start} is not a number")
                size = int(text)
            name = pax.get("path") or long_name or _ustar_name(block)
            return self._member(bytes(literal), name.removeprefix("./"), kind, size, start)

    def _member(self, literal: bytes, name: str, kind: str, size: int, start: int) -> Member:
        if kind in HEADER_ONLY:
            if size:
                raise UnsafeArchive(f"{self.what}: {name!r} (type {kind!r}) at byte {start} claims {size} "
                                    "bytes of data; links, directories and devices have none")
        elif kind not in REGULAR:
            raise UnsafeArchive(f"{self.what}: {name!r} at byte {start} has unsupported tar type {kind!r}")
        limit = self._max_member
        if self._total is not None:
            limit = min(limit, self._total - self.offset)
        if size > limit:
            raise UnsafeArchive(f"{self.what}: {name!r} at byte {start} claims {size} bytes, more than "
                                f"the {limit} the archive can hold")
        self._remaining = size
        self._padding = -size % BLOCK
        return Member(literal=literal, name=name, kind=kind, size=size, offset=self.offset)

    def _finish(self, literal: bytearray) -> None:
        """After the first zero block: one more, then only zeros (record padding) to the end."""
        second = bytes(self._take(BLOCK, exact=False, context="end-of-archive marker"))
        if second != bytes(BLOCK):
            raise IntegrityError(f"{self.what}: the tar's end-of-archive marker at byte {self.offset - len(second)}"
                                 " is incomplete (truncated or corrupt)")
        literal += second
        while True:
            self._fill(1)
            if not self._buf:
                break
            if len(literal) + len(self._buf) > MAX_TRAILER or any(self._buf):
                raise IntegrityError(f"{self.what}: data after the tar's end-of-archive marker at byte "
                                     f"{self.offset}")
            literal += self._buf
            self.offset += len(self._buf)
            self._buf = memoryview(b"")
        self.trailer = bytes(literal)
        self.done = True

    # -- data -------------------------------------------------------------------------------

    @property
    def remaining(self) -> int:
        """Data bytes of the current member not read yet."""
        return self._remaining

    def read_data(self, n: int) -> memoryview:
        """Up to ``n`` bytes of the current member's data (exactly ``n`` while that many are
        left); empty when the member's data is all read."""
        n = min(n, self._remaining)
        data = self._take(n, exact=True, context="member data")
        self._remaining -= n
        return data


def _check_header(block: bytes, offset: int, what: str) -> str:
    stored = block[148:156]
    try:
        expected = int(stored.replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        expected = -1
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148]) + 8 * 32 + sum(
        b - 256 if b > 127 else b for b in block[156:])
    if expected not in (unsigned, signed):
        what_it_is = "not a tar archive" if offset == 0 else "a corrupt tar header"
        raise IntegrityError(f"{what}: {what_it_is} at byte {offset} (header checksum mismatch)")
    if block[257:263] not in (b"ustar\x00", b"ustar "):
        raise UnsafeArchive(f"{what}: header at byte {offset} is not ustar, pax or GNU (pre-POSIX tar)")
    return chr(block[156]) if block[156] else "0"  # NUL is the old spelling of a regular file


def _header_size(block: bytes, offset: int, what: str) -> int:
    field = block[124:136]
    if field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            raise UnsafeArchive(f"{what}: negative size in the header at byte {offset}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise IntegrityError(f"{what}: size field {bytes(field)!r} at byte {offset} is not octal")
    return int(text, 8)


def _ustar_name(block: bytes) -> str:
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int, what: str) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records, each length checked (a lying length is corrupt)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record area with NULs
            if any(data[pos:]):
                break
            return records
        m = _PAX_RECORD.match(data, pos)
        if m is None:
            break
        length = int(m.group(1))
        record = data[pos : pos + length]
        if length <= len(m.group(0)) or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            break
        key, _, value = record[len(m.group(0)) : -1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    else:
        return records
    raise IntegrityError(f"{what}: malformed pax record in the extended header at byte {offset}")
