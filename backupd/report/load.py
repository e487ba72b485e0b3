"""The report from the catalog: its aggregates gathered into the same facts
:func:`backupd.report.build.facts_from_lists` gathers from lists, so both give the same report
(tested). The shell around :mod:`backupd.report.build`: every query is here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from backupd.catalog.store import Catalog
from backupd.config import DEFAULT_STALE_INTERVALS
from backupd.errors import PolicyError
from backupd.model import ArchiveSummary, GroupStats
from backupd.policy.document import Policy
from backupd.report.build import (
    STORAGE_POINTS,
    TIMELINE_POINTS,
    GroupFacts,
    PolicyProblem,
    ReportFacts,
    assemble,
    decide,
    downsample,
    group_by_of,
    policy_problem,
    runs_facts,
    storage_steps,
)
from backupd.report.model import RetentionReport


def facts_from_catalog(catalog: Catalog, policies: Sequence[Policy | PolicyProblem], now: datetime) -> ReportFacts:
    """The facts of a report from the catalog's aggregates: per group its counts and sizes and
    only the newest archives the retention rules look at (usually ``TIMELINE_POINTS``; more when
    a policy's rules reach further back), per policy its storage curve in ``STORAGE_POINTS``
    steps, and the latest run of each kind, target, pod and outcome. Memory and time follow the
    number of workloads and what their rules keep, not the number of archives."""
    usable = {p.name: p for p in policies if isinstance(p, Policy) and policy_problem(p, now) is None}
    groups: dict[str, list[GroupFacts]] = {}
    pending = {stats.group: (stats, first_read(usable.get(stats.policy), stats)) for stats in catalog.group_stats()}
    logical = catalog.group_logical_bytes() if catalog.has_packs() else {}
    while pending:
        reads: dict[int, list[tuple[str, str, str, str, str]]] = {}
        for group, (_stats, unpinned) in pending.items():
            reads.setdefault(unpinned, []).append(group)
        for unpinned, batch in reads.items():
            for group, (newest, complete) in catalog.group_heads(batch, unpinned).items():
                stats = pending[group][0]
                older = (0, 0, 0, 0) if complete else older_than_head(stats, newest)
                decided = decide(usable.get(stats.policy), newest, older)
                if decided is None:  # the rules reach further back than these: read more of the group
                    pending[group] = (stats, unpinned * 4)
                    continue
                del pending[group]
                points, removed, removed_bytes = decided
                groups.setdefault(stats.policy, []).append(GroupFacts(stats, points, removed, removed_bytes,
                                                                      logical.get(group)))
    for members in groups.values():
        members.sort(key=lambda g: g.target)
    series = catalog.storage_series([(name, sum(g.stats.archives for g in members))
                                     for name, members in groups.items()], STORAGE_POINTS)
    storage = {name: storage_steps(downsample(steps, STORAGE_POINTS)) for name, steps in series.items()}
    runs = runs_facts(catalog.latest_runs(), group_by_of(policies))
    return ReportFacts(tuple(policies), groups, runs, storage)


_BUCKET_SPAN = {"hourly": timedelta(hours=1), "daily": timedelta(days=1), "weekly": timedelta(days=7),
           "monthly": timedelta(days=31), "yearly": timedelta(days=366)}


def first_read(policy: Policy | None, stats: GroupStats) -> int:
    """How many of a group's newest unpinned archives to read first: as many as the policy's
    rules reach back over, at the group's average spacing (plus a quarter), and at least a
    timeline's. Only a guess to save round trips: :func:`decide` says when it was too few."""
    if policy is None:
        return TIMELINE_POINTS
    rules = policy.rules
    counts = {name: getattr(rules, name) for name in ("last", *_BUCKET_SPAN)}
    if -1 in counts.values():
        return max(stats.archives, 1)  # unlimited: every archive counts
    reach = [_BUCKET_SPAN[name] * count for name, count in counts.items() if name in _BUCKET_SPAN]
    for name in ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly"):
        d = getattr(rules, name)
        if d is not None:
            reach.append(timedelta(days=366 * d.years + 31 * d.months + d.days, hours=d.hours))
    spacing = (stats.newest - stats.oldest) / max(stats.archives - 1, 1)
    within = max(reach, default=timedelta(0)) / spacing if spacing else 0
    # every rule walks from the newest archive at once: the one reaching furthest decides
    return max(TIMELINE_POINTS, int(max(counts["last"], within) * 1.25) + 1)


def older_than_head(stats: GroupStats, newest: list[ArchiveSummary]) -> tuple[int, int, int, int]:
    """(count, bytes) of a group's unpinned and of its pinned archives older than ``newest``."""
    pinned = [a for a in newest if a.pinned]
    unpinned_bytes = sum(a.stored_size or 0 for a in newest if not a.pinned)
    # never below zero: archives committed or deleted between the two queries shift the counts a little
    return (max(0, stats.archives - stats.pinned - (len(newest) - len(pinned))),
            max(0, stats.stored_bytes - stats.pinned_bytes - unpinned_bytes),
            max(0, stats.pinned - len(pinned)), max(0, stats.pinned_bytes - sum(a.stored_size or 0 for a in pinned)))


def stored_policies(catalog: Catalog) -> list[Policy | PolicyProblem]:
    """The catalog's policies; one this backupd refuses (:meth:`Policy.from_spec_json`) as a
    :class:`PolicyProblem`."""
    out: list[Policy | PolicyProblem] = []
    for stored in catalog.list_policies():
        try:
            out.append(Policy.from_spec_json(stored.name, stored.spec_json))
        except PolicyError as exc:
            out.append(PolicyProblem(stored.name, str(exc)))
    return out


def load_report(catalog: Catalog, *, now: datetime | None = None,
                stale_intervals: int = DEFAULT_STALE_INTERVALS) -> RetentionReport:
    """The report of everything in the catalog, from its aggregates (:func:`facts_from_catalog`)."""
    moment = now or datetime.now(UTC)
    return assemble(facts_from_catalog(catalog, stored_policies(catalog), moment), moment,
                    stale_intervals=stale_intervals)

