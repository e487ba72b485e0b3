"""The retention engine: which archives of one workload a policy keeps, and why. Pure.

Archives and rules in, a plan with reasons out: no clock, no IO, no catalog. The rules are
restic's ``forget`` rules, reproduced exactly (``ApplyPolicy`` in restic's
``internal/data/snapshot_policy.go``; restic's own golden tests run against this module):

* the group is sorted newest first (stable: equal times keep their input order);
* ``last``/``hourly``/``daily``/``weekly``/``monthly``/``yearly`` are independent counters. Each
  walks the whole group and keeps an archive whenever its bucket key differs from the previous
  archive's, while the counter is above 0 (or -1, unlimited). An archive kept by one rule still
  uses up a slot of every other rule whose bucket it opens;
* a rule that still has slots when the walk reaches the oldest archive keeps it too (reason
  ``oldest <rule>``), so a young group keeps its whole history;
* ``within`` keeps every archive strictly after ``cutoff(latest)``; ``within-<bucket>`` keeps one
  archive per bucket inside that window (and the oldest archive, if inside);
* ``latest`` is the newest archive time strictly before ``now`` (simply the newest when ``now``
  is None): windows hang off the newest archive, not off the clock, so a dead schedule never
  makes ``within`` delete everything.

Bucket keys are wall-clock fields: in each archive's own recorded UTC offset when ``tz`` is None
(restic's behaviour), in ``tz`` when the policy names a time zone.

backupd adds three things on top, in this order:

1. **pinned** archives are always kept and are invisible to the rules: they use no slot, are
   never "the oldest archive" and never the ``within`` anchor, so pinning or unpinning an old
   archive cannot change what happens to the others;
2. the **newest** archive of the group is never removed (restic's rules always keep it anyway;
   this is the guarantee, not a behaviour change);
3. ``max_total_bytes``: when the kept archives (pinned ones included) add up to more than the
   cap, kept unpinned archives are removed oldest first until the total fits. Pinned archives
   and the newest archive are never removed, so the total can stay above the cap.

Over 500 lines on purpose: this docstring is the rule set, and the port keeps restic's
structure (bucket keys, ``ApplyPolicy``, the ``within`` variants) in one file so that it can
be read side by side with ``snapshot_policy.go``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from functools import cached_property
from operator import attrgetter
from typing import NamedTuple

from backupd.errors import PolicyError

__all__ = [
    "Decision",
    "Duration",
    "Item",
    "Plan",
    "Rules",
    "parse_rfc3339",
    "plan",
    "plan_head",
    "simulate",
]


# -- durations ----------------------------------------------------------------------------

_DURATION = re.compile(r"(?:[0-9]+[ymdh])+")
_DURATION_PART = re.compile(r"([0-9]+)([ymdh])")
_UNIT_FIELD = {"y": "years", "m": "months", "d": "days", "h": "hours"}

_US_PER_HOUR = 3_600_000_000
_US_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class Duration:
    """A restic duration, ``NyNmNdNh``: years, **months** (``m``), days, hours.

    Units may come in any order; a repeated unit overwrites the earlier value, as in restic.
    A zero duration (``0d``) is a rule that is off, as in restic.
    """

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``"7d"``, ``"1y6m"``, ``"13d23h"``...

        Raises `PolicyError` naming the value for an empty string, a negative number, a missing
        or unknown unit, or anything else that is not a sequence of ``<digits><unit>``.
        """
        if not isinstance(text, str):
            raise PolicyError(f"invalid duration {text!r}: expected a string such as '7d' or '1y6m'")
        stripped = text.strip()
        if not _DURATION.fullmatch(stripped):
            raise PolicyError(
                f"invalid duration {text!r}: expected numbers with units y (years), m (months), "
                "d (days), h (hours), e.g. '7d', '1y6m' or '36h'"
            )
        values = {_UNIT_FIELD[unit]: int(number) for number, unit in _DURATION_PART.findall(stripped)}
        return cls(**values)

    def cutoff(self, anchor: datetime) -> datetime:
        """The start of the window of this length that ends at ``anchor`` (exclusive).

        Exactly Go's ``anchor.AddDate(-years, -months, -days).Add(-hours)``: the calendar part
        is applied to the wall clock in ``anchor``'s zone and an overflowing day rolls forward
        (2024-03-31 minus 1m is "2024-02-31", i.e. 2024-03-02); the hours are absolute time.
        The result is in ``anchor``'s zone. Raises ``OverflowError`` when the cutoff falls
        before year 1 (e.g. ``9999y``): every representable time is then inside the window.
        """
        if anchor.utcoffset() is None:
            raise ValueError(f"anchor must be timezone-aware, got {anchor!r}")
        us = _cutoff_us(anchor, self)
        if us is None:
            raise OverflowError(f"{self} before {anchor.isoformat()} is before year 1")
        try:
            return (_EPOCH + timedelta(microseconds=us)).astimezone(anchor.tzinfo)
        except OverflowError:
            raise OverflowError(f"{self} before {anchor.isoformat()} is before year 1") from None

    def __str__(self) -> str:
        text = "".join(
            f"{value}{unit}"
            for value, unit in ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h"))
            if value
        )
        return text or "0d"


def _active(duration: Duration | None) -> bool:
    return duration is not None and bool(duration.years or duration.months or duration.days or duration.hours)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, for any year (even before 1)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _offset_us_at(instant_us: int, zone: tzinfo) -> int | None:
    """``zone``'s UTC offset at an instant, in microseconds; None outside datetime's range."""
    offset: timedelta | None
    if isinstance(zone, timezone):
        offset = zone.utcoffset(None)
    else:
        try:
            offset = (_EPOCH + timedelta(microseconds=instant_us)).astimezone(zone).utcoffset()
        except OverflowError:
            return None
    if offset is None:
        raise ValueError(f"time zone {zone!r} has no UTC offset")
    return offset // timedelta(microseconds=1)


def _cutoff_us(anchor: datetime, duration: Duration) -> int | None:
    """Go's ``AddDate(-y, -m, -d).Add(-h)`` as microseconds since the epoch; None before year 1."""
    month0 = anchor.month - 1 - duration.months
    year = anchor.year - duration.years + month0 // 12
    days = _days_from_civil(year, month0 % 12 + 1, 1) + anchor.day - 1 - duration.days
    wall_us = (
        days * _US_PER_DAY
        + (anchor.hour * 3600 + anchor.minute * 60 + anchor.second) * 1_000_000
        + anchor.microsecond
    )
    # Go's time.Date resolves a local wall time to an instant like this: take the offset in
    # force at the wall time read as UTC; unless that offset is 0, check that the instant it
    # gives still has that offset, and if not take the offset in force at that instant.
    # Python's fold picks differently in gaps or repeats depending on the zone's sign, so
    # mirror Go step by step.
    zone = anchor.tzinfo
    if zone is None:
        raise ValueError(f"anchor must be timezone-aware, got {anchor!r}")
    offset = _offset_us_at(wall_us, zone)
    if offset is None:
        return None
    if offset:
        second = _offset_us_at(wall_us - offset, zone)
        if second is None:
            return None
        offset = second
    utc_us = wall_us - offset
    utc_us -= duration.hours * _US_PER_HOUR
    return utc_us if utc_us >= _MIN_US else None


# -- rules ---------------------------------------------------------------------------------

_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_WINDOW_RULES = ("within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly")


@dataclass(frozen=True)
class Rules:
    """A retention rule set, restic ``forget`` style.

    Counts: 0 = rule off, -1 = unlimited. Durations: None (or zero) = rule off.
    ``max_total_bytes`` caps the kept archives' total size; it is not a keep rule.
    """

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    within_hourly: Duration | None = None
    within_daily: Duration | None = None
    within_weekly: Duration | None = None
    within_monthly: Duration | None = None
    within_yearly: Duration | None = None
    max_total_bytes: int | None = None

    def is_empty(self) -> bool:
        """True when no keep rule is on (``max_total_bytes`` alone keeps nothing)."""
        return not any(getattr(self, name) for name in _COUNT_RULES) and not any(
            _active(getattr(self, name)) for name in ("within", *_WINDOW_RULES)
        )

    def validate(self) -> None:
        """Raise `PolicyError` for a rule set backupd refuses to apply.

        Refused: no keep rule at all (restic: "no policy was specified"), a count that is not
        an integer or is below -1, a duration with a negative part, a ``max_total_bytes`` that
        is not a positive integer.
        """
        for name in _COUNT_RULES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise PolicyError(
                    f"invalid {name} count {value!r}: use a number >= 0, or -1 for unlimited"
                )
        for name in ("within", *_WINDOW_RULES):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Duration):
                raise PolicyError(f"invalid {name} {value!r}: expected a duration such as '7d'")
            parts = [getattr(value, f.name) for f in fields(value)]
            if any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in parts):
                raise PolicyError(f"invalid {name} {value!r}: durations cannot be negative")
        cap = self.max_total_bytes
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0):
            raise PolicyError(f"invalid max_total_bytes {cap!r}: expected a positive number of bytes")
        if self.is_empty():
            raise PolicyError(
                "the retention rules keep nothing: set at least one of keepLast, keepHourly, "
                "keepDaily, keepWeekly, keepMonthly, keepYearly or a keepWithin* duration"
            )


# -- items, decisions, plans ---------------------------------------------------------------


class Item(NamedTuple):
    """One archive as retention sees it. ``time`` must be timezone-aware."""

    id: str
    time: datetime
    size: int = 0
    pinned: bool = False


class Decision(NamedTuple):
    """What happens to one archive, and why.

    Reasons of a kept archive, in this order: ``within``, ``last``, ``hourly``, ``daily``,
    ``weekly``, ``monthly``, ``yearly`` (each count rule may instead read ``oldest <rule>``),
    ``within-hourly`` ... ``within-yearly`` (or ``oldest within-<bucket>``); alone: ``pinned``
    or ``newest``. A removed archive has ``()`` (no rule keeps it) or ``("size cap",)``.
    """

    item: Item
    keep: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The decision for every archive of the group, newest first (equal times: input order)."""

    decisions: tuple[Decision, ...]

    @cached_property
    def keep(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.keep)

    @cached_property
    def remove(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.keep)


def items(ids: Iterable[str], times: Iterable[datetime], sizes: Iterable[int], pinned: Iterable[bool],
          n: int | None = None) -> list[Item]:
    """Items from parallel columns (``n``, their length, is not needed and is ignored)."""
    return [Item(*row) for row in zip(ids, times, sizes, pinned, strict=True)]


# Bucket keys: restic's YYYYMMDDHH and friends, from the wall clock of the bucketing zone. Only
# whether two neighbours share a key matters.
_BUCKET_KEYS: dict[str, Callable[[datetime], object]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],  # ISO year and week, Monday to Sunday
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}
_NO_KEY = object()  # the key before the first archive: equal to no bucket key
_OFF = datetime.max.replace(tzinfo=UTC)  # the start of a window that is off: no archive is after it


def _apply_policy(walk: list[Item], rules: Rules, zone: tzinfo | None,
                  now: datetime | None) -> tuple[list[tuple[str, ...]], bool]:
    """restic's ApplyPolicy over ``walk`` (one group's unpinned archives, newest first).

    Returns each archive's reasons (empty: no rule keeps it) and whether every rule stopped
    before the oldest archive: then archives older still would change nothing here and would
    all be removed (see :func:`plan_head`).
    """
    oldest = len(walk) - 1

    def wall(moment: datetime) -> datetime:
        return moment if zone is None else moment.astimezone(zone)

    # The windows hang off the newest archive strictly before now, in the bucketing zone.
    latest = next((i.time for i in walk if now is None or i.time < now), None)

    def window_start(duration: Duration) -> datetime | None:
        """Archives strictly after this are inside the window; None: every archive is."""
        if latest is None:
            return None  # nothing before now: restic's anchor is Go's zero time, year 1
        try:
            return duration.cutoff(wall(latest))
        except OverflowError:  # before year 1
            return None

    within = window_start(rules.within) if rules.within is not None and _active(rules.within) else _OFF
    counts = {name: getattr(rules, name) for name in _COUNT_RULES if getattr(rules, name)}
    windows = {name.removeprefix("within_"): window_start(getattr(rules, name))
               for name in _WINDOW_RULES if _active(getattr(rules, name))}
    last_key = dict.fromkeys(counts, _NO_KEY)
    window_key = dict.fromkeys(windows, _NO_KEY)

    def inside(moment: datetime, start: datetime | None) -> bool:
        return start is None or moment > start

    reasons_of: list[tuple[str, ...]] = []
    for nr, item in enumerate(walk):
        if not any(counts.values()) and not any(inside(item.time, s) for s in (within, *windows.values())):
            break  # every count used up, every window passed: no rule keeps this or anything older
        reasons = []
        clock = wall(item.time)
        if inside(item.time, within):
            reasons.append("within")
        for name, left in counts.items():
            if left:
                key = nr if name == "last" else _BUCKET_KEYS[name](clock)
                if key != last_key[name]:
                    reasons.append(name)
                elif nr == oldest:
                    reasons.append("oldest " + name)
                else:
                    continue
                last_key[name] = key
                if left > 0:
                    counts[name] = left - 1
        for bucket, start in windows.items():
            if inside(item.time, start):
                key = _BUCKET_KEYS[bucket](clock)
                if key != window_key[bucket]:
                    reasons.append("within-" + bucket)
                elif nr == oldest:
                    reasons.append("oldest within-" + bucket)
                window_key[bucket] = key
        reasons_of.append(tuple(reasons))
    reasons_of += [()] * (len(walk) - len(reasons_of))

    stopped = (
        not any(counts.values())
        and not any(r.startswith("oldest ") for r in reasons_of[-1])  # a rule had slots left at the oldest
        and not any(inside(walk[-1].time, s) for s in (within, *windows.values()))
    )
    return reasons_of, stopped


def plan(
    items: Iterable[Item],
    rules: Rules,
    *,
    tz: tzinfo | None = None,
    now: datetime | None = None,
) -> Plan:
    """Decide, for every archive of one group (one workload), whether the rules keep it.

    ``tz``: the zone bucket keys are computed in (the policy's ``timezone``); None = each
    archive's own recorded offset, as restic does. ``now``: archives at or after ``now`` do not
    anchor the ``within`` windows (restic ignores future-dated snapshots there); None = the
    newest archive anchors them. Raises `PolicyError` if ``rules`` are invalid or keep nothing,
    ``ValueError`` for a naive ``now`` or archive time.
    """
    return _plan(items, rules, tz, now)[0]


def plan_head(
    items: Iterable[Item],
    rules: Rules,
    *,
    tz: tzinfo | None = None,
    now: datetime | None = None,
) -> Plan | None:
    """The plan of a group's newest archives, when they alone decide it; else None.

    ``items``: the group's unpinned archives from the newest down to some time, every one at
    that time included, plus all of the group's pinned archives (or, for the pinned ones older
    than that time, stand-ins of the same total size, older than every other item: the rules
    never look at pinned archives, only ``max_total_bytes`` counts their bytes).

    When every rule stops before the oldest of the given unpinned archives, :func:`plan` of the
    whole group decides each given archive exactly as the returned plan does, and removes
    every older unpinned archive with no reason: a report can then tell what a prune of a
    million archives does from the few it keeps. Otherwise (a rule reaches the oldest given
    archive, or counts without limit) returns None: give more of the group. Same errors as
    :func:`plan`.
    """
    result, decided = _plan(items, rules, tz, now)
    return result if decided else None


def _newest_first(items: list[Item]) -> list[Item]:
    """``items`` sorted newest first by instant; stable, so equal times keep their input order."""
    if all(isinstance(i.time.tzinfo, timezone) for i in items):
        return sorted(items, key=attrgetter("time"), reverse=True)
    # Python compares two datetimes of one ZoneInfo by wall clock, which misorders the hour a
    # DST change repeats; compare instants instead.
    return sorted(items, key=lambda i: i.time.astimezone(UTC), reverse=True)


def _plan(items: Iterable[Item], rules: Rules, tz: tzinfo | None, now: datetime | None) -> tuple[Plan, bool]:
    rules.validate()
    if now is not None and now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    listed = list(items)
    naive = next((i for i in listed if i.time.tzinfo is None), None)
    if naive is not None:
        raise ValueError(f"archive {naive.id!r} has a naive time {naive.time!r}")
    if not listed:
        return Plan(()), False
    ordered = _newest_first(listed)

    # 1. pinned archives are kept and invisible to the rules
    walk = [i for i in ordered if not i.pinned]
    by_rules, decided = _apply_policy(walk, rules, tz, now) if walk else ([], False)
    unpinned_reasons = iter(by_rules)
    reasons_of = [("pinned",) if i.pinned else next(unpinned_reasons) for i in ordered]
    keep = [bool(reasons) for reasons in reasons_of]

    # 2. the newest archive is never removed
    if not keep[0]:
        keep[0], reasons_of[0] = True, ("newest",)

    # 3. max_total_bytes: remove kept unpinned archives, oldest first, until the total fits
    cap = rules.max_total_bytes
    if cap is not None:
        total = sum(i.size for i, kept in zip(ordered, keep, strict=True) if kept)
        for position in range(len(ordered) - 1, 0, -1):
            if total <= cap:
                break
            if keep[position] and not ordered[position].pinned:
                total -= ordered[position].size
                keep[position], reasons_of[position] = False, ("size cap",)

    return Plan(tuple(map(Decision, ordered, keep, reasons_of))), decided


# -- simulate and timestamps -----------------------------------------------------------------

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp strictly, keeping its UTC offset.

    ``2024-05-01T02:00:00Z``, ``2024-05-01T04:00:00.5+02:00``. Fractions beyond microseconds
    are truncated. Raises `PolicyError` naming the value for anything else (no date-only
    values, no missing offset, no leap second 60, no out-of-range field).
    """
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    example = "expected e.g. 2024-05-01T02:00:00Z or 2024-05-01T04:00:00+02:00"
    if match is None:
        raise PolicyError(f"invalid RFC 3339 timestamp {text!r}: {example}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if int(off_h or 0) > 23 or int(off_m or 0) > 59:
        raise PolicyError(f"invalid RFC 3339 timestamp {text!r}: UTC offset out of range")
    offset = timedelta(hours=int(off_h or 0), minutes=int(off_m or 0))
    zone = UTC if zulu or not offset else timezone(-offset if sign == "-" else offset)
    try:
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            int((fraction or "0")[:6].ljust(6, "0")), tzinfo=zone,
        )  # fmt: skip
    except ValueError as exc:
        raise PolicyError(f"invalid RFC 3339 timestamp {text!r}: {exc}") from None


def _format_rfc3339(moment: datetime) -> str:
    offset = moment.utcoffset()
    if offset is None or offset % timedelta(minutes=1):
        moment, offset = moment.astimezone(UTC), timedelta(0)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    if not offset:
        return text + "Z"
    minutes = int(abs(offset) // timedelta(minutes=1))
    return f"{text}{'-' if offset < timedelta(0) else '+'}{minutes // 60:02d}:{minutes % 60:02d}"


def simulate(
    times: list[datetime],
    rules: Rules,
    *,
    tz: tzinfo | None = None,
    now: datetime | None = None,
) -> dict:
    """What ``rules`` keep of a list of archive times (``backupd retention simulate``).

    Each entry of ``times`` is one archive, duplicates included. Returns
    ``{"keep": [{"time", "reasons"}], "remove": [{"time"}]}``, newest first, times as RFC 3339
    in their own offset (``Z`` for UTC). Same errors as `plan`.
    """
    result = plan([Item(id=str(i), time=t) for i, t in enumerate(times)], rules, tz=tz, now=now)
    return {
        "keep": [{"time": _format_rfc3339(d.item.time), "reasons": list(d.reasons)} for d in result.keep],
        "remove": [{"time": _format_rfc3339(d.item.time)} for d in result.remove],
    }
