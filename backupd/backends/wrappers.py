"""Wrappers around a backend: retries, dry runs and fault injection.

Each wrapper is itself a :class:`~backupd.backends.base.Backend` with the wrapped backend's
``name``, so wrappers stack (``RetryingBackend(FaultInjectingBackend(S3Backend(...), faults))``)
and nothing above them knows they are there. None of them translates foreign exceptions: the
wrapped backend already raises only :mod:`backupd.errors` classes.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

from backupd import retry
from backupd.backends.base import Backend, ObjectInfo, Readable, check_key
from backupd.errors import BackupdError, InvalidInput, ObjectExists

T = TypeVar("T")

#: ``on_retry(operation, attempt, error, delay)``: called before sleeping ``delay`` seconds after
#: attempt number ``attempt`` (1-based) of ``operation`` failed with the retryable ``error``.
OnRetry = Callable[[str, int, BackupdError, float], None]


class Wrapper(Backend):
    """A backend that passes every call to ``inner``: the base of the wrappers below (and of
    a test's own), each overriding only what it changes."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    def put(self, key: str, source: Readable) -> ObjectInfo:
        return self.inner.put(key, source)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self.inner.delete_many(keys)

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        return self.inner.abort_incomplete(older_than, key)

    def describe(self) -> str:
        return self.inner.describe()


# -- retries ---------------------------------------------------------------------------------


def _start_position(source: Readable) -> int | None:
    """Where a seekable source is now, or ``None`` if it cannot be rewound."""
    try:
        seekable = getattr(source, "seekable", None)
        if callable(seekable) and not seekable():
            return None
        if not callable(getattr(source, "seek", None)) or not callable(getattr(source, "tell", None)):
            return None
        return int(source.tell())  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return None


class RetryingBackend(Wrapper):
    """Retries whole operations that fail with an error whose ``retryable`` is true.

    Up to ``attempts`` attempts; after failed attempt ``n`` (1-based) it sleeps a delay drawn
    uniformly from ``[0, min(max_delay, base_delay * 2 ** (n - 1))]`` (exponential backoff with
    full jitter, so that many nodes failing together do not retry together). Errors that are not
    retryable -- and exceptions that are not backupd errors -- pass through at once; when the
    attempts run out, the last error is raised.

    * ``put`` is retried only when its source is seekable: the position from ``source.tell()``
      is recorded before the first attempt and the source is seeked back to it before each
      retry. An unseekable source gets exactly one attempt. If an attempt failed ambiguously
      (say the reply was lost after the object was committed), a retry can report
      :class:`ObjectExists` for the put's own object; such an error carries a note saying so.
    * ``open`` retries opening; errors while reading the stream later are the caller's.
    * ``list`` is retried only until it has yielded its first object (a retry after that
      would yield objects twice).
    * ``stat``, ``delete``, ``delete_many`` and ``abort_incomplete`` are retried as they are
      (deletes are idempotent).
    """

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: OnRetry | None = None,
    ) -> None:
        super().__init__(inner)
        if attempts < 1:
            raise InvalidInput("attempts must be at least 1")
        self.backoff = retry.Backoff(attempts=attempts, base_delay=base_delay, max_delay=max_delay)
        self._sleep = sleep
        self._on_retry = on_retry

    @property
    def attempts(self) -> int:
        return self.backoff.attempts

    def delay(self, attempt: int) -> float:
        """The backoff after failed attempt ``attempt`` (1-based)."""
        return self.backoff.delay(attempt)

    def _run(self, operation: str, fn: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
        on_retry = self._on_retry

        def notify(err: BackupdError, attempt: int, delay: float) -> None:
            if on_retry is not None:
                on_retry(operation, attempt, err, delay)

        return retry.call(fn, self.backoff, sleep=self._sleep, on_retry=notify, before_retry=before_retry)

    def put(self, key: str, source: Readable) -> ObjectInfo:
        start = _start_position(source)
        if start is None:
            return self.inner.put(key, source)
        failures: list[BackupdError] = []

        def attempt() -> ObjectInfo:
            try:
                return self.inner.put(key, source)
            except ObjectExists as err:
                if failures:
                    err.add_note(
                        f"an earlier attempt of this put failed ({failures[-1].kind}: {failures[-1]}); "
                        f"the existing object may be that attempt's"
                    )
                raise
            except BackupdError as err:
                failures.append(err)
                raise

        def rewind() -> None:
            source.seek(start)  # type: ignore[attr-defined]

        return self._run("put", attempt, rewind)

    def open(self, key: str) -> BinaryIO:
        return self._run("open", lambda: self.inner.open(key))

    def stat(self, key: str) -> ObjectInfo | None:
        return self._run("stat", lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        attempt = 1
        while True:
            yielded = False
            try:
                for info in self.inner.list(prefix):
                    yielded = True
                    yield info
                return
            except BackupdError as err:
                if yielded or not err.retryable or attempt >= self.attempts:
                    raise
                delay = self.delay(attempt)
                if self._on_retry is not None:
                    self._on_retry("list", attempt, err, delay)
                self._sleep(delay)
                attempt += 1

    def delete(self, key: str) -> None:
        self._run("delete", lambda: self.inner.delete(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)  # a retry needs them again
        self._run("delete_many", lambda: self.inner.delete_many(keys))

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        return self._run("abort_incomplete", lambda: self.inner.abort_incomplete(older_than, key))


# -- dry run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedAction:
    """Something a :class:`DryRunBackend` was asked to do and did not."""

    operation: str  # "put", "delete" or "abort_incomplete"
    key: str | None
    size: int | None = None  # bytes a put would have written


class DryRunBackend(Wrapper):
    """Reads pass through; writes are recorded in :attr:`planned` and change nothing.

    ``put`` checks the key, refuses an existing one as the real put would (:class:`ObjectExists`),
    then reads the source to its end -- so that whatever feeds it (hashing, compression) runs
    and the recorded size is the real one -- and discards the bytes. ``delete`` and
    ``delete_many`` record one ``delete`` per key; ``abort_incomplete`` records itself and
    returns 0. Planned puts are not visible to ``stat``/``list``/``open``.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.planned: list[PlannedAction] = []
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"{self.inner.describe()} [dry run]"

    def _record(self, action: PlannedAction) -> None:
        with self._lock:
            self.planned.append(action)

    def put(self, key: str, source: Readable) -> ObjectInfo:
        check_key(key)
        if self.inner.stat(key) is not None:
            raise ObjectExists(f"writing {key!r} to backend {self.name!r}: the object already exists")
        size = 0
        while chunk := source.read(1024 * 1024):
            size += len(chunk)
        self._record(PlannedAction("put", key, size))
        return ObjectInfo(key, size, datetime.now(UTC))

    def delete(self, key: str) -> None:
        self._record(PlannedAction("delete", check_key(key)))

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        self._record(PlannedAction("abort_incomplete", key))
        return 0


# -- fault injection ------------------------------------------------------------------------

OPERATIONS = ("put", "open", "stat", "list", "delete", "delete_many", "abort_incomplete")


@dataclass
class Fault:
    """One planned misbehaviour of a :class:`FaultInjectingBackend`.

    It applies to calls of ``operation`` (one of :data:`OPERATIONS`, or ``"*"``) whose key
    matches the ``fnmatch`` pattern ``key`` (``list`` matches its prefix, ``delete_many`` any of
    its keys, ``abort_incomplete`` its key or the empty string), lets the first ``skip`` matching
    calls through, then fires ``times`` times (``None``: on every matching call). What it does:

    * ``error`` alone: the call raises it without reaching the wrapped backend;
      with ``after=True``, the wrapped backend does the operation first and the error is raised
      afterwards (a reply lost after the work was done);
    * ``at_byte`` (``put``/``open``, with ``error``): the data stream raises ``error`` once
      ``at_byte`` bytes have passed (for ``put`` the wrapped backend sees its source fail);
    * ``truncate_at`` (``put``/``open``): the stream silently ends after that many bytes;
    * ``flip_bit`` (``put``/``open``): that bit (0 = lowest bit of the first byte) is inverted.

    ``error`` may be an exception or a zero-argument callable making one.
    """

    operation: str
    key: str = "*"
    error: BaseException | Callable[[], BaseException] | None = None
    after: bool = False
    at_byte: int | None = None
    truncate_at: int | None = None
    flip_bit: int | None = None
    times: int | None = 1
    skip: int = 0  # let this many matching calls through before firing
    fired: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.operation != "*" and self.operation not in OPERATIONS:
            raise InvalidInput(f"unknown operation {self.operation!r} for a fault")
        streaming = self.at_byte is not None or self.truncate_at is not None or self.flip_bit is not None
        if streaming and self.operation not in ("put", "open"):
            raise InvalidInput("at_byte, truncate_at and flip_bit apply to put and open only")
        if (self.at_byte is not None or self.after) and self.error is None:
            raise InvalidInput("at_byte and after need an error to raise")
        if self.error is None and not streaming:
            raise InvalidInput("a fault needs an error, truncate_at or flip_bit")

    @property
    def streaming(self) -> bool:
        return self.at_byte is not None or self.truncate_at is not None or self.flip_bit is not None

    def make_error(self) -> BaseException:
        error = self.error
        if isinstance(error, BaseException):
            return error
        assert error is not None
        return error()


class _FaultyStream:
    """Applies streaming faults to data passing through ``read``."""

    def __init__(self, read: Callable[[int], bytes], faults: list[Fault]) -> None:
        self._read = read
        self._faults = faults
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        limit: int | None = None
        for fault in self._faults:
            if fault.truncate_at is not None:
                limit = fault.truncate_at if limit is None else min(limit, fault.truncate_at)
            if fault.at_byte is not None:
                if self._offset >= fault.at_byte:
                    raise fault.make_error()
                limit = fault.at_byte if limit is None else min(limit, fault.at_byte)
        if limit is not None:
            if self._offset >= limit:
                return b""
            n = limit - self._offset if n is None or n < 0 else min(n, limit - self._offset)
        data = self._read(n)
        for fault in self._faults:
            if fault.flip_bit is not None:
                index = fault.flip_bit // 8 - self._offset
                if 0 <= index < len(data):
                    flipped = bytearray(data)
                    flipped[index] ^= 1 << (fault.flip_bit % 8)
                    data = bytes(flipped)
        self._offset += len(data)
        return data


class _FaultyReader(io.RawIOBase):
    def __init__(self, inner: BinaryIO, faults: list[Fault]) -> None:
        super().__init__()
        self._inner = inner
        self._stream = _FaultyStream(inner.read, faults)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._inner.close()
            finally:
                super().close()


class FaultInjectingBackend(Wrapper):
    """A real backend (the wrapped one) that misbehaves as planned by a list of :class:`Fault`.

    Faults are consumed in list order; every fired fault is appended to :attr:`fired` as
    ``(operation, key, fault)``. With no faults it behaves exactly like the wrapped backend.
    """

    def __init__(self, inner: Backend, faults: Iterable[Fault] = ()) -> None:
        super().__init__(inner)
        self.faults = list(faults)
        self.fired: list[tuple[str, str, Fault]] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take(self, operation: str, keys: Iterable[str]) -> list[Fault]:
        keys = list(keys)
        taken = []
        with self._lock:
            for fault in self.faults:
                if fault.operation not in ("*", operation):
                    continue
                if fault.times is not None and fault.fired >= fault.times:
                    continue
                if not any(fnmatch.fnmatchcase(k, fault.key) for k in keys):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                fault.fired += 1
                taken.append(fault)
                self.fired.append((operation, keys[0] if len(keys) == 1 else ",".join(keys), fault))
        return taken

    def _call(self, operation: str, keys: Iterable[str], fn: Callable[[], T]) -> T:
        faults = self._take(operation, keys)
        for fault in faults:
            if not fault.after and not fault.streaming and fault.error is not None:
                raise fault.make_error()
        result = fn()
        for fault in faults:
            if fault.after:
                raise fault.make_error()
        return result

    def put(self, key: str, source: Readable) -> ObjectInfo:
        faults = self._take("put", [key])
        streaming = [f for f in faults if f.streaming]
        for fault in faults:
            if not fault.after and not fault.streaming:
                raise fault.make_error()
        result = self.inner.put(key, _FaultyStream(source.read, streaming) if streaming else source)
        for fault in faults:
            if fault.after:
                raise fault.make_error()
        return result

    def open(self, key: str) -> BinaryIO:
        faults = self._take("open", [key])
        streaming = [f for f in faults if f.streaming]
        for fault in faults:
            if not fault.after and not fault.streaming:
                raise fault.make_error()
        stream = self.inner.open(key)
        for fault in faults:
            if fault.after:
                stream.close()
                raise fault.make_error()
        if not streaming:
            return stream
        return io.BufferedReader(_FaultyReader(stream, streaming))  # type: ignore[return-value]

    def stat(self, key: str) -> ObjectInfo | None:
        return self._call("stat", [key], lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        faults = self._take("list", [prefix])
        for fault in faults:
            if not fault.after:
                raise fault.make_error()
        yield from self.inner.list(prefix)
        for fault in faults:
            raise fault.make_error()

    def delete(self, key: str) -> None:
        self._call("delete", [key], lambda: self.inner.delete(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._call("delete_many", keys, lambda: self.inner.delete_many(keys))

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        return self._call("abort_incomplete", [key or ""], lambda: self.inner.abort_incomplete(older_than, key))


def _kill_self() -> BaseException:
    """A fault that is a crash: the process dies at once, as with ``kill -9``."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL was sent to this process")  # pragma: no cover


def faults_from_json(text: str) -> list[Fault]:
    """Faults described as JSON, for crash tests of a real daemon process.

    ``[{"operation": "put", "key": "*.json", "after": true, "kill": true}, {"operation":
    "delete_many", "error": "StorageUnavailable", "times": 2}]``. ``kill`` SIGKILLs the process
    (``after``: once the wrapped backend has done the operation); ``error`` names a class of
    :mod:`backupd.errors`. Read from ``BACKUPD_FAULTS`` by the composition root; never set it
    outside tests.
    """
    from backupd import errors

    try:
        specs = json.loads(text)
        if not isinstance(specs, list):
            raise ValueError("expected a JSON list")
        faults = []
        for spec in specs:
            error: Any
            if spec.get("kill"):
                error = _kill_self
            else:
                cls = getattr(errors, spec["error"])
                message = spec.get("message", f"injected {spec['error']}")
                error = lambda cls=cls, message=message: cls(message)  # noqa: E731
            faults.append(Fault(spec["operation"], key=spec.get("key", "*"), error=error,
                                after=bool(spec.get("after", False)), times=spec.get("times", 1),
                                skip=int(spec.get("skip", 0))))
        return faults
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"BACKUPD_FAULTS is not a valid fault list: {exc}") from None
