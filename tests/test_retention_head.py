"""``retention.plan_head``: a group's newest archives decide the plan of the whole group when
every rule stops before the oldest of them -- the report relies on it to tell what a prune of
millions of archives does from the few the rules look at."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import event, given, settings
from hypothesis import strategies as st

from backupd.policy.retention import Duration, Item, Rules, plan, plan_head
from tests.test_retention_properties import SETTINGS, groups, nows, rule_sets, zones

# Rules a short head can decide as often as not: small counts, short windows (the general rule
# sets, -1 and long windows included, run too).
short_counts = st.sampled_from([0, 0, 0, 1, 2, 3])
short_window = st.one_of(st.none(), st.none(), st.builds(Duration, hours=st.integers(0, 72)))
short_rules = st.builds(
    Rules, last=short_counts, hourly=short_counts, daily=short_counts, weekly=short_counts, monthly=short_counts,
    yearly=short_counts, within=short_window, within_hourly=short_window, within_daily=short_window,
    max_total_bytes=st.one_of(st.none(), st.integers(1, 400)),
).filter(lambda rules: not rules.is_empty())


@st.composite
def long_groups(draw) -> list[Item]:
    """20 to 60 archives (ties, pinned ones, mixed offsets): long enough for a head to be short."""
    items = draw(groups())
    while len(items) < 20:
        more = draw(groups())
        items += [Item(f"{i.id}-{len(items)}", i.time, i.size, i.pinned) for i in more]
    return sorted(items, key=lambda i: i.time)  # stable: ties keep their arrival order


@settings(SETTINGS, max_examples=500)
@given(long_groups(), st.one_of(short_rules, rule_sets()), zones, nows, st.integers(0, 15), st.booleans())
def test_a_decided_head_plans_its_archives_as_the_whole_group_does(items, rules, tz, now, cut, stand_in):
    whole = plan(items, rules, tz=tz, now=now)
    decided = {d.item.id: (d.keep, d.reasons) for d in whole.decisions}
    unpinned = [d.item for d in whole.decisions if not d.item.pinned]  # newest first
    if cut >= len(unpinned):
        return
    boundary = unpinned[cut].time  # the head: every unpinned archive at or after it, ties included
    older = [i for i in items if not i.pinned and i.time < boundary]
    if not older:
        return
    old_pinned = [i for i in items if i.pinned and i.time < boundary]
    head = [i for i in items if i.time >= boundary]  # input order kept: ties are ordered by it
    if stand_in and old_pinned:
        head.append(Item("stand-in", min(i.time for i in items) - timedelta(days=1),
                         sum(i.size for i in old_pinned), pinned=True))
    else:
        head += old_pinned
    result = plan_head(head, rules, tz=tz, now=now)
    event("decided" if result is not None else "needs more archives")
    if result is None:
        return
    assert {d.item.id: (d.keep, d.reasons) for d in result.decisions if d.item.id != "stand-in"} \
        == {i.id: decided[i.id] for i in head if i.id != "stand-in"}
    assert all(decided[i.id] == (False, ()) for i in older)  # every older unpinned archive goes


def _hourly(n: int, **kw: object) -> list[Item]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return [Item(f"a{i}", t0 + timedelta(hours=i), 10, **kw) for i in range(n)]  # type: ignore[arg-type]


def test_short_rules_are_decided_by_the_newest_archives() -> None:
    items = _hourly(1000)
    rules = Rules(last=3, daily=2, within=Duration(hours=5))
    head = plan_head(items[-30:], rules)
    assert head is not None
    assert [d.item.id for d in head.keep] == [d.item.id for d in plan(items, rules).keep]


def test_rules_reaching_the_oldest_given_archive_need_more() -> None:
    items = _hourly(1000)
    assert plan_head(items[-30:], Rules(last=-1)) is None  # unlimited: every archive counts
    assert plan_head(items[-30:], Rules(last=30)) is not None  # exactly used up: decided
    assert plan_head(items[-30:], Rules(last=31)) is None
    assert plan_head(items[-30:], Rules(daily=3)) is None  # 30 hours hold only two days
    assert plan_head(items[-30:], Rules(within=Duration(days=2))) is None
    assert plan_head(items[-30:], Rules(within_daily=Duration(hours=10))) is not None
    assert plan_head([], Rules(last=1)) is None
