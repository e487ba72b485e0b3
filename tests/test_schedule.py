from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from backupd.policy.schedule import Schedule

FRIDAY = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)  # a Friday


@pytest.mark.parametrize(
    ("expr", "weekdays"),
    [
        ("0 9 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 9 * * 0", ["Sun"]),
        ("0 9 * * 7", ["Sun"]),
        ("0 9 * * 1,3,5", ["Mon", "Wed", "Fri"]),
        ("0 9 * * */2", ["Sun", "Tue", "Thu", "Sat"]),
        ("0 9 * * 5-7", ["Fri", "Sat", "Sun"]),
        ("0 9 * * mon-fri", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("@weekly", ["Sun"]),
    ],
)
def test_day_of_week_means_what_cron_means(expr: str, weekdays: list[str]) -> None:
    schedule = Schedule.parse(expr)
    seen = set()
    t = FRIDAY
    for _ in range(14):
        t = schedule.next_after(t)
        seen.add(t.strftime("%a"))
    assert seen == set(weekdays)


def test_every_and_missed() -> None:
    s = Schedule.parse("@every 90s")
    assert s.interval == timedelta(seconds=90) and s.period == timedelta(seconds=90)
    assert s.missed(None, FRIDAY)
    assert not s.missed(FRIDAY, FRIDAY + timedelta(seconds=89))
    assert s.missed(FRIDAY, FRIDAY + timedelta(seconds=90))
    hourly = Schedule.parse("0 * * * *")
    assert hourly.next_after(FRIDAY) == FRIDAY + timedelta(hours=1)
    assert hourly.period == timedelta(hours=1)


@pytest.mark.parametrize("bad", ["* * * *", "0 9 * * 8", "0 9 * * 5-2", "61 * * * *", "@every 0s", "@yearlyish"])
def test_bad_schedules(bad: str) -> None:
    with pytest.raises(ValueError):
        Schedule.parse(bad)


@pytest.mark.parametrize("never", ["0 0 30 2 *", "0 0 31 4 *", "0 0 31 6 *", "30 12 31 2,4,6,9,11 *",
                                   "0 0 30,31 2 *", "* * 31 11 mon-fri", "0 0 30 2 1"])
def test_a_schedule_that_never_fires_is_refused_naming_it(never: str) -> None:
    with pytest.raises(ValueError, match=f"cron expression '{re.escape(never)}' never fires"):
        Schedule.parse(never)


@pytest.mark.parametrize(("rare", "after", "fires"), [
    # day of month AND day of week (APScheduler's rule): a Monday the 29th of February; 2100 is
    # not a leap year, so this is the longest gap any schedule has: 40 years
    ("0 0 29 2 1", datetime(2072, 3, 1, tzinfo=UTC), datetime(2112, 2, 29, tzinfo=UTC)),
    ("0 0 29 2 *", datetime(2097, 3, 1, tzinfo=UTC), datetime(2104, 2, 29, tzinfo=UTC)),
    ("0 0 31 * fri", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 7, 31, tzinfo=UTC)),
])
def test_rare_schedules_are_accepted_and_fire_when_due(rare: str, after: datetime, fires: datetime) -> None:
    assert Schedule.parse(rare).next_after(after) == fires


def test_a_schedule_that_never_fires_does_not_crash_or_spin_at_runtime() -> None:
    # parse() refuses it; one built another way answers with an error instead of walking to year 9999
    never = Schedule("0 0 30 2 *", cron="0 0 30 2 *")
    with pytest.raises(ValueError, match="never fires"):
        never.next_after(FRIDAY)
    with pytest.raises(ValueError, match="never fires"):
        _ = never.period
