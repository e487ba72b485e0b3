"""Wrappers around a backend: retries and dry runs.

Each wrapper is itself a :class:`~backupd.backends.base.Backend` with the wrapped backend's
``name``, so wrappers stack (``RetryingBackend(S3Backend(...))``; the test suite slips its
fault-injecting wrapper in between) and nothing above them knows they are there. None of them
translates foreign exceptions: the wrapped backend already raises only :mod:`backupd.errors`
classes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, TypeVar

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
