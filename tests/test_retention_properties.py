"""Properties of the retention engine (hypothesis).

Prune frequency: the daemon prunes after every checkpoint, and that must end where a single
prune at the end would. With restic's rules taken exactly, that holds for the count rules and
``within`` measured in days and hours, and it is tested so. Four things break it, each shown by a
unit test at the bottom of this file:

* ``max_total_bytes``: the cap never removes the newest archive, and the newest changes with
  every checkpoint. An early prune may delete an old archive to make room for a big newest one
  that a later rule walk drops anyway; a single late prune would have kept the old one.
* ``within-<bucket>`` rules keep the oldest archive of the group when it is inside the window.
  Earlier prunes delete archives outside the window, so some window archive becomes "the oldest"
  and is kept; a single prune keeps fewer. Pruning often then keeps *more*, never less (tested).
* ``within`` windows of months or years: Go's AddDate normalises overflowing days, so a later
  anchor can give an earlier cutoff (03-31 minus 1m = 03-02, 04-01 minus 1m = 03-01). An
  archive a prune on 03-31 deleted would still be inside the 04-01 window.
* ``within`` in a policy time zone with DST: a day back on the wall clock is 23 or 25 hours,
  and across the repeated hour of a fall-back a later anchor can again give an earlier cutoff.
  (Fixed offsets, each archive's own included, are exact multiples of 24 hours.)

Equal timestamps are also left out of that property: which of several identical archives
survives depends on which of them are still there (they are indistinguishable by time).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.policy.retention import Duration, Item, Plan, Rules, plan

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = datetime(2024, 1, 1, tzinfo=UTC)
FIXED_OFFSETS = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5)),
                 timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=14)),
                 timezone(timedelta(hours=-12))]  # fmt: skip
DST_ZONES = [ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")]
# minutes: two days (hourly buckets), two months (daily/weekly), three years (monthly/yearly)
SPANS = [2 * 24 * 60, 60 * 24 * 60, 3 * 366 * 24 * 60]

counts = st.sampled_from([0, 0, 0, 1, 2, 3, 5, -1])


def durations(*, calendar: bool) -> st.SearchStrategy[Duration | None]:
    small = st.integers(0, 3)
    return st.one_of(
        st.none(),
        st.builds(
            Duration,
            years=st.integers(0, 1) if calendar else st.just(0),
            months=small if calendar else st.just(0),
            days=st.integers(0, 40),
            hours=st.integers(0, 48),
        ),
    )


def rule_sets(*, calendar: bool = True, windows: bool = True, buckets: bool = True, cap: bool = True):
    within = durations(calendar=calendar) if windows else st.none()
    bucket = durations(calendar=calendar) if buckets else st.none()
    return st.builds(
        Rules,
        last=counts, hourly=counts, daily=counts, weekly=counts, monthly=counts, yearly=counts,
        within=within,
        within_hourly=bucket, within_daily=bucket, within_weekly=bucket, within_monthly=bucket,
        within_yearly=bucket,
        max_total_bytes=st.one_of(st.none(), st.integers(1, 400)) if cap else st.none(),
    ).filter(lambda rules: not rules.is_empty())  # fmt: skip


@st.composite
def groups(draw, *, distinct: bool = False, mixed_offsets: bool = True) -> list[Item]:
    """Archives in arrival (time) order; equal timestamps arrive in list order."""
    span = draw(st.sampled_from(SPANS))
    minutes = sorted(draw(st.lists(st.integers(0, span), min_size=1, max_size=30, unique=distinct)))
    out = []
    for index, minute in enumerate(minutes):
        zone = draw(st.sampled_from(FIXED_OFFSETS)) if mixed_offsets else UTC
        out.append(
            Item(
                id=f"a{index}",
                time=(BASE + timedelta(minutes=minute)).astimezone(zone),
                size=draw(st.integers(0, 100)),
                pinned=draw(st.integers(0, 9)) == 0,
            )
        )
    return out


zones = st.sampled_from([None, None, UTC, timezone(timedelta(hours=5, minutes=30)), *DST_ZONES])
nows = st.one_of(st.none(), st.integers(-60, 4 * 366 * 24 * 60).map(lambda m: BASE + timedelta(minutes=m)))


def summary(result: Plan) -> list[tuple[str, bool, tuple[str, ...]]]:
    return [(d.item.id, d.keep, d.reasons) for d in result.decisions]


def prune_as_they_arrive(items: list[Item], rules: Rules, tz: tzinfo | None) -> set[str]:
    present: list[Item] = []
    for item in items:
        present.append(item)
        removed = {d.item.id for d in plan(present, rules, tz=tz).remove}
        present = [i for i in present if i.id not in removed]
    return {i.id for i in present}


def kept_ids(result: Plan) -> set[str]:
    return {d.item.id for d in result.keep}


# -- prune frequency -------------------------------------------------------------------------


@SETTINGS
@given(
    groups(distinct=True),
    rule_sets(calendar=False, buckets=False, cap=False),
    st.sampled_from([None, UTC, timezone(timedelta(hours=-5))]),
)
def test_pruning_after_every_archive_ends_where_pruning_once_does(items, rules, tz):
    assert prune_as_they_arrive(items, rules, tz) == kept_ids(plan(items, rules, tz=tz))


@SETTINGS
@given(groups(distinct=True), rule_sets(calendar=False, buckets=False, windows=False, cap=False), zones)
def test_count_rules_do_not_depend_on_prune_frequency_in_any_zone(items, rules, tz):
    assert prune_as_they_arrive(items, rules, tz) == kept_ids(plan(items, rules, tz=tz))


@SETTINGS
@given(
    groups(distinct=True),
    rule_sets(calendar=False, cap=False),
    st.sampled_from([None, UTC, timezone(timedelta(hours=-5))]),
)
def test_within_bucket_rules_pruned_often_keep_a_superset(items, rules, tz):
    """The ``oldest within-<bucket>`` clause makes frequent pruning keep more (module doc)."""
    assert prune_as_they_arrive(items, rules, tz) >= kept_ids(plan(items, rules, tz=tz))


# -- invariants ------------------------------------------------------------------------------


@SETTINGS
@given(groups(), rule_sets(), zones, nows)
def test_the_newest_archive_is_always_kept(items, rules, tz, now):
    result = plan(items, rules, tz=tz, now=now)
    assert result.decisions[0].keep
    newest = max(i.time for i in items)
    assert result.decisions[0].item.time == newest


@SETTINGS
@given(groups(), rule_sets(), zones, nows)
def test_pinned_archives_are_always_kept(items, rules, tz, now):
    for decision in plan(items, rules, tz=tz, now=now).decisions:
        if decision.item.pinned:
            assert decision.keep
            assert decision.reasons == ("pinned",)


@SETTINGS
@given(groups(distinct=True), rule_sets(), zones, nows, st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_input_order(items, rules, tz, now, random):
    shuffled = list(items)
    random.shuffle(shuffled)
    assert summary(plan(shuffled, rules, tz=tz, now=now)) == summary(plan(items, rules, tz=tz, now=now))


@SETTINGS
@given(groups(), rule_sets(), zones, nows)
def test_plan_is_deterministic(items, rules, tz, now):
    first = plan(items, rules, tz=tz, now=now)
    again = plan(list(items), rules, tz=tz, now=now)
    assert first == again
    assert summary(first) == summary(again)


@SETTINGS
@given(groups(), rule_sets(), zones, nows)
def test_every_archive_gets_one_decision_newest_first(items, rules, tz, now):
    result = plan(items, rules, tz=tz, now=now)
    assert Counter(d.item.id for d in result.decisions) == Counter(i.id for i in items)
    instants = [d.item.time for d in result.decisions]
    assert all(a >= b for a, b in zip(instants, instants[1:], strict=False))
    assert len(result.keep) + len(result.remove) == len(items)
    assert all(d.reasons for d in result.keep)
    assert all(d.reasons in ((), ("size cap",)) for d in result.remove)


@SETTINGS
@given(groups(), rule_sets(), zones)
def test_the_size_cap_holds_unless_only_pinned_and_newest_remain(items, rules, tz):
    result = plan(items, rules, tz=tz)
    if rules.max_total_bytes is None:
        assert all(d.reasons != ("size cap",) for d in result.decisions)
        return
    total = sum(d.item.size for d in result.keep)
    removable = [d for d in result.keep[1:] if not d.item.pinned] if result.keep else []
    assert total <= rules.max_total_bytes or not any(d.item.size for d in removable)


# -- against a literal port of restic's ApplyPolicy ------------------------------------------


def restic_apply_policy(items: list[Item], rules: Rules, tz: tzinfo | None, now: datetime | None) -> list[tuple]:
    """ApplyPolicy line by line, slow and plain, on the unpinned archives."""
    walk = sorted((i for i in items if not i.pinned), key=lambda i: i.time, reverse=True)

    def wall(t: datetime) -> datetime:
        return t if tz is None else t.astimezone(tz)

    keys = {
        "last": lambda t, nr: nr,
        "hourly": lambda t, nr: (t.year, t.month, t.day, t.hour),
        "daily": lambda t, nr: (t.year, t.month, t.day),
        "weekly": lambda t, nr: t.isocalendar()[:2],
        "monthly": lambda t, nr: (t.year, t.month),
        "yearly": lambda t, nr: t.year,
    }
    earlier = [i.time for i in walk if now is None or i.time < now]
    latest = wall(max(earlier)) if earlier else None

    def inside(t: datetime, duration: Duration) -> bool:
        if latest is None:
            return True
        try:
            return t > duration.cutoff(latest)
        except OverflowError:
            return True

    counters = {name: getattr(rules, name) for name in keys}
    last_key: dict[str, object] = {}
    window_last: dict[str, object] = {}
    out = []
    for nr, item in enumerate(walk):
        t, matched = wall(item.time), []
        oldest = nr == len(walk) - 1
        if rules.within and any(vars_of(rules.within)) and inside(item.time, rules.within):
            matched.append("within")
        for name, key_of in keys.items():
            if counters[name] > 0 or counters[name] == -1:
                key = key_of(t, nr)
                if key != last_key.get(name, -1) or oldest:
                    matched.append(("oldest " if key == last_key.get(name, -1) else "") + name)
                    last_key[name] = key
                    if counters[name] > 0:
                        counters[name] -= 1
        for bucket in ("hourly", "daily", "weekly", "monthly", "yearly"):
            duration = getattr(rules, f"within_{bucket}")
            if duration and any(vars_of(duration)) and inside(item.time, duration):
                key = keys[bucket](t, nr)
                if key != window_last.get(bucket, -1) or oldest:
                    same = key == window_last.get(bucket, -1)
                    matched.append(("oldest " if same else "") + f"within-{bucket}")
                    window_last[bucket] = key
        out.append((item.id, bool(matched), tuple(matched)))
    return out


def vars_of(duration: Duration) -> tuple[int, ...]:
    return (duration.years, duration.months, duration.days, duration.hours)


@SETTINGS
@given(groups(), rule_sets(cap=False), zones, nows)
def test_matches_a_literal_port_of_restic_apply_policy(items, rules, tz, now):
    result = [entry for entry in summary(plan(items, rules, tz=tz, now=now)) if entry[2] != ("pinned",)]
    assert result == restic_apply_policy(items, rules, tz, now)


# -- where prune frequency does matter (see the module docstring) -----------------------------


def test_prune_frequency_matters_for_the_size_cap():
    items = [
        Item("a0", datetime(2024, 1, 1, 0, 0, tzinfo=UTC), size=0),
        Item("a1", datetime(2024, 1, 1, 0, 1, tzinfo=UTC), size=2),
        Item("a2", datetime(2024, 1, 1, 0, 2, tzinfo=UTC), size=0),
    ]
    rules = Rules(yearly=2, max_total_bytes=1)
    # While a1 is the newest it cannot go, so a0 goes; later a1 is dropped by the rules anyway.
    assert prune_as_they_arrive(items, rules, None) == {"a2"}
    assert kept_ids(plan(items, rules)) == {"a2", "a0"}


def test_prune_frequency_matters_for_the_oldest_within_bucket_clause():
    times = [datetime(2024, 1, 1, 0, m, tzinfo=UTC) for m in range(3)] + [
        datetime(2024, 1, 1, 19, 21, tzinfo=UTC),
        datetime(2024, 1, 1, 20, 20, tzinfo=UTC),
    ]
    items = [Item(f"a{i}", t) for i, t in enumerate(times)]
    rules = Rules(within_yearly=Duration(hours=1))
    # Once 19:21 is the only archive left it is the oldest of the group, and stays kept.
    assert prune_as_they_arrive(items, rules, None) == {"a3", "a4"}
    assert kept_ids(plan(items, rules)) == {"a4"}


def test_prune_frequency_matters_for_month_windows():
    items = [
        Item("x", datetime(2024, 3, 2, 12, tzinfo=UTC)),
        Item("y", datetime(2024, 3, 31, 12, tzinfo=UTC)),
        Item("z", datetime(2024, 4, 1, 12, tzinfo=UTC)),
    ]
    rules = Rules(within=Duration(months=1))
    # From 03-31 the cutoff is 03-02 12:00 (x is out); from 04-01 it is 03-01 12:00 (x is in).
    assert prune_as_they_arrive(items, rules, None) == {"y", "z"}
    assert kept_ids(plan(items, rules)) == {"x", "y", "z"}


def test_prune_frequency_matters_for_day_windows_across_a_dst_fall_back():
    berlin = ZoneInfo("Europe/Berlin")
    items = [
        Item("x", datetime(2024, 10, 26, 0, 20, tzinfo=UTC)),
        Item("y", datetime(2024, 10, 27, 0, 30, tzinfo=UTC)),  # 02:30 CEST
        Item("z", datetime(2024, 10, 27, 1, 10, tzinfo=UTC)),  # 02:10 CET, an hour later
    ]
    rules = Rules(within=Duration(days=1))
    # From y: 10-26 02:30 CEST = 00:30 UTC (x is out); from z: 10-26 02:10 CEST = 00:10 UTC.
    assert prune_as_they_arrive(items, rules, berlin) == {"y", "z"}
    assert kept_ids(plan(items, rules, tz=berlin)) == {"x", "y", "z"}
    # With a fixed offset, a day is 24 hours and frequency does not matter.
    assert prune_as_they_arrive(items, rules, None) == kept_ids(plan(items, rules)) == {"y", "z"}
