"""Unit tests of the retention engine, and the worked examples A-G of
shared/reference/retention-semantics.md section 4.5 (restic's side of each)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from backupd.errors import PolicyError
from backupd.policy import retention
from backupd.policy.retention import Decision, Duration, Item, Plan, Rules, parse_rfc3339, plan, simulate

UTC = UTC
PLUS1 = timezone(timedelta(hours=1))


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def items_at(*times: datetime, size: int = 0) -> list[Item]:
    return [Item(id=f"a{i}", time=t, size=size) for i, t in enumerate(times)]


def kept(result: Plan) -> list[datetime]:
    return [d.item.time for d in result.keep]


def reasons(result: Plan) -> dict[datetime, tuple[str, ...]]:
    return {d.item.time: d.reasons for d in result.keep}


def daily(start: datetime, end: datetime, *, hour: int = 2) -> list[datetime]:
    day, out = start.replace(hour=hour), []
    while day.date() <= end.date():
        out.append(day)
        day += timedelta(days=1)
    return out


# -- Duration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2d", Duration(days=2)),
        ("1y6m", Duration(years=1, months=6)),
        ("13d23h", Duration(days=13, hours=23)),
        ("1y1d1m", Duration(years=1, months=1, days=1)),  # any order (restic policy 26)
        ("1y2m3d3h", Duration(1, 2, 3, 3)),
        ("1d2d", Duration(days=2)),  # a repeated unit overwrites, as in restic
        ("  7d\n", Duration(days=7)),  # restic trims surrounding space
        ("9999y", Duration(years=9999)),
        ("0d", Duration()),
        ("007h", Duration(hours=7)),
    ],
)
def test_duration_parse(text, expected):
    assert Duration.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "d", "7", "7w", "7D", "1.5d", "-1d", "+1d", "1d 2h", "1d-2h", "７d", "1dd", "y1"]
)
def test_duration_parse_refuses_garbage_naming_it(text):
    with pytest.raises(PolicyError) as raised:
        Duration.parse(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize("value", [None, 7, b"7d"])
def test_duration_parse_refuses_non_strings(value):
    with pytest.raises(PolicyError):
        Duration.parse(value)


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (Duration(days=2), "2d"),
        (Duration(years=1, months=6), "1y6m"),
        (Duration(years=1, months=1, days=1), "1y1m1d"),  # restic's canonical order y m d h
        (Duration(hours=36), "36h"),
        (Duration(1, 2, 3, 3), "1y2m3d3h"),
        (Duration(), "0d"),
    ],
)
def test_duration_str_is_canonical_and_round_trips(duration, text):
    assert str(duration) == text
    assert Duration.parse(str(duration)) == duration


@pytest.mark.parametrize(
    ("duration", "anchor", "expected"),
    [
        # Example G: Go's AddDate normalises an overflowing day forward.
        ("1m", utc(2024, 3, 31, 12), utc(2024, 3, 2, 12)),
        ("1m", utc(2023, 3, 31, 12), utc(2023, 3, 3, 12)),
        ("1y", utc(2024, 2, 29, 12), utc(2023, 3, 1, 12)),
        ("1m", utc(2024, 3, 15), utc(2024, 2, 15)),
        ("13m", utc(2024, 1, 31), utc(2022, 12, 31)),  # months overflow into years
        ("2d", utc(2024, 3, 1, 2), utc(2024, 2, 28, 2)),
        ("1m1d", utc(2024, 3, 31), utc(2024, 3, 1)),  # "2024-02-30" = 03-01
        ("25h", utc(2024, 3, 1, 0, 30), utc(2024, 2, 28, 23, 30)),
        ("1y2m3d3h", utc(2016, 1, 18, 12, 2, 3), utc(2014, 11, 15, 9, 2, 3)),
    ],
)
def test_duration_cutoff_is_go_adddate(duration, anchor, expected):
    assert Duration.parse(duration).cutoff(anchor) == expected


def test_duration_cutoff_keeps_the_anchor_offset_and_works_on_its_wall_clock():
    anchor = datetime(2024, 3, 31, 0, 30, tzinfo=PLUS1)  # 2024-03-30 23:30 UTC
    cutoff = Duration.parse("1m").cutoff(anchor)
    # On the +01:00 wall clock: 03-31 minus a month = "02-31" = 03-02; in UTC it would be 03-01.
    assert cutoff == datetime(2024, 3, 2, 0, 30, tzinfo=PLUS1)
    assert cutoff.utcoffset() == timedelta(hours=1)


def test_duration_cutoff_hours_are_absolute_time_across_dst():
    berlin = ZoneInfo("Europe/Berlin")
    anchor = datetime(2024, 3, 31, 4, 0, tzinfo=berlin)  # CEST, 02:00 UTC; the night had 23 hours
    assert Duration(hours=3).cutoff(anchor) == utc(2024, 3, 30, 23)
    assert Duration(days=1).cutoff(anchor) == utc(2024, 3, 30, 3)  # wall clock: 03-30 04:00 CET


@pytest.mark.parametrize(
    ("zone", "anchor_wall", "expected_utc"),
    [
        # Worked by hand through Go's time.Date (offset at the wall time read as UTC, then
        # re-checked at the resulting instant): Go picks differently from Python's fold=0.
        ("Europe/Berlin", (2024, 4, 1, 2, 30), utc(2024, 3, 31, 1, 30)),  # 03-31 02:30 missing
        ("Europe/Berlin", (2024, 10, 28, 2, 30), utc(2024, 10, 27, 1, 30)),  # repeated: 2nd one
        ("America/New_York", (2024, 11, 4, 1, 30), utc(2024, 11, 3, 5, 30)),  # repeated: 1st one
        ("America/New_York", (2024, 3, 11, 2, 30), utc(2024, 3, 10, 6, 30)),  # missing
        ("Europe/London", (2024, 10, 28, 1, 30), utc(2024, 10, 27, 1, 30)),  # offset 0: as is
        ("Europe/London", (2024, 4, 1, 1, 30), utc(2024, 3, 31, 1, 30)),  # missing
    ],
)
def test_duration_cutoff_resolves_dst_gaps_and_repeats_like_go(zone, anchor_wall, expected_utc):
    anchor = datetime(*anchor_wall, tzinfo=ZoneInfo(zone))
    cutoff = Duration(days=1).cutoff(anchor)
    assert cutoff.tzinfo is anchor.tzinfo
    # (compared in UTC: Python never calls a repeated-hour time equal to one in another zone)
    assert cutoff.astimezone(UTC) == expected_utc


def test_duration_cutoff_before_year_one_overflows():
    with pytest.raises(OverflowError):
        Duration.parse("9999y").cutoff(utc(2016, 1, 18))


def test_duration_cutoff_needs_an_aware_anchor():
    with pytest.raises(ValueError):
        Duration(days=1).cutoff(datetime(2024, 1, 1))


# -- Rules ---------------------------------------------------------------------------------


def test_rules_is_empty():
    assert Rules().is_empty()
    assert Rules(max_total_bytes=10).is_empty()  # a size cap keeps nothing
    assert Rules(within=Duration()).is_empty()  # a zero duration is off, as in restic
    assert not Rules(last=-1).is_empty()
    assert not Rules(yearly=1).is_empty()
    assert not Rules(within_weekly=Duration(hours=1)).is_empty()


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        (Rules(), "keep nothing"),
        (Rules(max_total_bytes=1024), "keep nothing"),
        (Rules(last=-2), "-2"),
        (Rules(daily=1, weekly=-5), "weekly"),
        (Rules(daily=1.5), "1.5"),  # type: ignore[arg-type]
        (Rules(daily=True), "True"),  # type: ignore[arg-type]
        (Rules(daily=1, within=Duration(days=-1)), "negative"),
        (Rules(daily=1, within_daily="7d"), "'7d'"),  # type: ignore[arg-type]
        (Rules(daily=1, max_total_bytes=0), "max_total_bytes"),
        (Rules(daily=1, max_total_bytes=-1), "max_total_bytes"),
    ],
)
def test_rules_validate_refuses(rules, named):
    with pytest.raises(PolicyError) as raised:
        rules.validate()
    assert named in str(raised.value)


def test_rules_validate_accepts_unlimited_and_caps():
    Rules(last=-1, hourly=-1, daily=0, max_total_bytes=1).validate()


def test_plan_refuses_an_empty_rule_set_even_without_archives():
    with pytest.raises(PolicyError):
        plan([], Rules())
    with pytest.raises(PolicyError):
        plan(items_at(utc(2024, 1, 1)), Rules(max_total_bytes=10))


# -- worked examples (reference section 4.5) -------------------------------------------------

DOCS_DATASET = [
    *(utc(2025, 4, d, 11) for d in range(21, 26)),
    utc(2025, 4, 25, 23),
    utc(2025, 4, 28, 11),
    utc(2025, 4, 29, 11),
    utc(2025, 5, 1, 11),
    utc(2025, 5, 2, 11),
    utc(2025, 5, 2, 23),
]


def test_example_a1_keep_daily_counts_days_that_have_archives():
    result = plan(items_at(*DOCS_DATASET), Rules(daily=5))
    assert kept(result) == [
        utc(2025, 5, 2, 23), utc(2025, 5, 1, 11), utc(2025, 4, 29, 11), utc(2025, 4, 28, 11), utc(2025, 4, 25, 23)
    ]  # fmt: skip
    assert all(d.reasons == ("daily",) for d in result.keep)


def test_example_a2_keep_within_daily_is_strictly_after_the_cutoff():
    result = plan(items_at(*DOCS_DATASET), Rules(within_daily=Duration.parse("7d")))
    # cutoff = 05-02 23:00 - 7d = 04-25 23:00, which is not *after* the cutoff
    assert kept(result) == [utc(2025, 5, 2, 23), utc(2025, 5, 1, 11), utc(2025, 4, 29, 11), utc(2025, 4, 28, 11)]
    assert all(d.reasons == ("within-daily",) for d in result.keep)


def test_example_b_counters_are_independent():
    times = daily(utc(2024, 1, 1), utc(2024, 3, 15))
    result = plan(items_at(*times), Rules(daily=7, weekly=4))
    assert reasons(result) == {
        utc(2024, 3, 15, 2): ("daily", "weekly"),
        utc(2024, 3, 14, 2): ("daily",),
        utc(2024, 3, 13, 2): ("daily",),
        utc(2024, 3, 12, 2): ("daily",),
        utc(2024, 3, 11, 2): ("daily",),
        utc(2024, 3, 10, 2): ("daily", "weekly"),  # Sunday: newest of ISO week 10
        utc(2024, 3, 9, 2): ("daily",),
        utc(2024, 3, 3, 2): ("weekly",),
        utc(2024, 2, 25, 2): ("weekly",),
    }
    assert len(result.keep) == 9


def test_example_c_oldest_rule():
    times = daily(utc(2023, 6, 15), utc(2024, 3, 10))
    result = plan(items_at(*times), Rules(yearly=3))
    assert reasons(result) == {
        utc(2024, 3, 10, 2): ("yearly",),
        utc(2023, 12, 31, 2): ("yearly",),
        utc(2023, 6, 15, 2): ("oldest yearly",),
    }
    assert kept(plan(items_at(*times), Rules(yearly=2))) == [utc(2024, 3, 10, 2), utc(2023, 12, 31, 2)]


def test_example_d_last_and_daily():
    times = [utc(2024, 5, d, h) for d in range(1, 6) for h in (0, 6, 12, 18)]
    result = plan(items_at(*times), Rules(last=3, daily=3))
    assert reasons(result) == {
        utc(2024, 5, 5, 18): ("last", "daily"),
        utc(2024, 5, 5, 12): ("last",),
        utc(2024, 5, 5, 6): ("last",),
        utc(2024, 5, 4, 18): ("daily",),
        utc(2024, 5, 3, 18): ("daily",),
    }


def test_example_e_within_hangs_off_the_newest_archive_not_now():
    times = daily(utc(2024, 5, 1), utc(2024, 5, 10))
    result = plan(items_at(*times), Rules(within=Duration.parse("2d")), now=utc(2024, 5, 20, 12))
    assert kept(result) == [utc(2024, 5, 10, 2), utc(2024, 5, 9, 2)]  # cutoff 05-08 02:00
    assert all(d.reasons == ("within",) for d in result.keep)


def test_example_f_buckets_use_each_archive_own_offset():
    times = [
        datetime(2024, 3, 9, 12, 0, tzinfo=PLUS1),
        datetime(2024, 3, 10, 23, 30, tzinfo=PLUS1),
        datetime(2024, 3, 11, 0, 30, tzinfo=PLUS1),
    ]
    result = plan(items_at(*times), Rules(daily=2))
    assert kept(result) == [times[2], times[1]]
    # With the policy's time zone set to UTC, 23:30+01 and 00:30+01 fall on one UTC day.
    assert kept(plan(items_at(*times), Rules(daily=2), tz=UTC)) == [times[2], times[0]]


def test_example_g_within_one_month_from_march_31():
    newest = utc(2024, 3, 31, 12)
    times = [newest, utc(2024, 3, 2, 12, 0, 1), utc(2024, 3, 2, 12), utc(2024, 2, 29, 12)]
    result = plan(items_at(*times), Rules(within=Duration.parse("1m")))
    assert kept(result) == [newest, utc(2024, 3, 2, 12, 0, 1)]  # cutoff 03-02 12:00, not 02-29


# -- restic rules in detail ------------------------------------------------------------------


def test_keep_last_keeps_each_of_identical_timestamps():
    same = utc(2024, 1, 1)
    result = plan(items_at(same, same, same, utc(2023, 1, 1)), Rules(last=3))
    assert [d.item.id for d in result.keep] == ["a0", "a1", "a2"]
    assert [d.item.id for d in result.remove] == ["a3"]


def test_equal_times_keep_input_order_newest_first_otherwise():
    same = utc(2024, 1, 1)
    given = [Item("x", same), Item("old", utc(2023, 1, 1)), Item("y", same), Item("new", utc(2025, 1, 1))]
    result = plan(given, Rules(last=-1))
    assert [d.item.id for d in result.decisions] == ["new", "x", "y", "old"]


def test_daily_keeps_the_newest_of_each_day_and_the_oldest_while_slots_remain():
    times = [utc(2024, 1, 2, 10), utc(2024, 1, 2, 8), utc(2024, 1, 1, 10), utc(2024, 1, 1, 8)]
    assert reasons(plan(items_at(*times), Rules(daily=5))) == {
        utc(2024, 1, 2, 10): ("daily",),
        utc(2024, 1, 1, 10): ("daily",),
        utc(2024, 1, 1, 8): ("oldest daily",),
    }
    assert kept(plan(items_at(*times), Rules(daily=2))) == [utc(2024, 1, 2, 10), utc(2024, 1, 1, 10)]


def test_oldest_in_its_own_bucket_is_a_plain_keep():
    times = [utc(2024, 1, 2), utc(2024, 1, 1)]
    assert reasons(plan(items_at(*times), Rules(daily=5))) == {utc(2024, 1, 2): ("daily",), utc(2024, 1, 1): ("daily",)}


def test_unlimited_counts():
    times = [utc(2024, 1, d, h) for d in (1, 2, 3) for h in (1, 2)]
    result = plan(items_at(*times), Rules(daily=-1))
    assert reasons(result) == {
        utc(2024, 1, 3, 2): ("daily",),
        utc(2024, 1, 2, 2): ("daily",),
        utc(2024, 1, 1, 2): ("daily",),
        utc(2024, 1, 1, 1): ("oldest daily",),
    }


def test_weekly_buckets_are_iso_weeks_monday_to_sunday():
    # 2024-12-30 (Mon) .. 2025-01-05 (Sun) is ISO week 2025-W01; 2024-12-29 is 2024-W52.
    times = [utc(2025, 1, 6), utc(2025, 1, 5), utc(2024, 12, 30), utc(2024, 12, 29), utc(2024, 12, 23)]
    result = plan(items_at(*times), Rules(weekly=3))
    assert kept(result) == [utc(2025, 1, 6), utc(2025, 1, 5), utc(2024, 12, 29)]


def test_hourly_monthly_yearly_buckets():
    times = [utc(2024, 2, 1, 10, 30), utc(2024, 2, 1, 10, 5), utc(2024, 2, 1, 9, 59), utc(2024, 1, 31, 9),
             utc(2023, 12, 1)]
    assert kept(plan(items_at(*times), Rules(hourly=3))) == times[0:1] + times[2:4]
    assert kept(plan(items_at(*times), Rules(monthly=2))) == [times[0], times[3]]
    assert kept(plan(items_at(*times), Rules(yearly=1))) == [times[0]]


def test_within_bucket_keeps_the_oldest_only_when_inside_the_window():
    times = [utc(2024, 1, 2, 10), utc(2024, 1, 1, 10), utc(2024, 1, 1, 8)]
    assert reasons(plan(items_at(*times), Rules(within_daily=Duration.parse("7d")))) == {
        utc(2024, 1, 2, 10): ("within-daily",),
        utc(2024, 1, 1, 10): ("within-daily",),
        utc(2024, 1, 1, 8): ("oldest within-daily",),
    }
    assert kept(plan(items_at(*times), Rules(within_daily=Duration.parse("1d1h")))) == times[:2]


def test_reasons_are_listed_in_restic_order():
    times = [utc(2024, 1, 2, 10), utc(2024, 1, 1, 10)]
    rules = Rules(
        last=1, hourly=1, daily=5, weekly=1, monthly=1, yearly=1,
        within=Duration(days=3), within_hourly=Duration(days=3), within_yearly=Duration(days=3),
    )  # fmt: skip
    result = plan(items_at(*times), rules)
    assert result.decisions[0].reasons == (
        "within", "last", "hourly", "daily", "weekly", "monthly", "yearly", "within-hourly", "within-yearly"
    )  # fmt: skip
    assert result.decisions[1].reasons == ("within", "daily", "within-hourly", "oldest within-yearly")


def test_future_archives_do_not_anchor_within():
    now = utc(2024, 5, 9, 12)
    times = [utc(2024, 5, 30), *daily(utc(2024, 5, 1), utc(2024, 5, 9))]
    result = plan(items_at(*times), Rules(within=Duration.parse("2d")), now=now)
    # latest = 05-09 02:00 (the newest before now): cutoff 05-07 02:00
    assert kept(result) == [utc(2024, 5, 30), utc(2024, 5, 9, 2), utc(2024, 5, 8, 2)]
    # without now, the future archive anchors the window
    assert kept(plan(items_at(*times), Rules(within=Duration.parse("2d")))) == [utc(2024, 5, 30)]


def test_an_archive_at_exactly_now_is_not_before_now():
    times = [utc(2024, 5, 10), utc(2024, 5, 9), utc(2024, 5, 8)]
    result = plan(items_at(*times), Rules(within=Duration.parse("1d")), now=utc(2024, 5, 10))
    assert kept(result) == [utc(2024, 5, 10), utc(2024, 5, 9)]  # anchored at 05-09: cutoff 05-08


def test_when_every_archive_is_in_the_future_windows_cover_everything():
    # restic's anchor is then Go's zero time, so every cutoff is before every archive.
    times = [utc(2024, 5, 10), utc(2020, 1, 1)]
    windows = Rules(within=Duration(hours=1), within_yearly=Duration(hours=1))
    result = plan(items_at(*times), windows, now=utc(2019, 1, 1))
    assert reasons(result) == {moment: ("within", "within-yearly") for moment in times}


def test_a_window_reaching_before_year_one_covers_everything():
    times = [utc(2016, 1, 18), utc(1, 1, 2)]
    result = plan(items_at(*times), Rules(within=Duration(years=9999)))
    assert len(result.keep) == 2


def test_mixed_offsets_sort_by_instant_and_bucket_by_own_wall_clock():
    minus5 = timezone(timedelta(hours=-5))
    a = datetime(2024, 1, 2, 1, 0, tzinfo=PLUS1)  # 2024-01-02 00:00 UTC, wall day 01-02
    b = datetime(2024, 1, 1, 18, 0, tzinfo=minus5)  # 2024-01-01 23:00 UTC, wall day 01-01
    c = datetime(2024, 1, 2, 0, 30, tzinfo=PLUS1)  # 2024-01-01 23:30 UTC, wall day 01-02
    result = plan(items_at(b, a, c), Rules(daily=-1))
    assert [d.item.time for d in result.decisions] == [a, c, b]
    # keys 0102, 0102, 0101: c shares a's day; b opens a new one and is the oldest
    assert kept(result) == [a, b]


def test_zoneinfo_archives_are_ordered_by_instant_through_a_repeated_hour():
    new_york = ZoneInfo("America/New_York")
    first = datetime(2024, 11, 3, 1, 45, tzinfo=new_york)  # EDT, 05:45 UTC
    second = datetime(2024, 11, 3, 1, 15, fold=1, tzinfo=new_york)  # EST, 06:15 UTC
    result = plan(items_at(first, second), Rules(last=1))
    assert [d.item.time for d in result.decisions] == [second, first]
    assert kept(result) == [second]


def test_policy_time_zone_buckets_in_that_zone():
    berlin = ZoneInfo("Europe/Berlin")
    # 22:30 UTC on 03-09 is 23:30 in Berlin; 23:30 UTC is already 03-10 00:30 there.
    times = [utc(2024, 3, 9, 23, 30), utc(2024, 3, 9, 22, 30), utc(2024, 3, 9, 12)]
    assert kept(plan(items_at(*times), Rules(daily=2))) == [times[0], times[2]]  # oldest daily
    assert kept(plan(items_at(*times), Rules(daily=2), tz=berlin)) == [times[0], times[1]]


def test_policy_time_zone_moves_the_within_anchor_wall_clock():
    # latest 2024-03-31 23:30 UTC is 04-01 01:30 in Berlin: one month back on that wall clock
    # is 03-01 01:30 CET = 03-01 00:30 UTC; on the UTC wall clock it is 03-02 (02-31) 23:30.
    times = [utc(2024, 3, 31, 23, 30), utc(2024, 3, 2, 12), utc(2024, 3, 1, 12), utc(2024, 2, 29, 12)]
    rules = Rules(within=Duration.parse("1m"))
    assert kept(plan(items_at(*times), rules)) == [times[0]]
    assert kept(plan(items_at(*times), rules, tz=ZoneInfo("Europe/Berlin"))) == times[:3]


# -- backupd additions ---------------------------------------------------------------------


def test_pinned_archives_are_kept_and_use_no_slot():
    given = [
        Item("pinned-new", utc(2024, 1, 3), pinned=True),
        Item("b", utc(2024, 1, 2)),
        Item("c", utc(2024, 1, 1)),
    ]
    result = plan(given, Rules(last=1))
    assert [(d.item.id, d.keep, d.reasons) for d in result.decisions] == [
        ("pinned-new", True, ("pinned",)),
        ("b", True, ("last",)),
        ("c", False, ()),
    ]


def test_a_pinned_archive_is_never_the_oldest_archive_of_the_walk():
    given = [Item("a", utc(2024, 1, 2, 10)), Item("b", utc(2024, 1, 2, 8)), Item("old", utc(2023, 1, 1), pinned=True)]
    result = plan(given, Rules(daily=5))
    assert {d.item.id: d.reasons for d in result.decisions} == {
        "a": ("daily",),
        "b": ("oldest daily",),
        "old": ("pinned",),
    }


def test_a_pinned_archive_does_not_anchor_within():
    given = [Item("pin", utc(2024, 6, 1), pinned=True), *items_at(utc(2024, 1, 10), utc(2024, 1, 8))]
    result = plan(given, Rules(within=Duration(days=1)))
    assert [d.item.id for d in result.keep] == ["pin", "a0"]


def test_pinning_an_old_archive_changes_nothing_else():
    times = daily(utc(2024, 1, 1), utc(2024, 3, 1))
    rules = Rules(daily=7, weekly=4, monthly=3)
    plain = plan(items_at(*times), rules)
    pinned = plan([Item(i.id, i.time, pinned=i.id == "a5") for i in items_at(*times)], rules)
    plain_keep = {d.item.id for d in plain.keep}
    assert {d.item.id for d in pinned.keep} == plain_keep | {"a5"}


def test_all_archives_pinned():
    given = [Item("a", utc(2024, 1, 2), pinned=True), Item("b", utc(2024, 1, 1), pinned=True)]
    result = plan(given, Rules(daily=1))
    assert [d.reasons for d in result.decisions] == [("pinned",), ("pinned",)]


def test_the_newest_archive_is_kept_even_if_the_walk_dropped_it(monkeypatch):
    # restic's rules always keep the newest archive; the guard is there for the day they don't.
    monkeypatch.setattr(retention, "_apply_policy", lambda walk, *_: ([()] * len(walk), True))
    result = plan(items_at(utc(2024, 1, 2), utc(2024, 1, 1)), Rules(daily=1))
    assert [(d.keep, d.reasons) for d in result.decisions] == [(True, ("newest",)), (False, ())]


def test_size_cap_removes_kept_archives_oldest_first():
    given = [Item(f"d{d}", utc(2024, 1, d), size=100) for d in range(1, 6)]
    result = plan(given, Rules(last=-1, max_total_bytes=250))
    assert [(d.item.id, d.keep, d.reasons) for d in result.decisions] == [
        ("d5", True, ("last",)),
        ("d4", True, ("last",)),
        ("d3", False, ("size cap",)),
        ("d2", False, ("size cap",)),
        ("d1", False, ("size cap",)),
    ]


def test_size_cap_at_exactly_the_total_removes_nothing():
    given = [Item(f"d{d}", utc(2024, 1, d), size=100) for d in range(1, 4)]
    assert len(plan(given, Rules(last=-1, max_total_bytes=300)).keep) == 3


def test_size_cap_ignores_archives_the_rules_remove():
    given = [Item(f"d{d}", utc(2024, 1, d), size=100) for d in range(1, 6)]
    result = plan(given, Rules(last=2, max_total_bytes=200))
    assert [d.reasons for d in result.decisions] == [("last",), ("last",), (), (), ()]


def test_size_cap_counts_but_never_removes_pinned_archives():
    given = [
        Item("new", utc(2024, 1, 4), size=100),
        Item("mid", utc(2024, 1, 3), size=100),
        Item("pin", utc(2024, 1, 2), size=100, pinned=True),
        Item("old", utc(2024, 1, 1), size=100),
    ]
    result = plan(given, Rules(last=-1, max_total_bytes=250))
    assert {d.item.id: d.reasons for d in result.decisions} == {
        "new": ("last",),
        "mid": ("size cap",),
        "pin": ("pinned",),
        "old": ("size cap",),
    }


def test_size_cap_never_removes_the_newest_archive():
    given = [Item("new", utc(2024, 1, 2), size=1000), Item("old", utc(2024, 1, 1), size=1)]
    result = plan(given, Rules(last=-1, max_total_bytes=10))
    assert [(d.item.id, d.keep, d.reasons) for d in result.decisions] == [
        ("new", True, ("last",)),
        ("old", False, ("size cap",)),
    ]


def test_empty_group():
    assert plan([], Rules(daily=1)) == Plan(())
    assert plan(iter([]), Rules(daily=1)).keep == ()


def test_plan_accepts_any_iterable_and_partitions_keep_and_remove():
    result = plan((i for i in items_at(utc(2024, 1, 2), utc(2024, 1, 1))), Rules(last=1))
    assert isinstance(result.decisions[0], Decision)
    assert [d.item.id for d in result.keep] == ["a0"]
    assert [d.item.id for d in result.remove] == ["a1"]
    assert set(result.keep) | set(result.remove) == set(result.decisions)


def test_plan_refuses_naive_times():
    with pytest.raises(ValueError, match="naive"):
        plan([Item("x", datetime(2024, 1, 1))], Rules(last=1))
    with pytest.raises(ValueError, match="now"):
        plan(items_at(utc(2024, 1, 1)), Rules(last=1), now=datetime(2024, 1, 1))


def test_decisions_are_plain_frozen_values():
    result = plan(items_at(utc(2024, 1, 1)), Rules(last=1))
    decision = result.decisions[0]
    assert decision == Decision(item=decision.item, keep=True, reasons=("last",))
    assert hash(decision) == hash(Decision(item=decision.item, keep=True, reasons=("last",)))
    with pytest.raises(AttributeError):
        decision.keep = False  # type: ignore[misc]


# -- simulate ------------------------------------------------------------------------------


def test_simulate_output_shape():
    times = [parse_rfc3339(t) for t in ("2024-05-01T02:00:00Z", "2024-05-02T04:00:00+02:00", "2024-05-02T01:00:00Z")]
    out = simulate(times, Rules(daily=1))
    assert out == {
        "keep": [{"time": "2024-05-02T04:00:00+02:00", "reasons": ["daily"]}],
        "remove": [{"time": "2024-05-02T01:00:00Z"}, {"time": "2024-05-01T02:00:00Z"}],
    }
    json.dumps(out)


def test_simulate_keeps_duplicates_as_separate_archives():
    same = parse_rfc3339("2024-05-01T02:00:00Z")
    out = simulate([same, same, same], Rules(last=2))
    assert out == {
        "keep": [{"time": "2024-05-01T02:00:00Z", "reasons": ["last"]}] * 2,
        "remove": [{"time": "2024-05-01T02:00:00Z"}],
    }


def test_simulate_time_zone_and_now():
    times = [parse_rfc3339(t) for t in ("2024-03-09T23:30:00Z", "2024-03-09T22:30:00Z", "2030-01-01T00:00:00Z")]
    out = simulate(times, Rules(daily=2), tz=ZoneInfo("Europe/Berlin"), now=utc(2025, 1, 1))
    assert [k["time"] for k in out["keep"]] == ["2030-01-01T00:00:00Z", "2024-03-09T23:30:00Z"]


@pytest.mark.parametrize(
    ("text", "formatted"),
    [
        ("2024-05-01T02:00:00Z", "2024-05-01T02:00:00Z"),
        ("2024-05-01T02:00:00+00:00", "2024-05-01T02:00:00Z"),
        ("2024-05-01T02:00:00.500000000+05:30", "2024-05-01T02:00:00.5+05:30"),
        ("2024-05-01t02:00:00.123456789z", "2024-05-01T02:00:00.123456Z"),
        ("2024-05-01T02:00:00-09:00", "2024-05-01T02:00:00-09:00"),
    ],
)
def test_simulate_writes_times_in_their_own_offset(text, formatted):
    assert simulate([parse_rfc3339(text)], Rules(last=1))["keep"][0]["time"] == formatted


# -- parse_rfc3339 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T02:00:00Z", utc(2024, 5, 1, 2)),
        ("2024-05-01t02:00:00z", utc(2024, 5, 1, 2)),
        ("2024-05-01T04:00:00+02:00", datetime(2024, 5, 1, 4, tzinfo=timezone(timedelta(hours=2)))),
        ("2024-05-01T04:00:00-05:30", datetime(2024, 5, 1, 4, tzinfo=timezone(-timedelta(hours=5, minutes=30)))),
        ("2024-05-01T02:00:00-00:00", utc(2024, 5, 1, 2)),
        ("2014-08-13T10:20:30.1Z", datetime(2014, 8, 13, 10, 20, 30, 100000, tzinfo=UTC)),
        ("2014-08-13T10:20:30.123456789Z", datetime(2014, 8, 13, 10, 20, 30, 123456, tzinfo=UTC)),
        ("2024-02-29T23:59:59Z", utc(2024, 2, 29, 23, 59, 59)),
    ],
)
def test_parse_rfc3339(text, expected):
    parsed = parse_rfc3339(text)
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2024-05-01",
        "2024-05-01T02:00:00",  # no offset
        "2024-05-01 02:00:00Z",  # space separator
        "2024-05-01T02:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T23:59:60Z",  # leap second: Go refuses it too
        "2023-02-29T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "2024-05-01T02:00:00+24:00",
        "2024-05-01T02:00:00+02:60",
        "2024-05-01T02:00:00+0200",
        "2024-05-01T02:00:00.Z",
        "2024-05-01T02:00:00Z\n",
        " 2024-05-01T02:00:00Z",
        "２024-05-01T02:00:00Z",
        "1714528800",
    ],
)
def test_parse_rfc3339_is_strict_and_names_the_value(text):
    with pytest.raises(PolicyError) as raised:
        parse_rfc3339(text)
    assert repr(text) in str(raised.value)


def test_parse_rfc3339_refuses_non_strings():
    with pytest.raises(PolicyError):
        parse_rfc3339(1714528800)  # type: ignore[arg-type]


def test_the_module_loads_no_database_s3_or_http_client():
    # Besides the import-linter contract (which sees only static imports): what importing the
    # engine really loads, in a fresh interpreter.
    code = ("import json, sys, backupd.policy.retention; "
            "print(json.dumps(sorted(m.partition('.')[0] for m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert "backupd" in loaded
    assert loaded.isdisjoint({"sqlalchemy", "boto3", "botocore", "s3transfer", "httpx", "httpcore", "psycopg"})
