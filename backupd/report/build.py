"""The retention report: per policy and per workload, what is kept, how fresh it is, what goes next.

:func:`assemble` is pure -- the report's facts (:class:`ReportFacts`) and a moment in, a
:class:`Report` out; no clock, no catalog, no IO -- so the CLI, the daemon's ``/api/v1/report``
and the alerts all see the same answer for the same facts. The facts come either from every
archive and run (:func:`build_report`, for tests and small inputs) or from the catalog's
aggregates (:func:`load_report`): per workload its counts, sizes, oldest and newest archive, and
only the newest archives the retention rules look at (:func:`backupd.policy.retention.plan_head`); per
policy its storage curve in at most ``STORAGE_POINTS`` steps; the latest run of each kind,
target, pod and outcome. Both give the same report (tested); the catalog's way costs what the
number of workloads and their rules' reach cost, not what the number of archives does.
:func:`render_table` and :func:`render_html` present a report.

Workloads are retention groups: policy + namespace + workload (owning controller) + replica +
container (the replica of a StatefulSet pod is the pod, of a DaemonSet pod its node, ``""``
for interchangeable pods: :func:`backupd.model.replica_of`). They come from the policy's
committed archives *and* from its checkpoint runs (a run's replica is derived from its pod and
node), so a container whose every run failed (runs, no archive) is listed too.

**Status** of a workload, precisely. Let ``newest`` be the checkpoint time of its newest
committed archive, ``f1 = schedule.next_after(newest)`` the first scheduled run after it,
``fN`` the N-th (``N = stale_intervals``, default 3) and ``grace = schedule.period / 2``:

* ``OK`` -- ``now <= f1 + grace``: the run due after the newest archive is not overdue by more
  than half a period (for ``@every 1h`` the recovery point is at most ~1.5 h old);
* ``LATE`` -- ``f1 + grace < now <= fN + grace``: at least one scheduled run has passed without
  a new archive;
* ``MISSING`` -- ``now > fN + grace`` (N scheduled runs passed without an archive), or the
  workload has no committed archive at all (e.g. every run of it failed);
* ``UNMANAGED`` -- archives of a policy that no longer exists, or whose stored spec cannot be
  applied any more (it no longer validates, its schedule never fires: the policy's ``error``
  says why): nothing schedules or prunes them.

Independently of status, ``failing`` says the workload's latest cycle had a failure: some pod's
latest checkpoint run failed, and that run started within ``max(3/4 period, 5 min)`` of the
workload's latest run. Per pod, so one replica failing every cycle while another succeeds stays
failing (no flapping); within the latest cycle, so a pod that failed as it went away (a rollout)
stops counting once the next cycle ran without it. A policy's status is the worst of its
workloads' (``MISSING`` > ``LATE`` > ``OK``; ``OK`` when it has none).

**JSON** (:meth:`Report.to_json`; field names are a public contract -- add, never rename).
Times are RFC 3339 UTC with ``Z``, sizes bytes, durations seconds::

    {"format": "backupd.report/v1", "generated_at", "stale_intervals",
     "summary": {"policies", "workloads", "ok", "late", "missing", "unmanaged", "failing",
                 "archives", "stored_bytes", "prune_remove_archives", "prune_remove_bytes"},
     "policies": [{
        "name", "managed", "schedule", "timezone", "backend", "period_seconds", "status",
        "archives", "stored_bytes", "next_run",
        "last_success", "last_failure",        # checkpoint runs of any target (run or null)
        "last_prune", "last_verify",           # the latest run of that kind (run or null)
        "prune": {"remove_archives", "remove_bytes"},
        "storage": [{"time", "stored_bytes"}], # cumulative bytes of the kept archives by time,
                                               # at most STORAGE_POINTS steps
        "error",                               # why a stored policy cannot be applied, else null
        "workloads": [{
           "policy", "namespace", "workload", "replica", "container", "status", "reason", "failing",
           "archives", "stored_bytes", "oldest", "newest", "recovery_point_age_seconds",
           "due_at", "late_after", "missing_after", "next_run", "last_success", "last_failure",
           "prune": {"remove_archives", "remove_bytes",  # all of the workload's archives
                     "remove": [archive point]},        # those on the timeline
           "timeline": [archive point],        # the newest TIMELINE_POINTS archives
           "timeline_complete",                # false when older archives are not listed
           "logical_bytes", "dedup_ratio"}]}]} # only when a backend has format = "dedup": tar
                                               # bytes, and their ratio to stored_bytes

    run:           {"id", "kind", "outcome", "policy", "namespace", "pod", "workload", "container",
                    "node", "started_at", "finished_at", "error_kind", "error"}
    archive point: {"id", "time", "stored_size", "pinned", "keep", "reasons"}   # oldest first

``reasons`` are the retention engine's (``last``, ``daily``, ``oldest weekly``, ``within``,
``pinned``, ``newest``; for removals ``no rule`` or ``size cap``): exactly what the next prune
would do (:func:`backupd.storage.prune.plan_policy`).
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from backupd.catalog.store import Catalog
from backupd.config import DEFAULT_STALE_INTERVALS
from backupd.errors import PolicyError
from backupd.model import (
    COMMITTED,
    GROUP_BY_REPLICA,
    RUN_FAILED,
    SUCCEEDED,
    ArchiveSummary,
    GroupStats,
    Run,
    replica_identity,
)
from backupd.policy import retention
from backupd.policy.document import Policy
from backupd.policy.schedule import Schedule
from backupd.sizes import human_bytes
from backupd.storage.prune import Planned

OK, LATE, MISSING, UNMANAGED = "OK", "LATE", "MISSING", "UNMANAGED"
_SEVERITY = {OK: 0, UNMANAGED: 1, LATE: 2, MISSING: 3}
FORMAT = "backupd.report/v1"


def _ts(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- the report's values ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What the report (and an alert) says about one run: run fields only, nothing from config."""

    id: int
    kind: str
    outcome: str
    policy: str | None
    namespace: str | None
    pod: str | None
    workload: str | None
    container: str | None
    node: str
    started_at: datetime
    finished_at: datetime | None
    error_kind: str | None
    error: str | None

    @classmethod
    def of(cls, run: Run) -> RunSummary:
        return cls(run.id, run.kind, run.outcome, run.policy, run.namespace, run.pod, run.workload, run.container,
                   run.node, run.started_at, run.finished_at, run.error_kind, run.error)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "outcome": self.outcome, "policy": self.policy,
            "namespace": self.namespace, "pod": self.pod, "workload": self.workload, "container": self.container,
            "node": self.node, "started_at": _ts(self.started_at), "finished_at": _ts(self.finished_at),
            "error_kind": self.error_kind, "error": self.error,
        }


@dataclass(frozen=True)
class ArchivePoint:
    """One archive on a workload's timeline, with the next prune's decision about it."""

    id: str
    time: datetime
    stored_size: int
    pinned: bool
    keep: bool
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": _ts(self.time), "stored_size": self.stored_size, "pinned": self.pinned,
                "keep": self.keep, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class StoragePoint:
    time: datetime
    stored_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"time": _ts(self.time), "stored_bytes": self.stored_bytes}


@dataclass(frozen=True)
class WorkloadStatus:
    """One retention group's protection: see the module docstring for ``status``."""

    policy: str
    namespace: str
    workload: str
    replica: str  # "" for workloads whose pods are interchangeable (backupd.model.replica_of)
    container: str
    status: str
    reason: str
    failing: bool
    archives: int
    stored_bytes: int
    oldest: datetime | None
    newest: datetime | None
    timeline: tuple[ArchivePoint, ...]  # the newest TIMELINE_POINTS archives, oldest first
    remove_archives: int  # what the next prune removes: every archive, not only the timeline's
    remove_bytes: int
    recovery_point_age: timedelta | None
    due_at: datetime | None  # the first scheduled run after the newest archive
    late_after: datetime | None
    missing_after: datetime | None
    next_run: datetime | None
    last_success: RunSummary | None
    last_failure: RunSummary | None
    #: tar bytes of the archives, when any backend deduplicates (``stored_bytes``: what they added)
    logical_bytes: int | None = None

    @property
    def dedup_ratio(self) -> float | None:
        """Logical over stored bytes (compression and deduplication together)."""
        if self.logical_bytes is None or not self.stored_bytes:
            return None
        return round(self.logical_bytes / self.stored_bytes, 2)

    @property
    def target(self) -> str:
        """``namespace/workload/container``, with ``[replica]`` after the workload when it has one."""
        replica = f"[{self.replica}]" if self.replica else ""
        return f"{self.namespace}/{self.workload}{replica}/{self.container}"

    @property
    def timeline_complete(self) -> bool:
        return len(self.timeline) == self.archives

    @property
    def prune_remove(self) -> list[ArchivePoint]:
        """The removals on the timeline (``remove_archives`` counts them all)."""
        return [p for p in self.timeline if not p.keep]

    def to_json(self) -> dict[str, Any]:
        age = self.recovery_point_age
        return {
            "policy": self.policy, "namespace": self.namespace, "workload": self.workload, "replica": self.replica,
            "container": self.container, "status": self.status, "reason": self.reason, "failing": self.failing,
            "archives": self.archives, "stored_bytes": self.stored_bytes,
            "oldest": _ts(self.oldest), "newest": _ts(self.newest),
            "recovery_point_age_seconds": age.total_seconds() if age is not None else None,
            "due_at": _ts(self.due_at), "late_after": _ts(self.late_after), "missing_after": _ts(self.missing_after),
            "next_run": _ts(self.next_run),
            "last_success": self.last_success.to_json() if self.last_success else None,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "prune": {"remove_archives": self.remove_archives, "remove_bytes": self.remove_bytes,
                      "remove": [p.to_json() for p in self.prune_remove]},
            "timeline": [p.to_json() for p in self.timeline],
            "timeline_complete": self.timeline_complete,
            **({"logical_bytes": self.logical_bytes, "dedup_ratio": self.dedup_ratio}
               if self.logical_bytes is not None else {}),
        }


@dataclass(frozen=True)
class PolicyReport:
    name: str
    managed: bool  # False: archives of a policy that is no longer in the catalog, or cannot be applied
    schedule: str | None
    timezone: str | None
    backend: str | None
    period: timedelta | None
    next_run: datetime | None
    last_success: RunSummary | None
    last_failure: RunSummary | None
    last_prune: RunSummary | None
    last_verify: RunSummary | None
    workloads: tuple[WorkloadStatus, ...]
    storage: tuple[StoragePoint, ...]
    error: str | None = None  # why a stored policy cannot be applied (its archives are then UNMANAGED)

    @property
    def status(self) -> str:
        if not self.managed:
            return UNMANAGED
        return max((w.status for w in self.workloads), key=_SEVERITY.__getitem__, default=OK)

    @property
    def archives(self) -> int:
        return sum(w.archives for w in self.workloads)

    @property
    def stored_bytes(self) -> int:
        return sum(w.stored_bytes for w in self.workloads)

    @property
    def remove_archives(self) -> int:
        return sum(w.remove_archives for w in self.workloads)

    @property
    def remove_bytes(self) -> int:
        return sum(w.remove_bytes for w in self.workloads)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "managed": self.managed, "schedule": self.schedule, "timezone": self.timezone,
            "backend": self.backend, "period_seconds": self.period.total_seconds() if self.period else None,
            "status": self.status, "archives": self.archives, "stored_bytes": self.stored_bytes,
            "next_run": _ts(self.next_run),
            "last_success": self.last_success.to_json() if self.last_success else None,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "last_prune": self.last_prune.to_json() if self.last_prune else None,
            "last_verify": self.last_verify.to_json() if self.last_verify else None,
            "prune": {"remove_archives": self.remove_archives, "remove_bytes": self.remove_bytes},
            "storage": [s.to_json() for s in self.storage],
            "workloads": [w.to_json() for w in self.workloads],
            "error": self.error,
        }


@dataclass(frozen=True)
class Report:
    generated_at: datetime
    stale_intervals: int
    policies: tuple[PolicyReport, ...] = field(default_factory=tuple)

    def workloads(self) -> Iterator[WorkloadStatus]:
        for p in self.policies:
            yield from p.workloads

    def summary(self) -> dict[str, int]:
        workloads = list(self.workloads())
        counts = {s: sum(1 for w in workloads if w.status == s) for s in (OK, LATE, MISSING, UNMANAGED)}
        return {
            "policies": len(self.policies), "workloads": len(workloads),
            "ok": counts[OK], "late": counts[LATE], "missing": counts[MISSING], "unmanaged": counts[UNMANAGED],
            "failing": sum(1 for w in workloads if w.failing),
            "archives": sum(w.archives for w in workloads), "stored_bytes": sum(w.stored_bytes for w in workloads),
            "prune_remove_archives": sum(w.remove_archives for w in workloads),
            "prune_remove_bytes": sum(w.remove_bytes for w in workloads),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generated_at": _ts(self.generated_at),
            "stale_intervals": self.stale_intervals,
            "summary": self.summary(),
            "policies": [p.to_json() for p in self.policies],
        }


# -- building it (pure) --------------------------------------------------------------------


Assessment = tuple[str, datetime | None, datetime | None, datetime | None]


def assess(schedule: Schedule, newest: datetime | None, now: datetime,
           stale_intervals: int = DEFAULT_STALE_INTERVALS) -> Assessment:
    """``(status, due_at, late_after, missing_after)`` of a recovery point (module docstring)."""
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


def _age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def _hm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _reason(status: str, newest: datetime | None, now: datetime, due: datetime | None, failing: bool,
            last_failure: RunSummary | None, stale_intervals: int) -> str:
    if newest is None:
        if failing and last_failure is not None:
            return f"no archive: every run failed ({last_failure.error_kind or 'error'})"
        return "no archive yet"
    age = _age(now - newest)
    assert due is not None
    if status == OK:
        return f"newest archive {age} old; next due {_hm(due)}"
    if status == LATE:
        return f"newest archive {age} old; the run due {_hm(due)} left no archive"
    return f"newest archive {age} old: {stale_intervals} or more scheduled runs left no archive"


def _next_run(schedule: Schedule, last_started: datetime | None, now: datetime) -> datetime:
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
        """The target's latest cycle had a failure (module docstring: ``failing``)."""
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
            grouped.setdefault(a.group, []).append(a)
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
    return ReportFacts(tuple(policies), groups, runs_facts(runs, _group_by(policies)),
                       {name: storage_steps(downsample(series, STORAGE_POINTS)) for name, series in steps.items()})


def build_report(
    policies: Sequence[Policy],
    archives: Iterable[Planned],
    runs: Iterable[Run],
    now: datetime,
    *,
    stale_intervals: int = DEFAULT_STALE_INTERVALS,
) -> Report:
    """The retention report of ``policies`` at ``now``. Pure: same inputs, same report.

    ``archives``: the catalog's archives (only ``committed`` ones count); ``runs``: for each
    policy its recent checkpoint runs (at least the latest succeeded and failed run of every
    pod) and its latest finished prune and verify run; more is fine. Archives of policies not in ``policies`` are
    reported as ``UNMANAGED``; runs of such policies only where they have archives.
    """
    return assemble(facts_from_lists(policies, archives, runs), now, stale_intervals=stale_intervals)


def assemble(facts: ReportFacts, now: datetime, *, stale_intervals: int = DEFAULT_STALE_INTERVALS) -> Report:
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
    return Report(generated_at=now, stale_intervals=stale_intervals, policies=tuple(reports))


def _policy_report(policy: Policy, groups: list[GroupFacts], runs: PolicyRuns, storage: tuple[StoragePoint, ...],
                   now: datetime, stale_intervals: int) -> PolicyReport:
    schedule = policy.schedule
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


# -- the shell: reading the catalog ---------------------------------------------------------


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
                decided = decide(usable.get(stats.policy), newest, (0, 0, 0, 0) if complete else _older(stats, newest))
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
    runs = runs_facts(catalog.latest_runs(), _group_by(policies))
    return ReportFacts(tuple(policies), groups, runs, storage)


def _group_by(policies: Sequence[Policy | PolicyProblem]) -> dict[str, str]:
    return {p.name: p.spec.group_by for p in policies if isinstance(p, Policy)}


_BUCKET = {"hourly": timedelta(hours=1), "daily": timedelta(days=1), "weekly": timedelta(days=7),
           "monthly": timedelta(days=31), "yearly": timedelta(days=366)}


def first_read(policy: Policy | None, stats: GroupStats) -> int:
    """How many of a group's newest unpinned archives to read first: as many as the policy's
    rules reach back over, at the group's average spacing (plus a quarter), and at least a
    timeline's. Only a guess to save round trips: :func:`decide` says when it was too few."""
    if policy is None:
        return TIMELINE_POINTS
    rules = policy.rules
    counts = {name: getattr(rules, name) for name in ("last", *_BUCKET)}
    if -1 in counts.values():
        return max(stats.archives, 1)  # unlimited: every archive counts
    reach = [_BUCKET[name] * count for name, count in counts.items() if name in _BUCKET]
    for name in ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly"):
        d = getattr(rules, name)
        if d is not None:
            reach.append(timedelta(days=366 * d.years + 31 * d.months + d.days, hours=d.hours))
    spacing = (stats.newest - stats.oldest) / max(stats.archives - 1, 1)
    within = max(reach, default=timedelta(0)) / spacing if spacing else 0
    # every rule walks from the newest archive at once: the one reaching furthest decides
    return max(TIMELINE_POINTS, int(max(counts["last"], within) * 1.25) + 1)


def _older(stats: GroupStats, newest: list[ArchiveSummary]) -> tuple[int, int, int, int]:
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
                stale_intervals: int = DEFAULT_STALE_INTERVALS) -> Report:
    """The report of everything in the catalog, from its aggregates (:func:`facts_from_catalog`)."""
    moment = now or datetime.now(UTC)
    return assemble(facts_from_catalog(catalog, stored_policies(catalog), moment), moment,
                    stale_intervals=stale_intervals)


# -- rendering: text -------------------------------------------------------------------------


def _cell(moment: datetime | None) -> str:
    return _hm(moment) if moment is not None else "-"


def _table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _run_line(label: str, run: RunSummary | None) -> str:
    if run is None:
        return f"{label} -"
    text = f"{label} {_hm(run.started_at)}"
    if run.outcome == RUN_FAILED:
        text += f" {run.error_kind or 'error'}: {run.error or ''}".rstrip()
    return text


def render_table(report: Report) -> str:
    """The report as plain text for a terminal: a summary line, then a table per policy and the
    failures with their reasons."""
    s = report.summary()
    out = [
        f"retention report at {_hm(report.generated_at)}: {s['workloads']} workload(s): {s['ok']} OK, "
        f"{s['late']} LATE, {s['missing']} MISSING" + (f", {s['unmanaged']} UNMANAGED" if s["unmanaged"] else "")
        + (f" ({s['failing']} failing)" if s["failing"] else "")
        + f"; {s['archives']} archive(s), {human_bytes(s['stored_bytes'])} stored; next prune removes "
        f"{s['prune_remove_archives']} ({human_bytes(s['prune_remove_bytes'])})",
    ]
    if not report.policies:
        out.append("no policies and no archives in the catalog yet: apply one with `backupd policy apply -f FILE`")
    for p in report.policies:
        out.append("")
        if p.managed:
            out.append(f"policy {p.name} [{p.status}]: schedule {p.schedule!r} ({p.timezone}), backend {p.backend}, "
                       f"next run {_cell(p.next_run)}")
            out.append(f"  {_run_line('last success', p.last_success)}; "
                       f"{_run_line('last failure', p.last_failure)}")
            for label, run in (("last prune", p.last_prune), ("last verify", p.last_verify)):
                if run is not None and run.outcome == RUN_FAILED:
                    out.append("  " + _run_line(label + " failed", run))
        else:
            why = f"cannot be applied: {p.error}" if p.error else "no longer in the catalog"
            out.append(f"policy {p.name} [UNMANAGED]: {why}; its archives are neither scheduled nor pruned")
        if not p.workloads:
            out.append("  no workload has been checkpointed yet")
            continue
        replicas = any(w.replica for w in p.workloads)  # a column only where some workload has them
        rows = []
        for w in p.workloads:
            rows.append([
                w.status + ("!" if w.failing else ""), w.namespace, w.workload,
                *([w.replica or "-"] if replicas else []), w.container, str(w.archives),
                human_bytes(w.stored_bytes), _cell(w.oldest), _cell(w.newest),
                _age(w.recovery_point_age) if w.recovery_point_age is not None else "-",
                _cell(w.last_success.started_at if w.last_success else None),
                _cell(w.last_failure.started_at if w.last_failure else None),
                f"{w.remove_archives} ({human_bytes(w.remove_bytes)})" if w.remove_archives else "0",
            ])
        headers = ["status", "namespace", "workload", *(["replica"] if replicas else []), "container", "archives",
                   "stored", "oldest", "newest", "age",
                   "last success", "last failure", "prune removes"]
        out += ["  " + line for line in _table(rows, headers)]
        notes = [w for w in p.workloads if w.status != OK or w.failing]
        for w in notes:
            line = f"  {w.status}{' (failing)' if w.failing else ''} {w.target}: {w.reason}"
            if w.failing and w.last_failure is not None and w.newest is not None:
                line += f"; last run failed {_hm(w.last_failure.started_at)} {w.last_failure.error_kind}: " \
                        f"{w.last_failure.error or ''}".rstrip()
            out.append(line)
    if any(w.failing for w in report.workloads()):
        out.append("")
        out.append("! = the latest checkpoint run of this workload failed")
    return "\n".join(out) + "\n"


# -- rendering: HTML -------------------------------------------------------------------------

# One colour per rule family (a colour-blind-safe palette); the first reason picks the family.
_FAMILY_COLOURS = (
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
_COLOUR = {family: colour for family, colour, _ in _FAMILY_COLOURS}
_REMOVE_COLOUR = "#c0392b"


def _family(point: ArchivePoint) -> str:
    if point.pinned:
        return "pinned"
    first = point.reasons[0] if point.reasons else "no rule"
    first = first.removeprefix("oldest ")
    if first.startswith("within"):
        return "within"
    return first


_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 1.5rem;
       max-width: 1200px; color: #1d2329; background: #fff; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; } h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .25rem; font-family: ui-monospace, monospace; }
.muted { color: #5b6570; }
.badge { display: inline-block; padding: 0 .5em; border-radius: .6em; font-weight: 600; font-size: .85em;
         border: 1px solid transparent; }
.OK { background: #e3f4ea; color: #13582f; border-color: #9bd3b0; }
.LATE { background: #fff3d6; color: #7a4d00; border-color: #e8c36a; }
.MISSING { background: #fde4e1; color: #8a1c10; border-color: #eea79d; }
.UNMANAGED { background: #eceef0; color: #39424b; border-color: #c3c9cf; }
.failing { background: #8a1c10; color: #fff; }
.summary { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; margin: .75rem 0 1rem; }
.summary div { font-size: 1.05rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; font-size: .9em; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid #e1e5e9; vertical-align: top; }
th { background: #f5f7f9; font-weight: 600; }
.scroll { overflow-x: auto; }
td.target { overflow-wrap: anywhere; min-width: 10em; max-width: 22em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.time { white-space: nowrap; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .95em; }
.legend { display: flex; flex-wrap: wrap; gap: .25rem 1rem; list-style: none; padding: 0; margin: .5rem 0; }
.legend li { display: flex; align-items: center; gap: .35rem; }
.swatch { width: .8rem; height: .8rem; border-radius: 50%; display: inline-block; }
.swatch.remove { background: #fff; border: 2px solid #c0392b; width: .6rem; height: .6rem; }
.mark { display: inline-block; width: 0; height: .9rem; border-left: 2px dashed #1d2329; }
.mark.late { border-left: 2px solid #e8c36a; }
svg { display: block; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #5b6570; }
.error { color: #8a1c10; }
details { margin: .25rem 0 1rem; } summary { cursor: pointer; color: #1f5f99; }
section.policy { border-top: 2px solid #e1e5e9; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_TICK_STEPS = [timedelta(seconds=s) for s in (
    1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400,
    14 * 86400, 30 * 86400, 91 * 86400, 182 * 86400, 365 * 86400, 730 * 86400, 1826 * 86400)]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ticks(start: datetime, end: datetime, most: int = 6) -> tuple[list[datetime], str]:
    span = end - start
    step = next((s for s in _TICK_STEPS if span / s <= most), _TICK_STEPS[-1])
    first = _EPOCH + step * math.ceil((start - _EPOCH) / step)
    ticks = []
    t = first
    while t <= end and len(ticks) <= most + 1:
        ticks.append(t)
        t += step
    fmt = "%Y-%m-%d" if step >= timedelta(days=1) else ("%m-%d %H:%M" if span > timedelta(days=1) else "%H:%M:%S"
                                                         if step < timedelta(minutes=1) else "%H:%M")
    return ticks, fmt


class _Axis:
    """Maps times onto an SVG x range."""

    def __init__(self, start: datetime, end: datetime, left: float, right: float) -> None:
        if end <= start:
            start = end - timedelta(hours=1)
        self.start, self.end, self.left, self.right = start, end, left, right

    def x(self, t: datetime) -> float:
        frac = (t - self.start) / (self.end - self.start)
        return round(self.left + min(max(frac, 0.0), 1.0) * (self.right - self.left), 1)

    def svg(self, y: float) -> list[str]:
        parts = [f'<line x1="{self.left}" y1="{y}" x2="{self.right}" y2="{y}" stroke="#9aa4ae" stroke-width="1"/>']
        ticks, fmt = _ticks(self.start, self.end)
        for t in ticks:
            x = self.x(t)
            parts.append(f'<line x1="{x}" y1="{y}" x2="{x}" y2="{y + 4}" stroke="#9aa4ae"/>')
            parts.append(f'<text x="{x}" y="{y + 16}" text-anchor="middle">{_e(t.strftime(fmt))}</text>')
        return parts


_WIDTH = 1000


def _axis_range(points: Sequence[datetime], now: datetime, period: timedelta | None) -> tuple[datetime, datetime]:
    start = min(points) if points else now - (period or timedelta(hours=1)) * 4
    end = max([now, *points])
    pad = (end - start) / 40 or timedelta(minutes=1)
    return start - pad, end + pad


def _timeline_svg(w: WorkloadStatus, now: datetime, period: timedelta | None, ident: str) -> str:
    times = [p.time for p in w.timeline]
    axis = _Axis(*_axis_range(times, now, period), left=130, right=_WIDTH - 20)
    kept = [p for p in w.timeline if p.keep]
    removed = [p for p in w.timeline if not p.keep]
    families: dict[str, int] = {}
    for p in kept:
        families[_family(p)] = families.get(_family(p), 0) + 1
    kept_text = ", ".join(f"{n} {f}" for f, n in sorted(families.items(), key=lambda kv: -kv[1])) or "none"
    which = f"{len(w.timeline)}" if w.timeline_complete else f"The newest {len(w.timeline)} of {w.archives}"
    desc = (f"{which} archive(s) of {w.target} between {_cell(times[0] if times else None)} and "
            f"{_cell(w.newest)}: {len(kept)} kept ({kept_text}), {len(removed)} removed by the next prune. "
            f"Status {w.status}.")
    height = 86
    parts = [
        f'<svg viewBox="0 0 {_WIDTH} {height}" width="{_WIDTH}" height="{height}" role="img" '
        f'aria-labelledby="{ident}-t {ident}-d" class="timeline">',
        f'<title id="{ident}-t">Archive timeline of {_e(w.target)}</title>',
        f'<desc id="{ident}-d">{_e(desc)}</desc>',
        '<text x="4" y="27">kept</text>',
        '<text x="4" y="55">next prune removes</text>',
        f'<line x1="130" y1="23" x2="{_WIDTH - 20}" y2="23" stroke="#eef1f4" stroke-width="14"/>',
        f'<line x1="130" y1="51" x2="{_WIDTH - 20}" y2="51" stroke="#fbeeee" stroke-width="14"/>',
    ]
    parts += axis.svg(66)
    now_x = axis.x(now)
    parts.append(f'<line x1="{now_x}" y1="12" x2="{now_x}" y2="66" stroke="#1d2329" stroke-dasharray="3 3">'
                 f'<title>now: {_e(_cell(now))}</title></line>')
    if w.late_after is not None and w.late_after <= axis.end:
        x = axis.x(w.late_after)
        parts.append(f'<line x1="{x}" y1="12" x2="{x}" y2="66" stroke="#e8c36a" stroke-width="2">'
                     f'<title>late after {_e(_cell(w.late_after))}</title></line>')
    for p in w.timeline:
        reasons = ", ".join(p.reasons)
        label = (f"{p.id} at {_cell(p.time)}, {human_bytes(p.stored_size)}" + (", pinned" if p.pinned else "")
                 + (f": kept by {reasons}" if p.keep else f": next prune removes it ({reasons})"))
        x = axis.x(p.time)
        if p.keep:
            parts.append(f'<circle cx="{x}" cy="23" r="5" fill="{_COLOUR.get(_family(p), "#444")}" '
                         f'stroke="#fff" stroke-width="1"><title>{_e(label)}</title></circle>')
        else:
            parts.append(f'<g><title>{_e(label)}</title><circle cx="{x}" cy="51" r="4.5" fill="#fff" '
                         f'stroke="{_REMOVE_COLOUR}" stroke-width="2"/>'
                         f'<path d="M{x - 3} {48} L{x + 3} {54} M{x + 3} {48} L{x - 3} {54}" '
                         f'stroke="{_REMOVE_COLOUR}" stroke-width="1.5"/></g>')
    parts.append("</svg>")
    return "".join(parts)


def _storage_svg(p: PolicyReport, now: datetime, ident: str) -> str:
    series = list(p.storage)
    height, top, bottom = 180, 12, 150
    axis = _Axis(*_axis_range([s.time for s in series], now, p.period), left=70, right=_WIDTH - 20)
    peak = max((s.stored_bytes for s in series), default=0)
    desc = (f"Stored bytes of the archives policy {p.name} keeps now, accumulated by checkpoint time: "
            f"{human_bytes(peak)} in {p.archives} archive(s)"
            + (f", from {_cell(series[0].time)} to {_cell(series[-1].time)}." if series else "."))
    parts = [
        f'<svg viewBox="0 0 {_WIDTH} {height}" width="{_WIDTH}" height="{height}" role="img" '
        f'aria-labelledby="{ident}-t {ident}-d" class="storage">',
        f'<title id="{ident}-t">Retained storage of policy {_e(p.name)} over time</title>',
        f'<desc id="{ident}-d">{_e(desc)}</desc>',
    ]
    scale = peak or 1

    def y(v: int) -> float:
        return round(bottom - (bottom - top) * v / scale, 1)

    for frac in (0, 0.5, 1):
        v = int(peak * frac)
        parts.append(f'<line x1="70" y1="{y(v)}" x2="{_WIDTH - 20}" y2="{y(v)}" stroke="#eef1f4"/>')
        parts.append(f'<text x="64" y="{y(v) + 4}" text-anchor="end">{_e(human_bytes(v))}</text>')
    parts += axis.svg(bottom)
    if series:
        # A step line: the total only changes when an archive was taken. Many archives on one
        # pixel collapse to the last value there, so a big catalog stays a small page.
        coords: list[tuple[float, float]] = [(axis.x(series[0].time), y(0))]
        for s in series:
            x = axis.x(s.time)
            if coords and coords[-1][0] == x:
                coords[-1] = (x, y(s.stored_bytes))
                continue
            coords.append((x, coords[-1][1]))
            coords.append((x, y(s.stored_bytes)))
        coords.append((axis.x(max(now, series[-1].time)), coords[-1][1]))
        path = " ".join(f"{'M' if i == 0 else 'L'}{x} {yy}" for i, (x, yy) in enumerate(coords))
        area = path + f" L{coords[-1][0]} {bottom} L{coords[0][0]} {bottom} Z"
        parts.append(f'<path d="{area}" fill="#1f78b4" fill-opacity="0.12" stroke="none"/>')
        parts.append(f'<path d="{path}" fill="none" stroke="#1f78b4" stroke-width="2"/>')
    else:
        parts.append(f'<text x="{_WIDTH / 2}" y="{(top + bottom) / 2}" text-anchor="middle">no archives</text>')
    parts.append("</svg>")
    return "".join(parts)


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status)}">{_e(status)}</span>'


def _run_html(run: RunSummary | None) -> str:
    if run is None:
        return '<span class="muted">never</span>'
    text = f'<span class="mono time">{_e(_cell(run.started_at))}</span>'
    if run.outcome == RUN_FAILED:
        text += f' <span class="error"><strong>{_e(run.error_kind or "error")}</strong>: {_e(run.error or "")}</span>'
    return text


_ARCHIVE_TABLE_ROWS = 200
_KEEP, _REMOVE = "keep", '<strong class="error">remove</strong>'


def _workload_rows(p: PolicyReport) -> str:
    rows = []
    for w in p.workloads:
        failing = ' <span class="badge failing">failing</span>' if w.failing else ""
        age = _e(_age(w.recovery_point_age)) if w.recovery_point_age is not None else "none"
        rows.append(
            "<tr>"
            f"<td>{_badge(w.status)}{failing}</td>"
            f'<td class="mono target">{_e(w.target)}</td>'
            f'<td class="num">{w.archives}</td><td class="num">{_e(human_bytes(w.stored_bytes))}</td>'
            f'<td class="mono time">{_e(_cell(w.oldest))}<br>{_e(_cell(w.newest))}</td>'
            f'<td><strong>{age}</strong><br><span class="muted">{_e(w.reason)}</span></td>'
            f"<td>{_run_html(w.last_success)}</td><td>{_run_html(w.last_failure)}</td>"
            f'<td class="num">{w.remove_archives}<br>{_e(human_bytes(w.remove_bytes))}</td>'
            "</tr>"
        )
    return (
        '<div class="scroll"><table><caption class="muted">Workloads of this policy</caption><thead><tr>'
        '<th scope="col">Status</th><th scope="col">Namespace/workload[replica]/container</th>'
        '<th scope="col" class="num">Archives</th><th scope="col" class="num">Stored</th>'
        '<th scope="col">Oldest<br>newest</th><th scope="col">Recovery point age</th>'
        '<th scope="col">Last successful run</th><th scope="col">Last failed run</th>'
        '<th scope="col" class="num">Next prune removes</th>'
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _archive_table(w: WorkloadStatus) -> str:
    newest_first = list(reversed(w.timeline))
    shown = newest_first[:_ARCHIVE_TABLE_ROWS]
    rows = "".join(
        f'<tr><td class="mono">{_e(a.id)}</td><td class="mono time">{_e(_cell(a.time))}</td>'
        f'<td class="num">{_e(human_bytes(a.stored_size))}</td>'
        f"<td>{_KEEP if a.keep else _REMOVE}{' (pinned)' if a.pinned else ''}</td>"
        f"<td>{_e(', '.join(a.reasons))}</td></tr>"
        for a in shown
    )
    more = (f'<p class="muted">and {w.archives - len(shown)} older archive(s), not listed (the next prune '
            f"removes {w.remove_archives - len([a for a in shown if not a.keep])} of them)</p>"
            if w.archives > len(shown) else "")
    return (
        f"<details><summary>Archives of {_e(w.target)} ({w.archives}), newest first</summary>"
        '<table><thead><tr><th scope="col">Archive</th><th scope="col">Checkpoint time</th>'
        '<th scope="col" class="num">Stored</th><th scope="col">Next prune</th><th scope="col">Reasons</th>'
        f"</tr></thead><tbody>{rows}</tbody></table>{more}</details>"
    )


def _legend(report: Report) -> str:
    used = {_family(p) for w in report.workloads() for p in w.timeline if p.keep}
    items = [f'<li><span class="swatch" style="background:{colour}"></span>{_e(label)}</li>'
             for family, colour, label in _FAMILY_COLOURS if family in used]
    items.append('<li><span class="swatch remove"></span>removed by the next prune</li>')
    items.append('<li><span class="mark now"></span>now</li>')
    items.append('<li><span class="mark late"></span>LATE after this, without a newer archive</li>')
    return '<ul class="legend" aria-label="Timeline legend: which retention rule keeps each archive">' \
           + "".join(items) + "</ul>"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: inline CSS and SVG, no script, no external
    asset (its Content-Security-Policy forbids loading any). Every value from the cluster or the
    catalog is escaped."""
    s = report.summary()
    now = report.generated_at
    generated = _cell(now)
    body = [
        "<header>",
        "<h1>backupd retention report</h1>",
        f'<p class="muted">Generated {_e(generated)}. A workload is LATE when the run due after its newest '
        f"archive is more than half a schedule period overdue, and MISSING when {report.stale_intervals} "
        "scheduled runs have passed without an archive or it has none.</p>",
        '<div class="summary" role="group" aria-label="Summary">',
        f"<div>{_badge(OK)} {s['ok']}</div><div>{_badge(LATE)} {s['late']}</div>"
        f"<div>{_badge(MISSING)} {s['missing']}</div>"
        + (f"<div>{_badge(UNMANAGED)} {s['unmanaged']}</div>" if s["unmanaged"] else "")
        + (f'<div><span class="badge failing">failing</span> {s["failing"]}</div>' if s["failing"] else "")
        + f"<div>{s['archives']} archives, {_e(human_bytes(s['stored_bytes']))} stored</div>"
        f"<div>next prune removes {s['prune_remove_archives']} ({_e(human_bytes(s['prune_remove_bytes']))})</div>",
        "</div>",
        _legend(report),
        "</header><main>",
    ]
    if not report.policies:
        body.append("<p>No policies and no archives in the catalog yet.</p>")
    for i, p in enumerate(report.policies):
        pid = f"p{i}"
        body.append(f'<section class="policy" aria-labelledby="{pid}">')
        body.append(f'<h2 id="{pid}">Policy <span class="mono">{_e(p.name)}</span> {_badge(p.status)}</h2>')
        if p.managed:
            body.append(
                f'<p>Schedule <code>{_e(p.schedule)}</code> ({_e(p.timezone)}), backend <code>{_e(p.backend)}</code>; '
                f"next run <span class=\"mono\">{_e(_cell(p.next_run))}</span>. "
                f"{p.archives} archive(s), {_e(human_bytes(p.stored_bytes))}; the next prune removes "
                f"{p.remove_archives} ({_e(human_bytes(p.remove_bytes))}).</p>"
                f"<p>Last successful run: {_run_html(p.last_success)}. Last failed run: {_run_html(p.last_failure)}."
                + "".join(f" Last {kind} run <strong class=\"error\">failed</strong>: {_run_html(run)}."
                          for kind, run in (("prune", p.last_prune), ("verify", p.last_verify))
                          if run is not None and run.outcome == RUN_FAILED)
                + "</p>"
            )
        else:
            why = (f'cannot be applied: <span class="error">{_e(p.error)}</span>' if p.error
                   else "is no longer in the catalog")
            body.append(f"<p>This policy {why}. Its archives are neither scheduled nor pruned: fix it with "
                        "<code>backupd policy apply</code>, or delete or pin them explicitly.</p>")
        if not p.workloads:
            body.append('<p class="muted">No workload has been checkpointed by this policy yet.</p></section>')
            continue
        body.append(_workload_rows(p))
        body.append("<h3>Retained storage over time</h3>")
        body.append('<p class="muted">The bytes of the archives kept now, accumulated by checkpoint time: the '
                    "height at a moment is what is retained from before it (archives already pruned are gone "
                    "from this curve).</p>")
        body.append(_storage_svg(p, now, f"{pid}s"))
        for j, w in enumerate(p.workloads):
            wid = f"{pid}w{j}"
            body.append(f'<h3 id="{wid}h">{_e(w.target)} {_badge(w.status)}</h3>')
            body.append(_timeline_svg(w, now, p.period, wid))
            if w.timeline:
                body.append(_archive_table(w))
        body.append("</section>")
    body.append("</main>")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>backupd retention report {_e(generated)}</title><style>{_CSS}</style></head>\n<body>"
        + "\n".join(body) + "\n</body></html>\n"
    )
