from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backupd.schedule import Schedule

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
