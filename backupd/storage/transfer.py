"""One-pass streams between a checkpoint tar and its stored form.

:class:`PackingReader` reads the node's tar exactly once and, in the same pass, hashes it,
compresses it with zstd, optionally encrypts it to age recipients, and hashes the stored
bytes; a backend pulls from it with ``read(n)``. Memory is a few buffers regardless of archive
size. It is seekable to its start so that a retry wrapper can restart a failed put without the
caller's help.

:class:`UnpackingReader` is the reverse for restores: it decrypts (with an age identity) and
decompresses a stored object, stops with :class:`DigestMismatch` the moment the stored bytes or
the tar grow past their expected sizes, and checks both digests and sizes when the stream ends,
raising :class:`DigestMismatch` *before* the caller can treat the data as complete.

The stored forms are standard: ``zstd -d`` (after ``age -d -i IDENTITY`` when encrypted) gives
back the kubelet's tar byte for byte. pyrage (the age binding) is push-style; :class:`_Filter`
runs it on a thread and turns its output back into ``read(n)``, with a bounded queue between.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Literal

import zstandard

from backupd.errors import BackupdError, IntegrityError, InvalidInput

READ_SIZE = 1 << 20
DEFAULT_LEVEL = 3  # chosen by measurement on memory-like data (faster than 1 there, and smaller): BENCHMARKS.md
DEFAULT_THREADS = 0  # compress on the reading thread: as fast here as 2 workers, and 50 MiB less memory


class DigestMismatch(IntegrityError):
    pass


class _HashingSource:
    """``raw`` read through, counted and SHA-256-hashed on a thread of its own.

    Each chunk is hashed while the caller compresses (or decompresses) it: hashlib and zstd both
    release the GIL, so the two run on two cores and a 1 GiB pack takes the longer of the two,
    not their sum (BENCHMARKS.md). One chunk is in flight at a time, so the order is kept and
    the memory is one more chunk. The worker thread ends with :meth:`hexdigest` or when the
    source is dropped (the executor's own clean-up).
    """

    def __init__(self, raw: BinaryIO, *, limit: int | None = None, over_limit: str = "") -> None:
        self.raw = raw
        self.size = 0
        self.limit = limit
        self.over_limit = over_limit  # the message when more than ``limit`` bytes come
        self._sha256 = hashlib.sha256()
        self._hashing: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise DigestMismatch(self.over_limit)
        if self._pending is not None:
            self._pending.result()
        if self._hashing is None:
            self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending = self._hashing.submit(self._sha256.update, data)
        return data

    def hexdigest(self) -> str:
        """The SHA-256 of everything read so far (waits for the chunk in flight)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._hashing is not None:
            self._hashing.shutdown(wait=False)
            self._hashing = None
        return self._sha256.hexdigest()


class _Filter:
    """``fn(source, sink)`` -- a push-style filter such as ``pyrage.encrypt_io`` -- on a thread,
    read from the other end with ``read(n)``. At most ``depth`` chunks wait in between."""

    def __init__(self, fn: Callable[[Any, Any], None], source: Any, *, what: str, depth: int = 16) -> None:
        self.what = what
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._buffer = bytearray()
        self._eof = False
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, source), name="age", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[Any, Any], None], source: Any) -> None:
        try:
            fn(source, self)
        except BaseException as exc:  # handed to the reading side, which raises it
            self._put(("error", exc), final=True)
            return
        self._put(("eof", None), final=True)

    def _put(self, item: tuple[str, Any], final: bool = False) -> None:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        if not final:
            raise OSError("stream cancelled")

    def write(self, data: bytes) -> int:
        self._put(("data", bytes(data)))
        return len(data)

    def flush(self) -> None:
        pass

    def read(self, n: int = -1) -> bytes:
        n = READ_SIZE if n is None or n < 0 else n
        while len(self._buffer) < n and not self._eof:
            kind, value = self._queue.get()
            if kind == "data":
                self._buffer += value
            elif kind == "eof":
                self._eof = True
            else:
                self._eof = True
                if isinstance(value, BackupdError):
                    raise value
                # pyrage reports a corrupt or truncated ciphertext as a plain OSError
                raise IntegrityError(f"{self.what}: age could not process the stream: {value}") from None
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def close(self) -> None:
        self._cancelled.set()
        self._thread.join(timeout=5)


def parse_recipients(recipients: Sequence[str], where: str) -> list[Any]:
    """age recipients (``age1...``) from config; errors name the setting, never a key."""
    import pyrage

    parsed = []
    for i, text in enumerate(recipients):
        try:
            parsed.append(pyrage.x25519.Recipient.from_str(text.strip()))
        except Exception:
            raise InvalidInput(f"{where}[{i}]: not an age X25519 recipient (expected age1...)") from None
    return parsed


def load_identities(path: str, where: str) -> list[Any]:
    """age identities from an identity file (``age-keygen`` output); the keys are never echoed."""
    import pyrage

    try:
        lines = open(path).read().splitlines()  # noqa: SIM115 - short read of a small key file
    except OSError as exc:
        raise InvalidInput(f"{where}: cannot read {path!r}: {exc.strerror}") from None
    identities = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                identities.append(pyrage.x25519.Identity.from_str(line))
            except Exception:
                raise InvalidInput(f"{where}: {path!r} holds a line that is not an age identity") from None
    if not identities:
        raise InvalidInput(f"{where}: {path!r} holds no age identity (AGE-SECRET-KEY-1...)")
    return identities


def _encrypt(recipients: Sequence[Any]) -> Callable[[Any, Any], None]:
    import pyrage

    return lambda source, sink: pyrage.encrypt_io(source, sink, list(recipients))


def _decrypt(identities: Sequence[Any]) -> Callable[[Any, Any], None]:
    import pyrage

    return lambda source, sink: pyrage.decrypt_io(source, sink, list(identities))


class PackingReader:
    """tar bytes in, stored bytes (zstd, or age(zstd) with ``recipients``) out;
    ``tar_sha256``/``stored_sha256`` are valid once the stream is drained."""

    def __init__(self, raw: BinaryIO, *, level: int = DEFAULT_LEVEL, threads: int = DEFAULT_THREADS,
                 recipients: Sequence[Any] = ()) -> None:
        self._raw = raw
        self._start = raw.tell() if raw.seekable() else 0
        self._level, self._threads = level, threads
        self._recipients = list(recipients)
        self._filter: _Filter | None = None
        self._reset()

    @property
    def encryption(self) -> Literal["none", "age"]:
        return "age" if self._recipients else "none"

    def _reset(self) -> None:
        if self._filter is not None:
            self._filter.close()
        self._source = _HashingSource(self._raw)
        cctx = zstandard.ZstdCompressor(level=self._level, threads=self._threads, write_checksum=True)
        # zstandard's stub asks for IO[bytes]; stream_reader only calls read(size) on its source
        # (its docstring: "any object with a read(size) method"), which _HashingSource has.
        self._stream = cctx.stream_reader(self._source, read_size=READ_SIZE)  # type: ignore[arg-type]
        if self._recipients:
            self._filter = _Filter(_encrypt(self._recipients), self._stream, what="encrypting an archive")
            self._stream = self._filter  # type: ignore[assignment]
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
        # Rewinding would race the encryption thread still reading the old stream; encrypted
        # puts are retried part by part by the backend instead.
        return self._raw.seekable() and not self._recipients

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
        return self._source.hexdigest()

    @property
    def tar_size(self) -> int:
        return self._source.size

    @property
    def stored_sha256(self) -> str:
        return self._out.hexdigest()


class UnpackingReader:
    """Stored zstd bytes in, tar bytes out, verified against the expected digests and sizes
    (with ``stored_only``: the stored bytes out, only their digest and size verified).

    The expected values come from the catalog and the manifest. More bytes than a size says
    raise :class:`DigestMismatch` from the ``read`` that passes it (memory and time stay bounded
    by the sizes, whatever the object holds); any other mismatch, a truncated stream or a
    corrupt frame raises :class:`DigestMismatch` (or :class:`IntegrityError`) from the final
    ``read``, so a consumer that writes to a temp file never commits bad data.
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
        encryption: str = "none",
        identities: Sequence[Any] = (),
        stored_only: bool = False,
    ) -> None:
        self.what = what
        self._expect = (tar_sha256, stored_sha256, tar_size, stored_size)
        # Sizes are enforced as the bytes come: a few KiB of zstd can expand to terabytes, and
        # a stored object can be longer than the catalog says; neither is read further.
        self._stored = _HashingSource(stored, limit=stored_size, over_limit=(
            f"{what}: does not match the catalog: the stored object is longer than its {stored_size} bytes"))
        compressed: Any = self._stored
        self._filter: _Filter | None = None
        self._done = False
        if stored_only:
            # An encrypted object read without its identity: its stored bytes are handed out as
            # they are, and only their size and SHA-256 are checked.
            self._expect = (None, stored_sha256, None, stored_size)
            self._tar = self._stored
            return
        if encryption == "age":
            if not identities:
                raise InvalidInput(f"{what} is encrypted with age: give the identity file that decrypts it "
                                   "(--identity-file)")
            self._filter = compressed = _Filter(_decrypt(identities), self._stored, what=what)
        elif encryption not in ("none", ""):
            raise InvalidInput(f"{what}: unknown encryption {encryption!r}")
        self._tar = _HashingSource(zstandard.ZstdDecompressor().stream_reader(
            compressed, read_size=READ_SIZE, read_across_frames=True), limit=tar_size, over_limit=(
            f"{what}: does not match the catalog: the tar is longer than its {tar_size} bytes (a decompression "
            "bomb, or the wrong object); nothing more is read"))

    @property
    def tar_size(self) -> int:
        return self._tar.size

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        if n is None or n < 0:
            n = READ_SIZE * 8
        try:
            data = self._tar.read(n)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.what}: the stored object is corrupt ({exc})") from None
        if data:
            return data
        self._done = True
        if self._filter is not None:
            self._filter.close()
        self._check()
        return b""

    def explain(self, exc: BackupdError) -> BackupdError:
        """What to raise when a consumer found ``exc`` in the tar read from this stream: the
        rest is read (bounded by the expected sizes), so that a stored object that does not
        match its digests is reported as that -- a corrupt object makes a malformed tar."""
        if isinstance(exc, DigestMismatch):
            return exc
        try:
            while self.read(READ_SIZE):
                pass
        except DigestMismatch as mismatch:
            return DigestMismatch(f"{mismatch}; so the stored object is corrupt ({exc})")
        except BackupdError:
            pass
        return exc

    def _check(self) -> None:
        tar_sha, stored_sha, tar_size, stored_size = self._expect
        problems = []
        if stored_size is not None and self._stored.size != stored_size:
            problems.append(f"stored size {self._stored.size} != {stored_size}")
        if stored_sha is not None and self._stored.hexdigest() != stored_sha:
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
