"""The report as one self-contained HTML page: inline CSS and SVG, no script, no external asset
(its Content-Security-Policy forbids loading any).

The page is the Jinja2 template ``templates/report.html.j2`` (its CSS ``templates/report.css``),
rendered with autoescape: every value from the cluster or the catalog is escaped by the
template engine. This module computes what the template cannot sensibly compute: where each
archive, tick and line of a chart goes (:class:`TimelineChart`, :class:`StorageChart`) and the
sentences that describe a chart to a screen reader.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jinja2

from backupd.model import RUN_FAILED
from backupd.report.model import (
    LATE,
    MISSING,
    OK,
    UNMANAGED,
    ArchivePoint,
    PolicyReport,
    RetentionReport,
    WorkloadStatus,
    format_age,
    format_moment,
)
from backupd.sizes import human_bytes

# One colour per rule family (a colour-blind-safe palette); the first reason picks the family.
RULE_FAMILIES = (
    ("pinned", "#6a3d9a", "pinned"),
    ("newest", "#1b9e77", "newest archive"),
    ("last", "#1f78b4", "keepLast"),
    ("within", "#a6761d", "keepWithin*"),
    ("hourly", "#66a61e", "hourly"),
    ("daily", "#e6ab02", "daily"),
    ("weekly", "#d95f02", "weekly"),
    ("monthly", "#e7298a", "monthly"),
    ("yearly", "#7570b3", "yearly"),
    ("no policy", "#777777", "no policy (unmanaged)"),
)
FAMILY_COLOUR = {family: colour for family, colour, _label in RULE_FAMILIES}
REMOVE_COLOUR = "#c0392b"
UNKNOWN_FAMILY_COLOUR = "#444"

#: the width of every chart, in SVG units; the archive table of a workload lists at most this many
CHART_WIDTH = 1000
ARCHIVE_TABLE_ROWS = 200


def rule_family(point: ArchivePoint) -> str:
    """The rule family (a key of :data:`FAMILY_COLOUR`) that keeps ``point``: its first reason."""
    if point.pinned:
        return "pinned"
    first = point.reasons[0] if point.reasons else "no rule"
    first = first.removeprefix("oldest ")
    if first.startswith("within"):
        return "within"
    return first


# -- time axes --------------------------------------------------------------------------------

_TICK_STEPS = [timedelta(seconds=s) for s in (
    1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400,
    14 * 86400, 30 * 86400, 91 * 86400, 182 * 86400, 365 * 86400, 730 * 86400, 1826 * 86400)]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_ticks(start: datetime, end: datetime, most: int = 6) -> tuple[list[datetime], str]:
    """Round moments between ``start`` and ``end`` to label an axis with (about ``most``), and
    the strftime format that labels them without repeating what they share."""
    span = end - start
    step = next((s for s in _TICK_STEPS if span / s <= most), _TICK_STEPS[-1])
    first = _EPOCH + step * math.ceil((start - _EPOCH) / step)
    ticks: list[datetime] = []
    moment = first
    while moment <= end and len(ticks) <= most + 1:
        ticks.append(moment)
        moment += step
    if step >= timedelta(days=1):
        fmt = "%Y-%m-%d"
    elif span > timedelta(days=1):
        fmt = "%m-%d %H:%M"
    else:
        fmt = "%H:%M:%S" if step < timedelta(minutes=1) else "%H:%M"
    return ticks, fmt


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class TimeAxis:
    """Maps times onto the x range ``left``..``right`` of a chart."""

    start: datetime
    end: datetime
    left: float
    right: float

    @classmethod
    def around(cls, moments: Sequence[datetime], now: datetime, period: timedelta | None, left: float,
               right: float) -> TimeAxis:
        """An axis over ``moments`` and ``now``, padded by a fortieth on each side (four
        periods before ``now`` when there are no moments)."""
        start = min(moments) if moments else now - (period or timedelta(hours=1)) * 4
        end = max([now, *moments])
        pad = (end - start) / 40 or timedelta(minutes=1)
        start, end = start - pad, end + pad
        if end <= start:
            start = end - timedelta(hours=1)
        return cls(start, end, left, right)

    def x(self, moment: datetime) -> float:
        fraction = (moment - self.start) / (self.end - self.start)
        return round(self.left + min(max(fraction, 0.0), 1.0) * (self.right - self.left), 1)

    @functools.cached_property
    def ticks(self) -> list[Tick]:
        moments, fmt = time_ticks(self.start, self.end)
        return [Tick(self.x(t), t.strftime(fmt)) for t in moments]


# -- the charts, as the template draws them --------------------------------------------------


@dataclass(frozen=True)
class Dot:
    """An archive on a timeline: where, kept or removed, in which colour, and its tooltip."""

    x: float
    kept: bool
    colour: str
    label: str


@dataclass(frozen=True)
class TimelineChart:
    """A workload's archives on a time axis: kept ones on the upper lane in their rule's colour,
    the next prune's removals crossed out on the lower one; ``now`` and ``late after`` marks."""

    ident: str
    target: str
    description: str
    axis: TimeAxis
    now_x: float
    now: str
    late_x: float | None
    late_after: str
    dots: list[Dot]  # oldest first: a later dot is drawn over an earlier one


def timeline_chart(w: WorkloadStatus, now: datetime, period: timedelta | None, ident: str) -> TimelineChart:
    times = [p.time for p in w.timeline]
    axis = TimeAxis.around(times, now, period, left=130, right=CHART_WIDTH - 20)
    kept = [p for p in w.timeline if p.keep]
    removed = [p for p in w.timeline if not p.keep]
    families: dict[str, int] = {}
    for p in kept:
        families[rule_family(p)] = families.get(rule_family(p), 0) + 1
    kept_text = ", ".join(f"{n} {f}" for f, n in sorted(families.items(), key=lambda kv: -kv[1])) or "none"
    which = f"{len(w.timeline)}" if w.timeline_complete else f"The newest {len(w.timeline)} of {w.archives}"
    description = (f"{which} archive(s) of {w.target} between {format_moment(times[0] if times else None)} and "
                   f"{format_moment(w.newest)}: {len(kept)} kept ({kept_text}), {len(removed)} removed by the next "
                   f"prune. Status {w.status}.")

    def dot(p: ArchivePoint) -> Dot:
        reasons = ", ".join(p.reasons)
        label = (f"{p.id} at {format_moment(p.time)}, {human_bytes(p.stored_size)}" + (", pinned" if p.pinned else "")
                 + (f": kept by {reasons}" if p.keep else f": next prune removes it ({reasons})"))
        colour = FAMILY_COLOUR.get(rule_family(p), UNKNOWN_FAMILY_COLOUR) if p.keep else REMOVE_COLOUR
        return Dot(axis.x(p.time), p.keep, colour, label)

    late = w.late_after is not None and w.late_after <= axis.end
    return TimelineChart(
        ident=ident, target=w.target, description=description, axis=axis, now_x=axis.x(now),
        now=format_moment(now), late_x=axis.x(w.late_after) if late and w.late_after else None,
        late_after=format_moment(w.late_after), dots=[dot(p) for p in w.timeline],
    )


@dataclass(frozen=True)
class StorageChart:
    """A policy's retained bytes over time as a step line (and the area under it)."""

    ident: str
    policy: str
    description: str
    axis: TimeAxis
    top: float
    bottom: float
    gridlines: list[Tick]  # y and the size it marks
    line: str | None  # SVG path of the steps; None when the policy keeps no archive
    area: str | None


def storage_chart(p: PolicyReport, now: datetime, ident: str) -> StorageChart:
    series = list(p.storage)
    top, bottom = 12, 150
    axis = TimeAxis.around([s.time for s in series], now, p.period, left=70, right=CHART_WIDTH - 20)
    peak = max((s.stored_bytes for s in series), default=0)
    description = (f"Stored bytes of the archives policy {p.name} keeps now, accumulated by checkpoint time: "
                   f"{human_bytes(peak)} in {p.archives} archive(s)"
                   + (f", from {format_moment(series[0].time)} to {format_moment(series[-1].time)}." if series
                      else "."))
    scale = peak or 1

    def y(v: int) -> float:
        return round(bottom - (bottom - top) * v / scale, 1)

    gridlines = [Tick(y(int(peak * fraction)), human_bytes(int(peak * fraction))) for fraction in (0, 0.5, 1)]
    line = area = None
    if series:
        # A step line: the total only changes when an archive was taken. Many archives on one
        # pixel collapse to the last value there, so a big catalog stays a small page.
        coords: list[tuple[float, float]] = [(axis.x(series[0].time), y(0))]
        for s in series:
            x = axis.x(s.time)
            if coords[-1][0] == x:
                coords[-1] = (x, y(s.stored_bytes))
                continue
            coords.append((x, coords[-1][1]))
            coords.append((x, y(s.stored_bytes)))
        coords.append((axis.x(max(now, series[-1].time)), coords[-1][1]))
        line = " ".join(f"{'M' if i == 0 else 'L'}{x} {yy}" for i, (x, yy) in enumerate(coords))
        area = line + f" L{coords[-1][0]} {bottom} L{coords[0][0]} {bottom} Z"
    return StorageChart(ident=ident, policy=p.name, description=description, axis=axis, top=top, bottom=bottom,
                        gridlines=gridlines, line=line, area=area)


# -- the page ---------------------------------------------------------------------------------


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("backupd.report", "templates"),
        autoescape=True,  # every template, whatever its name: the page is made of catalog values
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(report: RetentionReport) -> str:
    """The report as one self-contained HTML page (module docstring)."""
    now = report.generated_at
    used = {rule_family(p) for w in report.workloads() for p in w.timeline if p.keep}
    template = _environment().get_template("report.html.j2")
    return template.render(
        report=report,
        summary=report.summary(),
        statuses=(OK, LATE, MISSING, UNMANAGED),
        legend=[(colour, label) for family, colour, label in RULE_FAMILIES if family in used],
        storage_chart=lambda p, ident: storage_chart(p, now, ident),
        timeline_chart=lambda w, period, ident: timeline_chart(w, now, period, ident),
        moment=format_moment,
        age=format_age,
        size=human_bytes,
        failed=RUN_FAILED,
        archive_table_rows=ARCHIVE_TABLE_ROWS,
        width=CHART_WIDTH,
    )
