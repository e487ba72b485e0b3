"""Schedules: 5-field cron expressions, ``@every <duration>`` and the ``@hourly``-style macros.

A :class:`Schedule` answers the two questions the daemon and the report ask -- when is the next
run after a moment, and was a run missed between two moments -- and builds the APScheduler
trigger for it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EVERY = re.compile(r"^@every\s+((?:\d+(?:ms|s|m|h))+)$")
_EVERY_PART = re.compile(r"(\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_MAX_EVERY_SECONDS = 366 * 24 * 3600


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_days(field: str) -> str:
    """Translate cron's day-of-week numbers (0 or 7 = Sunday) into names.

    APScheduler 3 numbers days from Monday = 0, so ``from_crontab("0 9 * * 1-5")`` would fire
    Tuesday to Saturday. Names mean the same to both.
    """
    if field == "*" or re.search(r"[a-zA-Z]", field):
        return field
    days: set[int] = set()
    for item in field.split(","):
        part, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if part == "*":
            first, last = 0, 6
        elif "-" in part:
            a, b = part.split("-", 1)
            first, last = int(a), int(b)
        else:
            first = int(part)
            last = 6 if step_text else first
        if not (0 <= first <= 7 and 0 <= last <= 7) or first > last or step < 1:
            raise ValueError(f"invalid day-of-week field {field!r}")
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_DAY_NAMES[d] for d in sorted(days))


def _crontab(expr: str) -> str:
    fields = expr.split()
    fields[4] = _cron_days(fields[4])
    return " ".join(fields)


@functools.lru_cache(maxsize=256)
def _cron_trigger(cron: str, tz: tzinfo) -> CronTrigger:
    # Parsing a crontab costs more than asking it for a fire time; the report asks a few times per
    # workload, the daemon at every job. A CronTrigger's answers depend only on these two.
    return CronTrigger.from_crontab(cron, timezone=tz)


@dataclass(frozen=True)
class Schedule:
    text: str
    cron: str | None = None
    interval: timedelta | None = None
    tz: tzinfo = ZoneInfo("UTC")

    @classmethod
    def parse(cls, text: str, tz: tzinfo | str = "UTC") -> Schedule:
        """Raises ValueError with a message naming the bad value."""
        zone = ZoneInfo(tz) if isinstance(tz, str) else tz
        text = " ".join(str(text).split())
        if m := _EVERY.match(text):
            seconds = sum(int(n) * _UNITS[u] for n, u in _EVERY_PART.findall(m.group(1)))
            if not 1 <= seconds <= _MAX_EVERY_SECONDS:
                raise ValueError(f"@every interval must be between 1s and 8760h (a year), got {text[:40]!r}")
            return cls(text, interval=timedelta(seconds=seconds), tz=zone)
        cron = _MACROS.get(text, text)
        if len(cron.split()) != 5:
            raise ValueError(
                f"expected a 5-field cron expression, a macro such as @hourly, or '@every 30s'; got {text!r}"
            )
        try:
            cron = _crontab(cron)
            CronTrigger.from_crontab(cron, timezone=zone)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {text!r}: {exc}") from None
        return cls(text, cron=cron, tz=zone)

    def trigger(self, start: datetime | None = None) -> CronTrigger | IntervalTrigger:
        if self.interval is not None:
            return IntervalTrigger(seconds=self.interval.total_seconds(), start_date=start, timezone=self.tz)
        assert self.cron is not None
        return _cron_trigger(self.cron, self.tz)

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment``."""
        if self.interval is not None:
            return moment + self.interval
        fire = self.trigger().get_next_fire_time(None, moment + timedelta(microseconds=1))
        assert fire is not None
        return fire

    def missed(self, last_run: datetime | None, now: datetime) -> bool:
        """Whether a run was due after ``last_run`` and not later than ``now``.

        A policy that never ran counts as missed, so a new policy runs once at start-up.
        """
        if last_run is None:
            return True
        return self.next_after(last_run) <= now

    @property
    def period(self) -> timedelta:
        """The nominal spacing between runs (for "late" in reports and alerts)."""
        if self.interval is not None:
            return self.interval
        t = self.trigger()
        a = t.get_next_fire_time(None, datetime(2025, 1, 1, tzinfo=self.tz))
        b = t.get_next_fire_time(a, a + timedelta(microseconds=1))
        assert a is not None and b is not None
        return b - a
