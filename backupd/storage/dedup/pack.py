"""Pack files: many compressed chunks in one stored object, with their index as a trailer.

Byte format, version 1 (all integers little-endian; docs/dedup-format.md has the rationale)::

    pack     := MAGIC frame* index footer
    MAGIC    := "BKDPACK1"                                   (8 bytes)
    frame    := one zstd frame (content size and checksum set) whose content is the
                concatenation of one or more chunks, in index order
    index    := u32 frame_count
                frame_count x (u64 offset, u32 compressed_length, u32 chunk_count)
                chunk entries of frame 0, then of frame 1, ...:
                              (32-byte chunk id, u32 raw_length)
    footer   := u64 index_offset, u32 index_length, u32 chunk_count,
                32-byte SHA-256 of the index bytes, "BKDPEND1"   (56 bytes)

A chunk's place in its frame's content is the sum of the raw lengths before it in that
frame. ``offset`` counts from the start of the pack.

Stored form: the pack as above, or -- when the backend has age recipients -- the whole pack
encrypted with age (the object then starts with ``age-encryption.org/v1``). The pack's name
is the SHA-256 of the *stored* bytes (:func:`pack_key`), so a pack is verified by its name
and two writers can never create different objects under one key.

Consecutive new chunks are compressed together in frames of up to ``frame_size`` raw bytes
(default 512 KiB, measured): zstd finds the repeats between neighbouring pages that one frame
per 4 KiB page cannot, while reading one chunk still decompresses at most one frame.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import zstandard

from backupd.backends.base import Backend
from backupd.errors import IntegrityError, InvalidInput, StorageNotFound

MAGIC = b"BKDPACK1"
FOOTER_MAGIC = b"BKDPEND1"
AGE_MAGIC = b"age-encryption.org/v1\n"
ID_SIZE = 32
_FRAME = struct.Struct("<QII")
_ENTRY = struct.Struct(f"<{ID_SIZE}sI")
_FOOTER = struct.Struct("<QII32s8s")
FOOTER_SIZE = _FOOTER.size

DEFAULT_PACK_SIZE = 4 << 20  # stored bytes at which a pack is closed
DEFAULT_FRAME_SIZE = 512 << 10  # raw bytes of consecutive new chunks compressed together
DEFAULT_LEVEL = 3  # as the full format: BENCHMARKS.md
MAX_PACK_SIZE = 1 << 30  # a pack object larger than this is refused, whatever its index says
PACKS_DIR = "packs/"


def pack_key(pack_id: str, root: str = "dedup/") -> str:
    """``<root>packs/<first two hex digits>/<pack id>.pack``: 256 directories keep a
    filesystem backend's directories small; S3 does not care."""
    return f"{root}{PACKS_DIR}{pack_id[:2]}/{pack_id}.pack"


# -- writing -----------------------------------------------------------------------------


_local = threading.local()


def compress_frame(content: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """One zstd frame of ``content`` (consecutive chunks); thread-safe: a compressor per thread."""
    cctx = getattr(_local, "cctx", None)
    if cctx is None or _local.level != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        _local.level = level
    return cctx.compress(content)


class PackBuilder:
    """Frames in, one plaintext pack out (:meth:`finish`)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = [MAGIC]
        self.size = len(MAGIC)
        self._frames: list[bytes] = []
        self._entries: list[bytes] = []
        self.chunk_ids: list[bytes] = []
        self.raw_size = 0

    def add_frame(self, compressed: bytes, chunks: Iterable[tuple[bytes, int]]) -> None:
        """``chunks``: (id, raw length) of the chunks in the frame, in order."""
        n = 0
        for chunk_id, length in chunks:
            self._entries.append(_ENTRY.pack(chunk_id, length))
            self.chunk_ids.append(chunk_id)
            self.raw_size += length
            n += 1
        self._frames.append(_FRAME.pack(self.size, len(compressed), n))
        self._parts.append(compressed)
        self.size += len(compressed)

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def finish(self) -> bytes:
        index = b"".join([struct.pack("<I", len(self._frames)), *self._frames, *self._entries])
        footer = _FOOTER.pack(self.size, len(index), len(self.chunk_ids), hashlib.sha256(index).digest(),
                              FOOTER_MAGIC)
        return b"".join([*self._parts, index, footer])


def seal(plain: bytes, recipients: Sequence[Any] = ()) -> tuple[str, bytes]:
    """The stored form of a pack (age-encrypted with ``recipients``) and its id."""
    if recipients:
        import pyrage

        stored = pyrage.encrypt(plain, list(recipients))
    else:
        stored = plain
    return hashlib.sha256(stored).hexdigest(), stored


# -- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    offset: int
    compressed_length: int
    raw_length: int


class Location(NamedTuple):
    """Where a chunk is inside a plaintext pack."""

    frame: int
    offset: int  # in the frame's content
    length: int


@dataclass
class PackIndex:
    frames: list[Frame]
    chunks: dict[bytes, Location]
    order: list[bytes]  # chunk ids in stored order


def parse_index(index: bytes, *, data_end: int, what: str) -> PackIndex:
    """The index part of a pack (see the module docstring); every offset is checked against
    ``data_end`` (where the frames end) so a hostile index cannot point anywhere else."""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{what}: corrupt pack index ({why})")

    if len(index) < 4:
        raise bad("too short")
    (nframes,) = struct.unpack_from("<I", index, 0)
    pos = 4
    if pos + nframes * _FRAME.size > len(index):
        raise bad(f"{nframes} frames do not fit")
    raw_frames = [_FRAME.unpack_from(index, pos + i * _FRAME.size) for i in range(nframes)]
    pos += nframes * _FRAME.size
    if (len(index) - pos) % _ENTRY.size:
        raise bad("chunk table length")
    entries = list(_ENTRY.iter_unpack(memoryview(index)[pos:]))
    if sum(count for _, _, count in raw_frames) != len(entries):
        raise bad("the frames' chunk counts do not match the chunk table")
    frames: list[Frame] = []
    chunks: dict[bytes, Location] = {}
    expect = len(MAGIC)
    e = 0
    for f, (offset, clen, count) in enumerate(raw_frames):
        if offset != expect or clen <= 0:
            raise bad(f"frame {f} at {offset}, expected {expect}")
        expect = offset + clen
        within = 0
        for chunk_id, length in entries[e : e + count]:
            chunks.setdefault(chunk_id, Location(f, within, length))
            within += length
        e += count
        frames.append(Frame(offset, clen, within))
    if expect != data_end:
        raise bad("frames and chunk table do not cover the pack")
    return PackIndex(frames, chunks, [chunk_id for chunk_id, _ in entries])


def read_footer(tail: bytes, size: int, what: str) -> tuple[int, int, bytes]:
    """(index offset, index length, index SHA-256) from the last bytes of a plaintext pack."""
    if size < len(MAGIC) + FOOTER_SIZE or len(tail) < FOOTER_SIZE:
        raise IntegrityError(f"{what}: not a pack (too short)")
    offset, length, _count, digest, magic = _FOOTER.unpack(tail[-FOOTER_SIZE:])
    if magic != FOOTER_MAGIC:
        raise IntegrityError(f"{what}: not a pack, or a newer pack version (footer {magic!r})")
    if offset < len(MAGIC) or offset + length + FOOTER_SIZE != size:
        raise IntegrityError(f"{what}: corrupt pack footer (index at {offset}+{length} in {size} bytes)")
    return offset, length, digest


class PackFile:
    """One pack fetched from a backend into a file in ``directory`` (decrypted, verified by
    its name) with its index parsed. No descriptor stays open between reads, so a restore
    touching thousands of packs holds thousands of small indexes, not thousands of files."""

    def __init__(self, backend: Backend, key: str, pack_id: str, *, directory: str,
                 identities: Sequence[Any] = ()) -> None:
        self.key = key
        self.what = f"pack {key!r} in backend {backend.name!r}"
        self.path = os.path.join(directory, f"{pack_id}.plain")
        try:
            self._fetch(backend, pack_id, identities, os.path.join(directory, f"{pack_id}.stored"))
            self.index = self._load_index()
        except BaseException:
            self.close()
            raise

    def _fetch(self, backend: Backend, pack_id: str, identities: Sequence[Any], stored_path: str) -> None:
        with _private(stored_path) as stored:
            sha256, _, first = read_hashed(backend, self.key, stored, limit=MAX_PACK_SIZE,
                                           too_long=f"{self.what}: larger than {MAX_PACK_SIZE} bytes; not a pack")
        if sha256 != pack_id:
            os.unlink(stored_path)
            raise IntegrityError(f"{self.what}: content does not match its name (SHA-256 differs)")
        if not first.startswith(AGE_MAGIC):
            os.replace(stored_path, self.path)
            return
        try:
            if not identities:
                raise InvalidInput(f"{self.what} is encrypted with age: give the identity file that "
                                   "decrypts it (--identity-file)")
            import pyrage

            with open(stored_path, "rb") as src, _private(self.path) as plain:
                try:
                    pyrage.decrypt_io(src, plain, list(identities))
                except Exception as exc:
                    raise IntegrityError(f"{self.what}: age could not decrypt it: {exc}") from None
        finally:
            os.unlink(stored_path)

    def _load_index(self) -> PackIndex:
        with open(self.path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(0)
            if fh.read(len(MAGIC)) != MAGIC:
                raise IntegrityError(f"{self.what}: not a pack (bad magic), or a newer pack version")
            fh.seek(max(0, size - FOOTER_SIZE))
            offset, length, digest = read_footer(fh.read(FOOTER_SIZE), size, self.what)
            fh.seek(offset)
            index = fh.read(length)
        if hashlib.sha256(index).digest() != digest:
            raise IntegrityError(f"{self.what}: corrupt pack index (SHA-256 differs)")
        return parse_index(index, data_end=offset, what=self.what)

    def frame(self, n: int) -> bytes:
        """The decompressed content of frame ``n``, its length checked against the index."""
        f = self.index.frames[n]
        with open(self.path, "rb") as fh:
            fh.seek(f.offset)
            compressed = fh.read(f.compressed_length)
        try:
            raw = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=f.raw_length)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.what}: frame {n} is corrupt ({exc})") from None
        if len(raw) != f.raw_length:
            raise IntegrityError(f"{self.what}: frame {n} holds {len(raw)} bytes, the index says {f.raw_length}")
        return raw

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_hashed(backend: Backend, key: str, sink: BinaryIO | None, *, limit: int,
                too_long: str) -> tuple[str, int, bytes]:
    """Stream the object at ``key`` into ``sink`` (``None``: nowhere), hashing it as it passes;
    past ``limit`` bytes it stops with ``IntegrityError(too_long)``. Returns the SHA-256 (hex)
    of the stored bytes, their size and their first bytes (enough to tell age from plain)."""
    digest, size, first = hashlib.sha256(), 0, b""
    with backend.open(key) as src:
        while block := src.read(1 << 20):
            if not first:
                first = block[: len(AGE_MAGIC)]
            size += len(block)
            if size > limit:
                raise IntegrityError(too_long)
            digest.update(block)
            if sink is not None:
                sink.write(block)
    return digest.hexdigest(), size, first


def _private(path: str) -> BinaryIO:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def read_pack_index(backend: Backend, key: str, *, identities: Sequence[Any] = ()) -> PackIndex:
    """The index of one stored pack (the whole object is read: encrypted packs must be)."""
    pack_id = key.rsplit("/", 1)[-1].removesuffix(".pack")
    with tempfile.TemporaryDirectory(prefix="backupd-pack-") as directory:
        pack = PackFile(backend, key, pack_id, directory=directory, identities=identities)
        pack.close()
        return pack.index


def list_packs(backend: Backend, root: str = "dedup/") -> list[str]:
    """Keys of every pack under ``root`` (for rebuilds and the tests; the catalog knows them)."""
    try:
        return sorted(o.key for o in backend.list(f"{root}{PACKS_DIR}") if o.key.endswith(".pack"))
    except StorageNotFound:
        return []


__all__ = ["PackBuilder", "PackFile", "PackIndex", "compress_frame", "list_packs", "pack_key", "parse_index",
           "read_footer", "read_pack_index", "seal"]
