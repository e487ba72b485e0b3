"""The daemon's last report, which ``/api/v1/report`` answers from.

A fresh report reads every archive's entry in three indexes of the catalog: at a million
archives that takes seconds (BENCHMARKS.md), too long for a request. So the daemon computes it
on its housekeeping tick (:meth:`ReportCache.refresh`) and the API serves the last one; its
``generated_at`` says when it was computed. The tick refreshes it only while someone reads it
(:meth:`ReportCache.read_within`; a DaemonSet of daemons must not each load the catalog every
minute for nobody), so a request waits for a fresh report only when there is none yet or the
last one is older than ``max_age``.

The JSON is serialised once per report and form (with or without the archive timelines), so a
request costs the copy of some bytes, not a serialisation of the whole report; a refresh
serialises at once the forms read lately (the timelines of a big report take seconds).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from backupd.report.model import RetentionReport


class ReportCache:
    """The last report ``compute`` returned, and its JSON. Thread-safe: the daemon's tick
    refreshes it while the HTTP server's threads read it."""

    def __init__(self, compute: Callable[[], RetentionReport], *, max_age: timedelta = timedelta(minutes=5),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._compute = compute
        self._max_age = max_age.total_seconds()
        self._clock = clock
        self._report: RetentionReport | None = None
        self._computed_at = 0.0  # clock() when _report was computed
        self._read_at: dict[bool, float] = {}  # with timelines or not -> clock() of its last read
        self._json: dict[bool, bytes] = {}  # with timelines or not -> the report's JSON
        self._lock = threading.Lock()  # guards the fields above
        self._computing = threading.Lock()  # one computation at a time

    def refresh(self, *, serialise_read_within: timedelta = timedelta(0)) -> RetentionReport:
        """Compute a report now and keep it (and forget the last one's JSON); returns it. Its
        JSON is serialised at once in the forms read within ``serialise_read_within``. A failure
        (e.g. the catalog unreachable) propagates and leaves the last report served."""
        with self._computing:
            report = self._compute_and_keep()
        for timelines in (False, True):
            if self._read_within(serialise_read_within, timelines):
                self._serialised(report, timelines)
        return report

    def read_within(self, period: timedelta) -> bool:
        """Whether the report was read (in any form) in the last ``period``."""
        return any(self._read_within(period, timelines) for timelines in (False, True))

    def serialised(self, *, timelines: bool = False) -> bool:
        """Whether the last report's JSON in this form is ready (a request gets it at once)."""
        with self._lock:
            return self._report is not None and timelines in self._json

    def report(self) -> RetentionReport:
        """The last report; computed now when there is none yet or it is older than ``max_age``."""
        with self._lock:
            if self._current():
                assert self._report is not None
                return self._report
        with self._computing:  # a request waiting here gets the report the one before it computed
            with self._lock:
                if self._current():
                    assert self._report is not None
                    return self._report
            return self._compute_and_keep()

    def json(self, *, timelines: bool = False) -> bytes:
        """The last report's JSON (:meth:`RetentionReport.to_json`), serialised once."""
        with self._lock:
            self._read_at[timelines] = self._clock()
        return self._serialised(self.report(), timelines)

    def _read_within(self, period: timedelta, timelines: bool) -> bool:
        with self._lock:
            read = self._read_at.get(timelines)
            return read is not None and self._clock() - read <= period.total_seconds()

    def _serialised(self, report: RetentionReport, timelines: bool) -> bytes:
        with self._lock:
            if report is self._report and timelines in self._json:
                return self._json[timelines]
        body = json.dumps(report.to_json(timelines=timelines)).encode()
        with self._lock:
            if report is self._report:  # not replaced meanwhile by a refresh
                self._json[timelines] = body
        return body

    def _current(self) -> bool:
        return self._report is not None and self._clock() - self._computed_at <= self._max_age

    def _compute_and_keep(self) -> RetentionReport:
        started = self._clock()
        report = self._compute()
        with self._lock:
            self._report, self._computed_at, self._json = report, started, {}
        return report
