from __future__ import annotations

import hashlib
import io
import os

import pytest
import zstandard

from backupd.errors import IntegrityError
from backupd.transfer import DigestMismatch, PackingReader, UnpackingReader


def memory_like(size: int) -> bytes:
    page = os.urandom(4096)
    chunks = []
    for i in range(size // 4096):
        chunks.append(b"\0" * 4096 if i % 3 == 0 else page if i % 3 == 1 else os.urandom(4096))
    return b"".join(chunks)


def pack(data: bytes) -> tuple[PackingReader, bytes]:
    reader = PackingReader(io.BytesIO(data))
    out = b"".join(iter(lambda: reader.read(1 << 20), b""))
    return reader, out


def test_packing_hashes_both_sides_in_one_pass() -> None:
    data = memory_like(3 << 20)
    reader, stored = pack(data)
    assert reader.tar_sha256 == hashlib.sha256(data).hexdigest()
    assert reader.tar_size == len(data)
    assert reader.stored_sha256 == hashlib.sha256(stored).hexdigest()
    assert reader.stored_size == len(stored) < len(data)
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stored)).read() == data


def test_packing_fills_reads_to_the_requested_size() -> None:
    reader = PackingReader(io.BytesIO(os.urandom(5 << 20)))
    first = reader.read(2 << 20)
    assert len(first) == 2 << 20


def test_seek_to_start_restarts_the_stream() -> None:
    data = memory_like(2 << 20)
    reader = PackingReader(io.BytesIO(data))
    partial = reader.read(100_000)
    reader.seek(0)
    rest = b"".join(iter(lambda: reader.read(1 << 20), b""))
    assert rest.startswith(partial)
    assert reader.tar_sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        reader.seek(10)


def unpack(stored: bytes, reader: PackingReader, **override: object) -> bytes:
    expect = dict(tar_sha256=reader.tar_sha256, stored_sha256=reader.stored_sha256, tar_size=reader.tar_size,
                  stored_size=reader.stored_size)
    expect.update(override)  # type: ignore[arg-type]
    u = UnpackingReader(io.BytesIO(stored), what="archive x", **expect)  # type: ignore[arg-type]
    return b"".join(iter(lambda: u.read(1 << 20), b""))


def test_unpacking_round_trip() -> None:
    data = memory_like(2 << 20)
    reader, stored = pack(data)
    assert unpack(stored, reader) == data


def test_bit_flip_is_detected() -> None:
    data = memory_like(2 << 20)
    reader, stored = pack(data)
    flipped = bytearray(stored)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="archive x"):
        unpack(bytes(flipped), reader)


def test_truncation_is_detected() -> None:
    data = memory_like(2 << 20)
    reader, stored = pack(data)
    with pytest.raises(IntegrityError):
        unpack(stored[: len(stored) // 2], reader)


def test_catalog_digest_disagreement_is_detected() -> None:
    data = memory_like(1 << 20)
    reader, stored = pack(data)
    with pytest.raises(DigestMismatch, match="tar SHA-256 differs"):
        unpack(stored, reader, tar_sha256="0" * 64)
