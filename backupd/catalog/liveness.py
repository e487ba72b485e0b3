"""Which chunks of a pack an archive uses: a bitmap over the pack's chunk positions.

A pack's chunks are numbered by their place in its index (``chunks.seq``: 0, 1, ...). What
an archive's recipe uses of one pack is a set of those positions, held in memory as a Python
``int`` whose bit ``n`` is position ``n`` (a *mask*: union is ``|``, the count is
``bit_count()``) and stored in ``archive_packs.used`` by :func:`encode`: one version byte,
then the little-endian bitmap compressed with zlib (a 4 MiB pack holds ~5,000 chunks: 625
bytes raw; the common cases -- every chunk, or long runs of them -- compress to a few dozen).
``NULL`` (``None`` here) means unknown -- a row written before chunk liveness existed, or by
``catalog rebuild`` or start-up reconcile, which do not see the writer's chunks -- and counts as
every chunk used.

Pure functions, no database: the catalog stores and combines masks, the writer builds them
(:func:`add` on a ``bytearray`` as it is told where each chunk it reuses is).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

from backupd.errors import IntegrityError

VERSION = b"\x01"
#: no pack holds more chunks than this (a 1 GiB pack of 36-byte index entries); a stored
#: bitmap that claims more is corrupt, and is not decompressed past it
MAX_POSITIONS = 1 << 25


def encode(mask: int) -> bytes:
    """The stored form of ``mask`` (a set of positions as an ``int``)."""
    if mask < 0:
        raise ValueError("a chunk mask is not negative")
    return VERSION + zlib.compress(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), 6)


def decode(blob: bytes | None, size: int) -> int:
    """The mask stored as ``blob``, cut to the pack's ``size`` positions; ``None`` (unknown)
    is every position."""
    if blob is None:
        return full(size)
    if blob[:1] != VERSION:
        raise IntegrityError(f"catalog: a chunk bitmap of an unknown version ({blob[:1].hex() or 'empty'})")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(blob[1:], MAX_POSITIONS // 8 + 1)
    except zlib.error:
        raise IntegrityError("catalog: a corrupt chunk bitmap") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise IntegrityError("catalog: a corrupt chunk bitmap (too long or truncated)")
    return int.from_bytes(raw, "little") & full(size)


def union(blobs: Iterable[bytes | None], size: int) -> int:
    """Every position any of ``blobs`` holds (an unknown one: all of them)."""
    mask, every = 0, full(size)
    for blob in blobs:
        mask |= decode(blob, size)
        if mask == every:
            break
    return mask


def full(size: int) -> int:
    """The mask of every position of a pack of ``size`` chunks."""
    return (1 << size) - 1


def positions(mask: int) -> Iterator[int]:
    """The positions in ``mask``, ascending."""
    raw = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    for i, byte in enumerate(raw):
        while byte:
            low = byte & -byte
            yield i * 8 + low.bit_length() - 1
            byte ^= low


def mask_of(chosen: Iterable[int]) -> int:
    bits = bytearray()
    for n in chosen:
        add(bits, n)
    return int.from_bytes(bits, "little")


def add(bits: bytearray, n: int) -> None:
    """Set position ``n`` in a growing little-endian bitmap (``int.from_bytes(bits,
    "little")`` is its mask): what a writer keeps per pack, a bit per chunk."""
    i = n >> 3
    if i >= len(bits):
        bits.extend(bytes(i + 1 - len(bits)))
    bits[i] |= 1 << (n & 7)
