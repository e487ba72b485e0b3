from __future__ import annotations

import hashlib
import io
import os

import pytest
import zstandard

from backupd.errors import IntegrityError
from backupd.storage.transfer import DigestMismatch, PackingReader, UnpackingReader


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


class Counted:
    """``head``, then ``tail`` bytes of zeros generated as read; counts what was read."""

    def __init__(self, head: bytes, tail: int = 0) -> None:
        self.head, self.tail, self.read_bytes = head, tail, 0

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n is None or n < 0 else n
        data, self.head = self.head[:n], self.head[n:]
        extra = min(n - len(data), self.tail)
        self.tail -= extra
        data += bytes(extra)
        self.read_bytes += len(data)
        return data


def zstd_of_zeros(gib: int) -> bytes:
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
        for _ in range(gib << 10):
            writer.write(bytes(1 << 20))
    return out.getvalue()


@pytest.mark.timeout(60)  # without the running check, 4 GiB are decompressed and hashed before the end
def test_a_tar_longer_than_its_size_stops_on_the_read_that_passes_it() -> None:
    bomb = zstd_of_zeros(4)
    u = UnpackingReader(Counted(bomb), what="archive b", tar_sha256=None, stored_sha256=None, tar_size=1 << 20,
                        stored_size=len(bomb))
    handed_out = 0
    with pytest.raises(DigestMismatch, match="archive b: .*the tar is longer than its 1048576 bytes"):
        while data := u.read(256 << 10):
            handed_out += len(data)
    assert handed_out <= 1 << 20  # a consumer never sees a byte past the declared size


def test_a_stored_object_longer_than_its_size_is_not_read_on() -> None:
    data = memory_like(1 << 20)
    reader, stored = pack(data)
    source = Counted(stored, tail=10 << 30)  # 10 GiB more than the catalog says
    u = UnpackingReader(source, what="archive s", tar_sha256=reader.tar_sha256, stored_sha256=reader.stored_sha256,
                        tar_size=reader.tar_size, stored_size=reader.stored_size)
    with pytest.raises(DigestMismatch, match=f"the stored object is longer than its {reader.stored_size} bytes"):
        while u.read(1 << 20):
            pass
    assert source.read_bytes <= reader.stored_size + (1 << 20)  # one read past it, no more


def test_an_encrypted_object_longer_than_its_size_is_not_read_on() -> None:
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    reader = PackingReader(io.BytesIO(memory_like(1 << 20)), recipients=[identity.to_public()])
    stored = b"".join(iter(lambda: reader.read(1 << 20), b""))
    source = Counted(stored, tail=10 << 30)
    u = UnpackingReader(source, what="archive e", tar_sha256=reader.tar_sha256, stored_sha256=reader.stored_sha256,
                        tar_size=reader.tar_size, stored_size=reader.stored_size, encryption="age",
                        identities=[identity])  # fmt: skip
    with pytest.raises(DigestMismatch, match="the stored object is longer than"):
        while u.read(1 << 20):
            pass
    assert source.read_bytes <= reader.stored_size + (4 << 20)


def test_explain_blames_storage_when_the_object_is_corrupt() -> None:
    data = memory_like(2 << 20)
    reader, stored = pack(data)
    refused = IntegrityError("a malformed tar header")
    wrong = UnpackingReader(io.BytesIO(stored), what="archive x", tar_sha256="0" * 64, stored_sha256=None)
    assert wrong.read(1000)
    blamed = wrong.explain(refused)
    assert isinstance(blamed, DigestMismatch)
    assert "so the stored object is corrupt (a malformed tar header)" in str(blamed)
    right = UnpackingReader(io.BytesIO(stored), what="archive x", tar_sha256=reader.tar_sha256, stored_sha256=None)
    assert right.read(1000) and right.explain(refused) is refused
