"""Progress of a long transfer: a bar on a terminal, structured log lines otherwise.

A :class:`Progress` is told how many bytes to expect (from the catalog's sizes) and is
``advance``-d as bytes pass. On a terminal it redraws one line on stderr (at most a few times a
second); anywhere else -- a pod's log, a CI job, a pipe -- it logs a ``restore_progress`` event
with ``bytes_done``, ``bytes_total`` and ``percent`` at most every ``log_interval`` seconds, and
always once at the end, so a log collector sees the transfer move without drowning in lines.

:class:`ProgressReader` wraps any ``read(n)`` source and advances a Progress by what it returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from backupd.backends.base import Readable
from backupd.sizes import human_bytes

_BAR_WIDTH = 30
_REDRAW_SECONDS = 0.2


class Progress:
    """Bytes done out of ``total`` (``None`` when unknown); see the module docstring.

    ``fields`` are added to every log line (e.g. ``archive_id``). ``clock`` is injectable so
    tests can drive the log cadence without sleeping.
    """

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "",
        event: str = "restore_progress",
        stream: TextIO | None = None,
        tty: bool | None = None,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
        **fields: Any,
    ) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.event = event
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_interval = log_interval
        self.clock = clock
        self.log = logger if logger is not None else structlog.get_logger("backupd.progress")
        self.fields = fields
        self._started = clock()
        self._last_emit: float | None = None
        self._finished = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish(ok=exc_type is None)

    def advance(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        now = self.clock()
        interval = _REDRAW_SECONDS if self.tty else self.log_interval
        if self._last_emit is None or now - self._last_emit >= interval:
            self._emit(now)

    def finish(self, *, ok: bool = True) -> None:
        """Draw or log the final state once; on a terminal, end the bar's line."""
        if self._finished:
            return
        self._finished = True
        self._emit(self.clock(), final=True, ok=ok)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def percent(self) -> float | None:
        if not self.total:
            return None
        return min(100.0, 100.0 * self.done / self.total)

    def _rate(self, now: float) -> float:
        elapsed = now - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _emit(self, now: float, *, final: bool = False, ok: bool = True) -> None:
        self._last_emit = now
        if self.tty:
            self._draw(now)
            return
        extra: dict[str, Any] = {"done": True, "ok": ok} if final else {}
        pct = self.percent
        self.log.info(
            self.event, bytes_done=self.done, bytes_total=self.total,
            percent=round(pct, 1) if pct is not None else None,
            bytes_per_second=round(self._rate(now)), **self.fields, **extra,
        )

    def _draw(self, now: float) -> None:
        pct = self.percent
        if pct is None:
            bar = " " * _BAR_WIDTH
            amount = human_bytes(self.done)
        else:
            filled = int(_BAR_WIDTH * pct / 100)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            amount = f"{human_bytes(self.done)} / {human_bytes(self.total or 0)} {pct:5.1f}%"
        line = f"\r{self.label} [{bar}] {amount} {human_bytes(self._rate(now))}/s"
        self.stream.write(line.ljust(79))
        self.stream.flush()


class ProgressReader:
    """A ``read(n)`` source that advances ``progress`` by every byte it hands out."""

    def __init__(self, source: Readable, progress: Progress) -> None:
        self.source = source
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.progress.advance(len(data))
        return data
