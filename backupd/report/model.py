"""The report's values and their JSON (the contract is in :mod:`backupd.report`), and how the
report writes times and ages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, overload

from pydantic import WithJsonSchema
from typing_extensions import NotRequired, TypedDict  # noqa: UP035  pydantic reads typing's TypedDict only from Python 3.12

from backupd.model import Run, rfc3339

OK, LATE, MISSING, UNMANAGED = "OK", "LATE", "MISSING", "UNMANAGED"
SEVERITY = {OK: 0, UNMANAGED: 1, LATE: 2, MISSING: 3}
FORMAT = "backupd.report/v1"


@overload
def json_time(moment: datetime) -> str: ...
@overload
def json_time(moment: None) -> None: ...
@overload
def json_time(moment: datetime | None) -> str | None: ...
def json_time(moment: datetime | None) -> str | None:
    """A moment as the JSON writes it (:func:`backupd.model.rfc3339`); None stays None."""
    return rfc3339(moment) if moment is not None else None


# -- the JSON, field by field ------------------------------------------------------------------
# What each to_json below returns: mypy holds every to_json to its type, and the OpenAPI schema
# of /api/v1/report is generated from RetentionReportJson (backupd.daemon.api).

Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]  # RFC 3339, UTC, "Z"


class RunJson(TypedDict):
    id: int
    kind: str
    outcome: str
    policy: str | None
    namespace: str | None
    pod: str | None
    workload: str | None
    container: str | None
    node: str
    started_at: Time
    finished_at: Time | None
    error_kind: str | None
    error: str | None


class ArchivePointJson(TypedDict):
    id: str
    time: Time
    stored_size: int
    pinned: bool
    keep: bool
    reasons: list[str]


class StoragePointJson(TypedDict):
    time: Time
    stored_bytes: int


class WorkloadPruneJson(TypedDict):
    remove_archives: int
    remove_bytes: int
    remove: list[ArchivePointJson]


class WorkloadJson(TypedDict):
    policy: str
    namespace: str
    workload: str
    replica: str
    container: str
    status: str
    reason: str
    failing: bool
    archives: int
    stored_bytes: int
    oldest: Time | None
    newest: Time | None
    recovery_point_age_seconds: float | None
    due_at: Time | None
    late_after: Time | None
    missing_after: Time | None
    next_run: Time | None
    last_success: RunJson | None
    last_failure: RunJson | None
    prune: WorkloadPruneJson
    timeline: list[ArchivePointJson]
    timeline_complete: bool
    #: only when a backend has ``format = "dedup"``: the archives' tar bytes, and their ratio
    #: to ``stored_bytes`` (what the archives added to the backend)
    logical_bytes: NotRequired[int]
    dedup_ratio: NotRequired[float | None]


class PolicyPruneJson(TypedDict):
    remove_archives: int
    remove_bytes: int


class PolicyJson(TypedDict):
    name: str
    managed: bool
    schedule: str | None
    timezone: str | None
    backend: str | None
    period_seconds: float | None
    status: str
    archives: int
    stored_bytes: int
    next_run: Time | None
    last_success: RunJson | None
    last_failure: RunJson | None
    last_prune: RunJson | None
    last_verify: RunJson | None
    prune: PolicyPruneJson
    storage: list[StoragePointJson]
    workloads: list[WorkloadJson]
    error: str | None


class SummaryJson(TypedDict):
    policies: int
    workloads: int
    ok: int
    late: int
    missing: int
    unmanaged: int
    failing: int
    archives: int
    stored_bytes: int
    prune_remove_archives: int
    prune_remove_bytes: int


class RetentionReportJson(TypedDict):
    format: str
    generated_at: Time
    stale_intervals: int
    summary: SummaryJson
    policies: list[PolicyJson]


def format_moment(moment: datetime | None) -> str:
    """A moment as the table and the page show it (``2026-03-02 03:00:00Z``); ``-`` for none."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_age(delta: timedelta) -> str:
    """An age in its two largest units (``2d3h``, ``1h05m``, ``7m``, ``12s``); never negative."""
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

    def to_json(self) -> RunJson:
        return {
            "id": self.id, "kind": self.kind, "outcome": self.outcome, "policy": self.policy,
            "namespace": self.namespace, "pod": self.pod, "workload": self.workload, "container": self.container,
            "node": self.node, "started_at": json_time(self.started_at), "finished_at": json_time(self.finished_at),
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

    def to_json(self) -> ArchivePointJson:
        return {"id": self.id, "time": json_time(self.time), "stored_size": self.stored_size, "pinned": self.pinned,
                "keep": self.keep, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class StoragePoint:
    """A step of a policy's storage curve: the stored bytes of its kept archives up to ``time``."""

    time: datetime
    stored_bytes: int

    def to_json(self) -> StoragePointJson:
        return {"time": json_time(self.time), "stored_bytes": self.stored_bytes}


@dataclass(frozen=True)
class WorkloadStatus:
    """One retention group's protection: ``status`` as :mod:`backupd.report` defines it."""

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

    def to_json(self, *, timelines: bool = True) -> WorkloadJson:
        """``timelines`` False: without the archive points (``timeline`` and ``prune.remove``
        empty, ``timeline_complete`` true only for a workload without archives)."""
        age = self.recovery_point_age
        timeline = self.timeline if timelines else ()
        out: WorkloadJson = {
            "policy": self.policy, "namespace": self.namespace, "workload": self.workload, "replica": self.replica,
            "container": self.container, "status": self.status, "reason": self.reason, "failing": self.failing,
            "archives": self.archives, "stored_bytes": self.stored_bytes,
            "oldest": json_time(self.oldest), "newest": json_time(self.newest),
            "recovery_point_age_seconds": age.total_seconds() if age is not None else None,
            "due_at": json_time(self.due_at), "late_after": json_time(self.late_after),
            "missing_after": json_time(self.missing_after),
            "next_run": json_time(self.next_run),
            "last_success": self.last_success.to_json() if self.last_success else None,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "prune": {"remove_archives": self.remove_archives, "remove_bytes": self.remove_bytes,
                      "remove": [p.to_json() for p in timeline if not p.keep]},
            "timeline": [p.to_json() for p in timeline],
            "timeline_complete": len(timeline) == self.archives,
        }
        if self.logical_bytes is not None:
            out["logical_bytes"], out["dedup_ratio"] = self.logical_bytes, self.dedup_ratio
        return out


@dataclass(frozen=True)
class PolicyReport:
    """One policy's part of the report: its schedule, latest runs, workloads and storage curve."""

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
        return max((w.status for w in self.workloads), key=SEVERITY.__getitem__, default=OK)

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

    def to_json(self, *, timelines: bool = True) -> PolicyJson:
        return {
            "name": self.name, "managed": self.managed, "schedule": self.schedule, "timezone": self.timezone,
            "backend": self.backend, "period_seconds": self.period.total_seconds() if self.period else None,
            "status": self.status, "archives": self.archives, "stored_bytes": self.stored_bytes,
            "next_run": json_time(self.next_run),
            "last_success": self.last_success.to_json() if self.last_success else None,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "last_prune": self.last_prune.to_json() if self.last_prune else None,
            "last_verify": self.last_verify.to_json() if self.last_verify else None,
            "prune": {"remove_archives": self.remove_archives, "remove_bytes": self.remove_bytes},
            "storage": [s.to_json() for s in self.storage],
            "workloads": [w.to_json(timelines=timelines) for w in self.workloads],
            "error": self.error,
        }


@dataclass(frozen=True)
class RetentionReport:
    """The whole report: every policy's, at ``generated_at``."""

    generated_at: datetime
    stale_intervals: int
    policies: tuple[PolicyReport, ...] = field(default_factory=tuple)

    def workloads(self) -> Iterator[WorkloadStatus]:
        for p in self.policies:
            yield from p.workloads

    def summary(self) -> SummaryJson:
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

    def to_json(self, *, timelines: bool = True) -> RetentionReportJson:
        """The report as JSON (:mod:`backupd.report`); ``timelines`` False leaves out every
        workload's archive points, which are most of a big report's bytes."""
        return {
            "format": FORMAT,
            "generated_at": json_time(self.generated_at),
            "stale_intervals": self.stale_intervals,
            "summary": self.summary(),
            "policies": [p.to_json(timelines=timelines) for p in self.policies],
        }

