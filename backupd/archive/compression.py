"""Push-mode decompression of a tar read by ``inspect``: zstd, gzip, xz or bzip2, by magic bytes.

:class:`Decompressor` is given bytes as they arrive (from a file, or as the data of the
``rootfs-diff.tar`` member passes the outer scanner) and hands the decompressed bytes on in
pieces of at most ``CHUNK`` bytes, so a decompression bomb never sits in memory. A corrupt
stream, or one cut before its end marker, is an :class:`~backupd.errors.IntegrityError`; a
zstd frame cut short ends silently (zstandard cannot tell), and the tar reader then misses its
end-of-archive block, so lost content is still reported.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import IO, Any, cast

import zstandard

from backupd.errors import IntegrityError

__all__ = ["AGE_MAGIC", "CHUNK", "Decompressor", "detect_compression"]

CHUNK = 1 << 20
AGE_MAGIC = b"age-encryption.org/"
_MAGICS = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)
_SNIFF = max(len(magic) for magic, _ in _MAGICS)


def detect_compression(head: bytes) -> str:
    """``zstd``, ``gzip``, ``xz``, ``bzip2`` or ``none`` from the first bytes of a stream."""
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return "none"


class _Emitter:
    """The file-like target of zstandard's stream writer."""

    def __init__(self, emit: Callable[[bytes], object]) -> None:
        self.emit = emit

    def write(self, data: bytes) -> int:
        self.emit(data)
        return len(data)


class Decompressor:
    """``write`` compressed (or plain) bytes in any chunking, then ``close``; ``emit`` gets the
    decompressed bytes. :attr:`kind` is known once the first bytes have been seen."""

    def __init__(self, what: str, emit: Callable[[bytes], object]) -> None:
        self.what = what
        self.emit = emit
        self.kind: str | None = None
        self._head = b""
        self._stream: Any = None  # a zlib/lzma/bz2 decompressor, or zstandard's stream writer
        self._ignore_rest = False
        self._streams = 1

    def write(self, data: bytes | memoryview) -> None:
        if self.kind is None:
            self._head += bytes(data)
            if len(self._head) < _SNIFF:
                return
            data, self._head = self._head, b""
            self._start(detect_compression(data))
        if not data or self._ignore_rest:
            return
        try:
            self._push(bytes(data))
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, zstandard.ZstdError) as exc:
            raise self._corrupt(exc) from None

    def close(self) -> None:
        """The input ended: a gzip, xz or bzip2 stream must have reached its end marker."""
        if self.kind is None:
            head, self._head = self._head, b""
            self._start(detect_compression(head))
            if head:
                self.write(head)
        if self.kind in ("gzip", "xz", "bzip2") and not self._ignore_rest and not self._stream.eof:
            raise self._corrupt(EOFError("compressed file ended before the end-of-stream marker was reached"))
        if self.kind == "zstd":
            self._stream.flush()

    def _corrupt(self, exc: BaseException) -> IntegrityError:
        return IntegrityError(f"{self.what}: the {self.kind} stream is corrupt or truncated ({exc}); nothing can be "
                              "read past it")  # fmt: skip

    def _start(self, kind: str) -> None:
        self.kind = kind
        if kind == "zstd":
            self._stream = zstandard.ZstdDecompressor().stream_writer(cast(IO[bytes], _Emitter(self.emit)),
                                                                      write_size=CHUNK,
                                                                      write_return_read=True, closefd=False)
        elif kind != "none":
            self._stream = self._new_stream()

    def _new_stream(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(wbits=31)
        return lzma.LZMADecompressor() if self.kind == "xz" else bz2.BZ2Decompressor()

    def _push(self, data: bytes) -> None:
        if self.kind == "none":
            self.emit(data)
            return
        if self.kind == "zstd":
            self._stream.write(data)
            return
        while data:
            if self._stream.eof:  # concatenated streams: gzip members, xz or bzip2 streams
                self._stream = self._new_stream()
                self._streams += 1
            try:
                data = self._drain(data)
            except (lzma.LZMAError, OSError) as exc:
                if self._streams > 1 and self.kind in ("xz", "bzip2"):
                    self._ignore_rest = True  # trailing garbage after a stream, as LZMAFile and BZ2File ignore it
                    return
                raise self._corrupt(exc) from None

    def _drain(self, data: bytes) -> bytes:
        """Decompress ``data`` in bounded pieces; what is left when the stream ends."""
        stream = self._stream
        if self.kind == "gzip":
            out = stream.decompress(data, CHUNK)
            while True:
                if out:
                    self.emit(out)
                if not stream.unconsumed_tail or stream.eof:
                    return b"" if not stream.eof else stream.unused_data
                out = stream.decompress(stream.unconsumed_tail, CHUNK)
        out = stream.decompress(data, CHUNK)
        while True:
            if out:
                self.emit(out)
            if stream.eof:
                return stream.unused_data
            if stream.needs_input:
                return b""
            out = stream.decompress(b"", CHUNK)
