"""Building the report, pure: its facts (:class:`ReportFacts`) and a moment in, a
:class:`~backupd.report.model.RetentionReport` out (:func:`assemble`); the facts from every
archive and run (:func:`facts_from_lists`, :func:`build_report`). What the statuses mean is in
:mod:`backupd.report`; :mod:`backupd.report.load` gathers the same facts from the catalog."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from backupd.config import DEFAULT_STALE_INTERVALS
from backupd.model import COMMITTED, GROUP_BY_REPLICA, RUN_FAILED, SUCCEEDED, GroupStats, Run, replica_identity
from backupd.policy import retention
from backupd.policy.document import Policy
from backupd.policy.schedule import Schedule
from backupd.report.model import (
    LATE,
    MISSING,
    OK,
    UNMANAGED,
    ArchivePoint,
    PolicyReport,
    RetentionReport,
    RunSummary,
    StoragePoint,
    WorkloadStatus,
    format_age,
    format_moment,
)
from backupd.storage.prune import Planned

Assessment = tuple[str, datetime | None, datetime | None, datetime | None]


class Fires(Protocol):
    """What the report asks of a schedule: a :class:`~backupd.policy.schedule.Schedule`, or the
    same remembering its answers (:class:`RememberedSchedule`)."""

    @property
    def interval(self) -> timedelta | None: ...

    @property
    def period(self) -> timedelta: ...

    def next_after(self, moment: datetime) -> datetime: ...


class RememberedSchedule:
    """A schedule that remembers its fire times: a report asks every workload of a policy when
    its next runs are, mostly about the same moments, and a cron schedule computes each one
    afresh (it builds an APScheduler trigger per question)."""

    def __init__(self, schedule: Schedule) -> None:
        self.interval = schedule.interval
        self.period = schedule.period
        self.next_after = functools.lru_cache(maxsize=4096)(schedule.next_after)


def assess(schedule: Fires, newest: datetime | None, now: datetime,
           stale_intervals: int = DEFAULT_STALE_INTERVALS) -> Assessment:
    """``(status, due_at, late_after, missing_after)`` of a recovery point (:mod:`backupd.report`)."""
    if newest is None:
        return MISSING, None, None, None
    grace = schedule.period / 2
    due = schedule.next_after(newest)
    late_after = due + grace
    if schedule.interval is not None:
        fire = due + schedule.interval * (stale_intervals - 1)
    else:
        fire = due
        for _ in range(stale_intervals - 1):
            fire = schedule.next_after(fire)
    missing_after = fire + grace
    if now <= late_after:
        return OK, due, late_after, missing_after
    return (LATE if now <= missing_after else MISSING), due, late_after, missing_after


def _reason(status: str, newest: datetime | None, now: datetime, due: datetime | None, failing: bool,
            last_failure: RunSummary | None, stale_intervals: int) -> str:
    if newest is None:
        if failing and last_failure is not None:
            return f"no archive: every run failed ({last_failure.error_kind or 'error'})"
        return "no archive yet"
    age = format_age(now - newest)
    assert due is not None
    if status == OK:
        return f"newest archive {age} old; next due {format_moment(due)}"
    if status == LATE:
        return f"newest archive {age} old; the run due {format_moment(due)} left no archive"
    return f"newest archive {age} old: {stale_intervals} or more scheduled runs left no archive"


def _next_run(schedule: Fires, last_started: datetime | None, now: datetime) -> datetime:
    # After downtime the daemon catches a missed run up at once, then follows the schedule;
    # either way the first fire after now is the honest "next".
    if last_started is not None:
        following = schedule.next_after(last_started)
        if following > now:
            return following
    return schedule.next_after(now)


Target = tuple[str, str, str, str]  # namespace, workload, replica, container
RunKey = tuple[str, Target | None, str | None, str]  # kind, target, pod, outcome


@dataclass(frozen=True)
class GroupFacts:
    """What the report knows of one retention group's committed archives: aggregates over all
    of them, and the next prune's decision on each of its newest ``TIMELINE_POINTS``."""

    stats: GroupStats
    timeline: tuple[ArchivePoint, ...]  # oldest first
    remove_archives: int
    remove_bytes: int
    logical_bytes: int | None = None  # only read when a backend deduplicates

    @property
    def target(self) -> Target:
        return (self.stats.namespace, self.stats.workload, self.stats.replica, self.stats.container)


@dataclass(frozen=True)
class PolicyRuns:
    """What the report knows of one policy's runs: the latest finished run of each kind, target,
    pod and outcome, and when a checkpoint run last started."""

    latest: dict[RunKey, RunSummary] = field(default_factory=dict)
    last_checkpoint_start: datetime | None = None
    targets: frozenset[Target] = frozenset()  # every target a checkpoint run names

    @functools.cached_property
    def _by_kind_target(self) -> dict[tuple[str, Target | None], list[tuple[str | None, str, RunSummary]]]:
        index: dict[tuple[str, Target | None], list[tuple[str | None, str, RunSummary]]] = {}
        for (kind, target, pod, outcome), run in self.latest.items():
            index.setdefault((kind, target), []).append((pod, outcome, run))
            if target is not None:
                index.setdefault((kind, None), []).append((pod, outcome, run))
        return index

    def last(self, kind: str, outcome: str | None = None, target: Target | None = None) -> RunSummary | None:
        """The latest run of ``kind`` (and ``outcome`` and ``target`` where given; any target
        when ``target`` is None, runs without a target included)."""
        return max((r for _p, o, r in self._by_kind_target.get((kind, target), ()) if outcome is None or o == outcome),
                   key=lambda r: (r.started_at, r.id), default=None)

    def failing(self, target: Target, period: timedelta) -> bool:
        """The target's latest cycle had a failure (:mod:`backupd.report`: ``failing``)."""
        mine = [(p, r) for p, _o, r in self._by_kind_target.get(("checkpoint", target), ())]
        if not mine:
            return False
        latest_by_pod: dict[str | None, RunSummary] = {}
        for pod, r in mine:
            known = latest_by_pod.get(pod)
            if known is None or (r.started_at, r.id) > (known.started_at, known.id):
                latest_by_pod[pod] = r
        cycle_start = max(r.started_at for _p, r in mine) - max(period * 3 / 4, timedelta(minutes=5))
        return any(r.outcome == RUN_FAILED and r.started_at >= cycle_start for r in latest_by_pod.values())


@dataclass(frozen=True)
class PolicyProblem:
    """A stored policy the report cannot evaluate (its spec no longer validates, its schedule
    never fires...): reported with the error, its archives as unmanaged."""

    name: str
    error: str


@dataclass(frozen=True)
class ReportFacts:
    """Everything a report is computed from, per policy name; :func:`facts_from_lists` and
    :func:`facts_from_catalog` gather the same facts from lists or from the catalog."""

    policies: tuple[Policy | PolicyProblem, ...]
    groups: dict[str, list[GroupFacts]]
    runs: dict[str, PolicyRuns]
    storage: dict[str, tuple[StoragePoint, ...]]


# How many archives of a workload the report lists with their decision (the newest ones); the
# counts and sizes always cover all of them. How many steps a policy's storage curve has at most.
TIMELINE_POINTS = 100
STORAGE_POINTS = 200


def policy_problem(policy: Policy, now: datetime) -> str | None:
    """Why the report cannot evaluate ``policy`` (None: it can). Everything it will ask of the
    policy is asked here once, so a policy stored by an older or newer backupd, or with a
    schedule that never fires, becomes a line of the report instead of its failure."""
    try:
        schedule = policy.schedule
        schedule.next_after(now)
        schedule.period  # noqa: B018 - computing it is the check
        policy.rules.validate()
        policy.tz  # noqa: B018
    except Exception as exc:  # anything a stored spec can make these raise; the report must go on
        return f"{type(exc).__name__}: {exc}"
    return None


def decide(policy: Policy | None, newest: Sequence[Planned], older: tuple[int, int, int, int] = (0, 0, 0, 0),
           ) -> tuple[tuple[ArchivePoint, ...], int, int] | None:
    """The next prune's decisions on a group's newest archives, and what it removes in all.

    ``newest``: the group's newest committed archives (every one when ``older`` is zero),
    cut as :meth:`backupd.catalog.store.Catalog.group_head` cuts them; ``older``: (count, bytes) of
    its older unpinned and (count, bytes) of its older pinned archives. Returns (timeline
    points oldest first, archives removed, bytes removed), or None when the rules look beyond
    ``newest`` (:func:`backupd.policy.retention.plan_head`): give more. ``policy`` None: a policy
    nothing applies (unmanaged), which keeps everything. The points are the newest
    ``TIMELINE_POINTS``.
    """
    ordered = sorted(newest, key=lambda a: (a.checkpoint_time, a.id))  # as the catalog lists them
    if policy is None:
        return tuple(ArchivePoint(a.id, a.checkpoint_time, a.stored_size or 0, a.pinned, True, ("no policy",))
                     for a in ordered[-TIMELINE_POINTS:]), 0, 0
    older_count, older_bytes, older_pinned, older_pinned_bytes = older
    items = retention.items((a.id for a in ordered), (a.checkpoint_time for a in ordered),
                            (a.stored_size or 0 for a in ordered), (a.pinned for a in ordered), len(ordered))
    if not any(older):
        result: retention.Plan | None = retention.plan(items, policy.rules, tz=policy.tz)
    else:
        if older_pinned and ordered:  # their bytes count against maxTotalBytes; the rules never see them
            items.append(retention.Item("", ordered[0].checkpoint_time - timedelta(days=1), older_pinned_bytes,
                                        pinned=True))
        result = retention.plan_head(items, policy.rules, tz=policy.tz)
    if result is None:
        return None
    removed = result.remove  # the stand-in is pinned: never among them
    shown = [d for d in result.decisions[:TIMELINE_POINTS + 1] if d.item.id][:TIMELINE_POINTS]
    points = tuple(ArchivePoint(d.item.id, d.item.time, d.item.size, d.item.pinned, d.keep, d.reasons or ("no rule",))
                   for d in reversed(shown))
    return points, len(removed) + older_count, sum(d.item.size for d in removed) + older_bytes


def storage_steps(steps: Iterable[tuple[datetime, int]]) -> tuple[StoragePoint, ...]:
    """A policy's storage curve from ``(time, bytes)`` steps oldest first: the running sum."""
    total, series = 0, list[StoragePoint]()
    for moment, size in steps:
        total += size
        if series and series[-1].time == moment:
            series[-1] = StoragePoint(moment, total)
        else:
            series.append(StoragePoint(moment, total))
    return tuple(series)


def downsample(steps: Sequence[tuple[datetime, int]], points: int) -> list[tuple[datetime, int]]:
    """At most ``points`` of ``(time, bytes)`` steps (oldest first): those in each of ``points``
    equal spans of their time range merged into one, at the newest time of the span, so a
    running sum stays exact at every time it is given for."""
    if len(steps) <= points:
        return list(steps)
    oldest, newest = steps[0][0], steps[-1][0]
    width = max((newest - oldest).total_seconds() / points, 1e-6)
    merged: dict[int, tuple[datetime, int]] = {}
    for moment, size in steps:
        key = math.floor((moment - oldest).total_seconds() / width)
        merged[key] = (moment, merged.get(key, (moment, 0))[1] + size)
    return [merged[k] for k in sorted(merged)]


def _target(run: Run, group_by: str) -> Target | None:
    """The retention group a checkpoint run's container is in (runs record no replica: it is
    derived from the run's pod and node as the pipeline derived the archive's)."""
    if run.namespace and run.workload and run.container:
        replica = replica_identity(run.workload.partition("/")[0], run.pod or "", run.node, group_by)
        return (run.namespace, run.workload, replica, run.container)
    return None


def runs_facts(runs: Iterable[Run], group_by: Mapping[str, str] | None = None) -> dict[str, PolicyRuns]:
    """Per policy: the latest finished run of each kind, target, pod and outcome. ``group_by``:
    each policy's ``groupBy`` (``replica`` for those not named)."""
    latest: dict[str, dict[RunKey, RunSummary]] = {}
    starts: dict[str, datetime] = {}
    targets: dict[str, set[Target]] = {}
    for r in runs:
        if r.policy is None:
            continue
        target = _target(r, (group_by or {}).get(r.policy, GROUP_BY_REPLICA))
        if r.kind == "checkpoint":
            if r.policy not in starts or r.started_at > starts[r.policy]:
                starts[r.policy] = r.started_at
            if target is not None:
                targets.setdefault(r.policy, set()).add(target)
        if r.outcome not in (SUCCEEDED, RUN_FAILED):
            continue
        key = (r.kind, target, r.pod, r.outcome)
        mine = latest.setdefault(r.policy, {})
        known = mine.get(key)
        if known is None or (r.started_at, r.id) > (known.started_at, known.id):
            mine[key] = RunSummary.of(r)
    return {name: PolicyRuns(latest.get(name, {}), starts.get(name), frozenset(targets.get(name, ())))
            for name in set(latest) | set(starts)}


def facts_from_lists(policies: Sequence[Policy | PolicyProblem], archives: Iterable[Planned],
                     runs: Iterable[Run]) -> ReportFacts:
    """The facts of a report, from every archive and run (the pure path: tests, small inputs)."""
    valid = {p.name: p for p in policies if isinstance(p, Policy)}
    grouped: dict[tuple[str, str, str, str, str], list[Planned]] = {}
    for a in archives:
        if a.state == COMMITTED:
            grouped.setdefault((a.policy, a.namespace, a.workload, a.replica, a.container), []).append(a)
    groups: dict[str, list[GroupFacts]] = {}
    storage: dict[str, list[Planned]] = {}
    for (name, namespace, workload, replica, container), members in sorted(grouped.items()):
        decided = decide(valid.get(name), members)
        assert decided is not None  # every archive given: always decided
        points, removed, removed_bytes = decided
        times = [a.checkpoint_time for a in members]
        pinned = [a.stored_size or 0 for a in members if a.pinned]
        stats = GroupStats(name, namespace, workload, replica, container, len(members),
                           sum(a.stored_size or 0 for a in members), min(times), max(times), len(pinned), sum(pinned))
        groups.setdefault(name, []).append(GroupFacts(stats, points, removed, removed_bytes))
        storage.setdefault(name, []).extend(members)
    steps = {name: sorted((a.checkpoint_time, a.stored_size or 0) for a in members)
             for name, members in storage.items()}
    return ReportFacts(tuple(policies), groups, runs_facts(runs, group_by_of(policies)),
                       {name: storage_steps(downsample(series, STORAGE_POINTS)) for name, series in steps.items()})


def group_by_of(policies: Sequence[Policy | PolicyProblem]) -> dict[str, str]:
    """Each applicable policy's ``groupBy``, as :func:`runs_facts` takes them."""
    return {p.name: p.spec.group_by for p in policies if isinstance(p, Policy)}


def build_report(
    policies: Sequence[Policy],
    archives: Iterable[Planned],
    runs: Iterable[Run],
    now: datetime,
    *,
    stale_intervals: int = DEFAULT_STALE_INTERVALS,
) -> RetentionReport:
    """The retention report of ``policies`` at ``now``. Pure: same inputs, same report.

    ``archives``: the catalog's archives (only ``committed`` ones count); ``runs``: for each
    policy its recent checkpoint runs (at least the latest succeeded and failed run of every
    pod) and its latest finished prune and verify run; more is fine. Archives of policies not in ``policies`` are
    reported as ``UNMANAGED``; runs of such policies only where they have archives.
    """
    return assemble(facts_from_lists(policies, archives, runs), now, stale_intervals=stale_intervals)


def assemble(facts: ReportFacts, now: datetime, *, stale_intervals: int = DEFAULT_STALE_INTERVALS) -> RetentionReport:
    """The report from its facts (:class:`ReportFacts`) at ``now``. Pure."""
    if stale_intervals < 1:
        raise ValueError(f"stale_intervals must be at least 1, got {stale_intervals}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    reports = []
    for p in sorted(facts.policies, key=lambda p: p.name):
        runs = facts.runs.get(p.name, PolicyRuns())
        groups = facts.groups.get(p.name, [])
        storage = facts.storage.get(p.name, ())
        problem = p.error if isinstance(p, PolicyProblem) else policy_problem(p, now)
        if problem is not None or not isinstance(p, Policy):
            reports.append(_unmanaged_report(p.name, groups, runs, storage, now, error=problem))
        else:
            reports.append(_policy_report(p, groups, runs, storage, now, stale_intervals))
    known = {p.name for p in facts.policies}
    for name in sorted(set(facts.groups) - known):
        reports.append(_unmanaged_report(name, facts.groups[name], facts.runs.get(name, PolicyRuns()),
                                         facts.storage.get(name, ()), now))
    return RetentionReport(generated_at=now, stale_intervals=stale_intervals, policies=tuple(reports))


def _policy_report(policy: Policy, groups: list[GroupFacts], runs: PolicyRuns, storage: tuple[StoragePoint, ...],
                   now: datetime, stale_intervals: int) -> PolicyReport:
    schedule = RememberedSchedule(policy.schedule)
    period = schedule.period
    next_run = _next_run(schedule, runs.last_checkpoint_start, now)
    by_target = {g.target: g for g in groups}
    workloads = []
    for target in sorted(set(by_target) | runs.targets):
        group = by_target.get(target)
        last_success = runs.last("checkpoint", SUCCEEDED, target)
        last_failure = runs.last("checkpoint", RUN_FAILED, target)
        failing = runs.failing(target, period)
        newest = group.stats.newest if group else None
        status, due, late_after, missing_after = assess(schedule, newest, now, stale_intervals)
        workloads.append(WorkloadStatus(
            policy=policy.name, namespace=target[0], workload=target[1], replica=target[2], container=target[3],
            status=status,
            reason=_reason(status, newest, now, due, failing, last_failure, stale_intervals), failing=failing,
            **_archive_fields(group), recovery_point_age=max(now - newest, timedelta(0)) if newest else None,
            due_at=due, late_after=late_after, missing_after=missing_after, next_run=next_run,
            last_success=last_success, last_failure=last_failure,
        ))
    return PolicyReport(
        name=policy.name, managed=True, schedule=policy.spec.schedule, timezone=policy.spec.timezone,
        backend=policy.spec.backend, period=period, next_run=next_run,
        last_success=runs.last("checkpoint", SUCCEEDED), last_failure=runs.last("checkpoint", RUN_FAILED),
        last_prune=runs.last("prune"), last_verify=runs.last("verify"),
        workloads=tuple(workloads), storage=storage,
    )


def _archive_fields(group: GroupFacts | None) -> dict[str, Any]:
    if group is None:
        return {"archives": 0, "stored_bytes": 0, "oldest": None, "newest": None, "timeline": (),
                "remove_archives": 0, "remove_bytes": 0}
    return {"archives": group.stats.archives, "stored_bytes": group.stats.stored_bytes,
            "logical_bytes": group.logical_bytes,
            "oldest": group.stats.oldest, "newest": group.stats.newest, "timeline": group.timeline,
            "remove_archives": group.remove_archives, "remove_bytes": group.remove_bytes}


def _unmanaged_report(name: str, groups: list[GroupFacts], runs: PolicyRuns, storage: tuple[StoragePoint, ...],
                      now: datetime, *, error: str | None = None) -> PolicyReport:
    reason = (f"policy {name!r} cannot be applied ({error}): nothing schedules or prunes these archives" if error
              else f"policy {name!r} no longer exists: nothing schedules or prunes these archives")
    workloads = []
    for group in sorted(groups, key=lambda g: g.target):
        workloads.append(WorkloadStatus(
            policy=name, namespace=group.stats.namespace, workload=group.stats.workload,
            replica=group.stats.replica, container=group.stats.container, status=UNMANAGED, reason=reason,
            failing=False,
            **_archive_fields(group), recovery_point_age=max(now - group.stats.newest, timedelta(0)),
            due_at=None, late_after=None, missing_after=None, next_run=None,
            last_success=runs.last("checkpoint", SUCCEEDED, group.target),
            last_failure=runs.last("checkpoint", RUN_FAILED, group.target),
        ))
    return PolicyReport(
        name=name, managed=False, schedule=None, timezone=None, backend=None, period=None, next_run=None,
        last_success=None, last_failure=None, last_prune=None, last_verify=None, workloads=tuple(workloads),
        storage=storage, error=error,
    )

