"""Schedules: 5-field cron expressions, ``@every <duration>`` and the ``@hourly``-style macros.

A :class:`Schedule` answers the two questions the daemon and the report ask -- when is the next
run after a moment, and was a run missed between two moments -- and builds the APScheduler
trigger for it.

A cron expression that can never fire (``0 0 30 2 *``, ``0 0 31 4 *``) is refused by
:meth:`Schedule.parse`. Day of month and day of week are combined with AND, as APScheduler does
(Vixie cron would OR them), so ``0 0 29 2 1`` fires on a Monday the 29th of February only: the
rarest firing five-field schedules, at most 40 years apart (2072 -> 2112, across 2100, which is
not a leap year). Every other combination fires more often, so a search bounded by
:data:`HORIZON` decides "never" exactly, in about a millisecond.
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

#: longer than the longest gap between two fire times of any schedule that fires at all
#: (40 years: see the module docstring)
HORIZON = timedelta(days=41 * 366)
#: where the never-fires check starts looking: a fixed moment, so that parsing stays pure
_REFERENCE = datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC"))


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
        schedule = cls(text, cron=cron, tz=zone)
        if schedule._first_after(_REFERENCE) is None:
            raise ValueError(f"cron expression {text!r} never fires: no date of any year matches it")
        return schedule

    def trigger(self, start: datetime | None = None) -> CronTrigger | IntervalTrigger:
        if self.interval is not None:
            return IntervalTrigger(seconds=self.interval.total_seconds(), start_date=start, timezone=self.tz)
        assert self.cron is not None
        return _cron_trigger(self.cron, self.tz)

    def _first_after(self, moment: datetime) -> datetime | None:
        """The first cron fire time strictly after ``moment`` within :data:`HORIZON`, else None.

        Bounded: without an end date APScheduler walks every year up to 9999 before it gives up.
        """
        assert self.cron is not None
        minute, hour, day, month, day_of_week = self.cron.split()
        start = moment + timedelta(microseconds=1)
        trigger = CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week,
                              timezone=self.tz, end_date=start + HORIZON)
        return trigger.get_next_fire_time(None, start)

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment``."""
        if self.interval is not None:
            return moment + self.interval
        fire = self._first_after(moment)
        if fire is None:  # parse() refuses such schedules: only a Schedule built by hand gets here
            raise ValueError(f"schedule {self.text!r} never fires")
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
        a = self.next_after(datetime(2025, 1, 1, tzinfo=self.tz) - timedelta(microseconds=1))
        return self.next_after(a) - a
