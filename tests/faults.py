"""Fault injection for tests: a backend wrapper that fails, truncates, flips bits or kills its
own process at chosen backend calls.

It is test machinery, so it lives here and not in the installed package. In-process tests wrap
a backend with :class:`FaultInjectingBackend` (or hand ``backupd.cli.main`` a ``wrap_backend``
that does); crash tests of a real process run ``python -m tests.faults ARGS...``, which is
``backupd ARGS...`` with the faults of ``$BACKUPD_TEST_FAULTS`` (:func:`faults_from_json`)
slipped between each configured backend and its retry wrapper.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, BinaryIO, NoReturn, TypeVar

from backupd.backends.base import Backend, ObjectInfo, Readable
from backupd.backends.wrappers import Wrapper
from backupd.errors import InvalidInput

T = TypeVar("T")

#: the crash tests' fault list (JSON), read by :func:`main`
FAULTS_ENV = "BACKUPD_TEST_FAULTS"

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
        return io.BufferedReader(_FaultyReader(stream, streaming))

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
    :mod:`backupd.errors`. Read from ``BACKUPD_TEST_FAULTS`` by :func:`main`.
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
        raise InvalidInput(f"{FAULTS_ENV} is not a valid fault list: {exc}") from None


def main(argv: list[str] | None = None) -> NoReturn:
    """``backupd ARGS...``, every configured backend wrapped with the faults of ``$BACKUPD_TEST_FAULTS``."""
    from backupd.cli import main as backupd

    faults = faults_from_json(os.environ.get(FAULTS_ENV) or "[]")
    # one list for all backends, as one fault plan: a fault fires its `times` across all of them
    backupd(sys.argv[1:] if argv is None else argv, wrap_backend=lambda backend: FaultInjectingBackend(backend, faults))


if __name__ == "__main__":
    main()
