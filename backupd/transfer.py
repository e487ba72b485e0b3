"""One-pass streams between a checkpoint tar and its stored form.

:class:`PackingReader` reads the node's tar exactly once and, in the same pass, hashes it,
compresses it with zstd and hashes the compressed bytes; a backend pulls from it with
``read(n)``. Memory is a few buffers regardless of archive size. It is seekable to its start
so that a retry wrapper can restart a failed put without the caller's help.

:class:`UnpackingReader` is the reverse for restores: it decompresses a stored object and
checks both digests and sizes when the stream ends, raising :class:`DigestMismatch` *before*
the caller can treat the data as complete.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

import zstandard

from backupd.errors import IntegrityError

READ_SIZE = 1 << 20
DEFAULT_LEVEL = 1  # chosen by measurement on memory-like data: see BENCHMARKS.md
DEFAULT_THREADS = 2


class DigestMismatch(IntegrityError):
    pass


class _HashingSource:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


class PackingReader:
    """tar bytes in, zstd bytes out; ``tar_sha256``/``stored_sha256`` valid once drained."""

    def __init__(self, raw: BinaryIO, *, level: int = DEFAULT_LEVEL, threads: int = DEFAULT_THREADS) -> None:
        self._raw = raw
        self._start = raw.tell() if raw.seekable() else 0
        self._level, self._threads = level, threads
        self._reset()

    def _reset(self) -> None:
        self._source = _HashingSource(self._raw)
        cctx = zstandard.ZstdCompressor(level=self._level, threads=self._threads, write_checksum=True)
        self._stream = cctx.stream_reader(self._source, read_size=READ_SIZE)
        self._out = hashlib.sha256()
        self.stored_size = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(READ_SIZE * 8):
                chunks.append(chunk)
            return b"".join(chunks)
        # zstd's reader may return short reads; fill up to n so callers see full parts.
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._stream.read(n - got)
            if not chunk:
                self._done = True
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self._out.update(data)
        self.stored_size += len(data)
        return data

    def seekable(self) -> bool:
        return self._raw.seekable()

    def tell(self) -> int:
        return self.stored_size

    def seek(self, offset: int, whence: int = 0) -> int:
        if offset != 0 or whence != 0:
            raise OSError("PackingReader can only seek back to its start")
        self._raw.seek(self._start)
        self._reset()
        return 0

    @property
    def tar_sha256(self) -> str:
        return self._source.sha256.hexdigest()

    @property
    def tar_size(self) -> int:
        return self._source.size

    @property
    def stored_sha256(self) -> str:
        return self._out.hexdigest()


class UnpackingReader:
    """Stored zstd bytes in, tar bytes out, verified against the expected digests at the end.

    ``expected_*`` values come from the catalog and the manifest; any mismatch, a truncated
    stream or a corrupt frame raises :class:`DigestMismatch` (or :class:`IntegrityError`) from the
    final ``read``, so a consumer that writes to a temp file never commits bad data.
    """

    def __init__(
        self,
        stored: BinaryIO,
        *,
        what: str,
        tar_sha256: str | None,
        stored_sha256: str | None,
        tar_size: int | None = None,
        stored_size: int | None = None,
    ) -> None:
        self.what = what
        self._expect = (tar_sha256, stored_sha256, tar_size, stored_size)
        self._stored = _HashingSource(stored)
        self._stream = zstandard.ZstdDecompressor().stream_reader(self._stored, read_size=READ_SIZE, read_across_frames=True)
        self._tar = hashlib.sha256()
        self.tar_size = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        if n is None or n < 0:
            n = READ_SIZE * 8
        try:
            data = self._stream.read(n)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.what}: the stored object is corrupt ({exc})") from None
        if data:
            self._tar.update(data)
            self.tar_size += len(data)
            return data
        self._done = True
        self._check()
        return b""

    def _check(self) -> None:
        tar_sha, stored_sha, tar_size, stored_size = self._expect
        problems = []
        if stored_size is not None and self._stored.size != stored_size:
            problems.append(f"stored size {self._stored.size} != {stored_size}")
        if stored_sha is not None and self._stored.sha256.hexdigest() != stored_sha:
            problems.append("stored SHA-256 differs")
        if tar_size is not None and self.tar_size != tar_size:
            problems.append(f"tar size {self.tar_size} != {tar_size}")
        if tar_sha is not None and self._tar.hexdigest() != tar_sha:
            problems.append("tar SHA-256 differs")
        if problems:
            raise DigestMismatch(f"{self.what}: does not match the catalog: {'; '.join(problems)}")

    @property
    def tar_sha256(self) -> str:
        return self._tar.hexdigest()
