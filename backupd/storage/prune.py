"""Pruning: retention plans applied to the catalog and backends, safely.

:func:`plan_policy` is pure: a policy and its committed archives in, one retention plan per
group (namespace + workload + replica + container) out: the replicas of a StatefulSet or a
DaemonSet each keep their own archives (see :func:`backupd.model.replica_of`). Archives of
workloads whose pods are gone are planned like any other: their groups still exist in the
catalog, so the same rules keep them (and the newest archive of a group is never removed).

:class:`Pruner` executes a plan with the delete protocol, the reverse of the commit protocol::

    rows committed -> deleting   (one UPDATE: from now on they are not listed as archives)
      -> manifests deleted      (batched: without its manifest an object is not an archive)
      -> objects deleted        (batched, idempotent)
      -> rows deleted

A crash anywhere leaves rows in ``deleting``; the next prune of the policy finishes them first.
Nothing is ever listed whose object is gone, and every object left behind is accounted for by a
``deleting`` row or swept as an orphan. Two daemons sharing a catalog never prune the same
policy at once: a lease in the catalog, with an expiry so a killed holder's lease lapses.

The protocol itself is :func:`delete_archives` and the lease :func:`take_policy_lease`: explicit
deletion (:mod:`backupd.delete`) uses both, so it never races a prune.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import attrgetter

import structlog

from backupd.backends.base import Backend
from backupd.catalog.store import Catalog
from backupd.errors import BackupdError, ConfigError, LeaseHeld
from backupd.metrics import Metrics
from backupd.model import COMMITTED, DELETING, FAILED, Archive, ArchiveSummary, now_utc
from backupd.policy import retention
from backupd.policy.document import Policy
from backupd.storage import layout
from backupd.storage.runs import RunRecord, recorded_run

log = structlog.get_logger("backupd.prune")

Planned = Archive | ArchiveSummary  # anything with the fields retention reads


@dataclass(frozen=True)
class Decision:
    archive: Planned
    keep: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class GroupPlan:
    """The retention plan of one group; ``decisions`` are built on demand (for display) since
    a plan may cover a million archives and the executor only needs ``remove``."""

    namespace: str
    workload: str
    replica: str
    container: str
    archives: tuple[Planned, ...]
    plan: retention.Plan

    @functools.cached_property
    def _by_id(self) -> dict[str, Planned]:
        return {a.id: a for a in self.archives}

    @property
    def decisions(self) -> list[Decision]:
        """Newest first, with reasons (``no rule`` for archives no rule keeps)."""
        by_id = self._by_id
        return [Decision(by_id[d.item.id], d.keep, d.reasons or ("no rule",)) for d in self.plan.decisions]

    @property
    def remove(self) -> list[Planned]:
        by_id = self._by_id
        return [by_id[d.item.id] for d in self.plan.remove]


_GROUP = attrgetter("namespace", "workload", "replica", "container")


def plan_policy(policy: Policy, archives: Iterable[Planned]) -> list[GroupPlan]:
    """One retention plan per group of the policy's committed archives, groups in order. Pure."""
    groups: dict[tuple[str, str, str, str], list[Planned]] = {}
    for archive in archives:
        if archive.state == COMMITTED and archive.policy == policy.name:
            groups.setdefault(_GROUP(archive), []).append(archive)
    plans = []
    for (namespace, workload, replica, container), members in sorted(groups.items()):
        items = [retention.Item(a.id, a.checkpoint_time, a.stored_size or 0, a.pinned) for a in members]
        plans.append(GroupPlan(namespace, workload, replica, container, tuple(members),
                               retention.plan(items, policy.rules, tz=policy.tz)))
    return plans


@dataclass
class PruneResult:
    policy: str
    dry_run: bool
    plans: list[GroupPlan] = field(default_factory=list)
    resumed: list[Archive] = field(default_factory=list)  # rows a crashed prune left in deleting
    deleted: list[Archive] = field(default_factory=list)
    failed_rows_removed: int = 0
    error: BackupdError | None = None

    @property
    def removals(self) -> list[Planned]:
        return [a for p in self.plans for a in p.remove]

    @property
    def bytes_freed(self) -> int:
        return sum(a.stored_size or 0 for a in self.deleted)


def lease_holder() -> str:
    """``host:pid:random`` -- enough for a restarted daemon to recognise its dead predecessors."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


def holder_is_dead(holder: str) -> bool:
    """True for a holder on this host whose process is gone (a previous, killed incarnation).

    Holders on other hosts are never judged: their leases simply expire.
    """
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != os.uname().nodename or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_dead_leases(catalog: Catalog) -> list[str]:
    """Free leases left by killed processes on this host, so a restart does not wait for expiry."""
    freed = []
    for name, holder in catalog.lease_holders().items():
        if holder_is_dead(holder):
            catalog.release_lease(name, holder)
            freed.append(name)
    if freed:
        log.info("dead_leases_released", leases=freed)
    return freed


def take_policy_lease(catalog: Catalog, policy: str, holder: str, ttl: timedelta) -> str:
    """Take the ``prune/<policy>`` lease that every prune and delete of the policy's archives
    holds; returns its name (release it with ``catalog.release_lease(name, holder)``).

    A lease of a killed process on this host is freed rather than waited for. With the lease
    ours, prune and delete runs of the policy still ``running`` belong to a holder that died:
    they are recorded as interrupted. Raises :class:`LeaseHeld` while a live holder has it.
    """
    lease = f"prune/{policy}"
    if not catalog.acquire_lease(lease, holder, ttl) and not (
        release_dead_leases(catalog) and catalog.acquire_lease(lease, holder, ttl)
    ):
        raise LeaseHeld(f"another backupd is pruning policy {policy!r} or deleting its archives; try again later")
    for kind in ("prune", "delete"):
        catalog.fail_interrupted_runs(kind=kind, policy=policy)
    return lease


def check_backends(archives: Iterable[Archive], backends: dict[str, Backend]) -> None:
    """Raise :class:`ConfigError` naming the backends that archives are in but the config lacks."""
    missing: dict[str, list[str]] = {}
    for a in archives:
        if a.backend not in backends:
            missing.setdefault(a.backend, []).append(a.id)
    if missing:
        name, ids = next(iter(missing.items()))
        raise ConfigError(
            f"archive(s) {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} are in backend {name!r}, which is not "
            f"configured: add a [[backends]] entry named {name!r} to delete them; nothing was deleted"
        )


def delete_archives(catalog: Catalog, backends: dict[str, Backend], archives: Sequence[Archive],
                    deleted: list[Archive] | None = None) -> list[Archive]:
    """The delete protocol: rows to ``deleting``, then per backend, batched, manifests, objects, rows.

    Rows still ``committed`` are marked ``deleting`` first, in one transaction (all or
    nothing: if one is no longer committed, :class:`CatalogError` and none is marked), then
    ``failed`` ones the same way. From then on they are not listed and are certain to go: a
    failure or crash later leaves ``deleting`` rows that the next holder of the policy's lease
    finishes. Call it holding that lease (:func:`take_policy_lease`).

    Each backend's archives are appended to ``deleted`` once their rows are gone, so a caller
    knows what a failure part-way had already done; returns ``deleted``. Backend errors
    propagate (``delete_many`` is idempotent: running the protocol again is always safe).
    """
    done = deleted if deleted is not None else []
    check_backends(archives, backends)
    for state in (COMMITTED, FAILED):
        ids = [a.id for a in archives if a.state == state]
        if ids:
            catalog.set_state(ids, DELETING, expect=state)
    by_backend: dict[str, list[Archive]] = {}
    for a in archives:
        by_backend.setdefault(a.backend, []).append(a)
    for name, members in by_backend.items():
        backend = backends[name]
        backend.delete_many([layout.manifest_key(a.key) for a in members])
        backend.delete_many([a.key for a in members])
        catalog.delete_archive_rows([a.id for a in members])
        for a in members:
            log.info("archive_deleted", archive_id=a.id, key=a.key, backend=name, policy=a.policy)
        done.extend(members)
    return done


class Pruner:
    def __init__(
        self,
        catalog: Catalog,
        backends: dict[str, Backend],
        *,
        holder: str | None = None,
        node: str = "",
        lease_ttl: timedelta = timedelta(minutes=15),
        failed_row_age: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = now_utc,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.catalog = catalog
        self.backends = backends
        self.holder = holder or lease_holder()
        self.node = node or self.holder.split(":")[0]
        self.lease_ttl = lease_ttl
        self.failed_row_age = failed_row_age
        self.clock = clock

    def plan(self, policy: Policy) -> list[GroupPlan]:
        return plan_policy(policy, self.catalog.list_archive_summaries(policy.name))

    def prune(self, policy: Policy, *, dry_run: bool = False) -> PruneResult:
        """Apply the policy's retention now. Dry-run returns the same plan and changes nothing.

        Raises :class:`LeaseHeld` when another daemon is pruning this policy.
        """
        result = PruneResult(policy.name, dry_run)
        if dry_run:
            result.plans = self.plan(policy)
            result.resumed = self.catalog.list_archives(policy=policy.name, states=(DELETING,))
            return result
        lease = take_policy_lease(self.catalog, policy.name, self.holder, self.lease_ttl)
        run: RunRecord | None = None
        try:
            with recorded_run(self.catalog, self.metrics, "prune", policy=policy.name, node=self.node, log=log,
                              event="prune_finished") as run:
                run.fields["policy"] = policy.name
                try:
                    self._prune(policy, lease, result)
                finally:
                    run.bytes_in = result.bytes_freed
                    self.metrics.prune_deletions.labels(policy=policy.name).inc(len(result.deleted))
                run.fields.update(deleted=len(result.deleted), bytes_freed=result.bytes_freed,
                                  kept=sum(len(p.plan.keep) for p in result.plans))
        except BackupdError as exc:
            if run is None or run.run is None:
                raise  # the catalog could not record the run at all
            result.error = exc  # recorded, counted and logged
        finally:
            self.catalog.release_lease(lease, self.holder)
        return result

    def _prune(self, policy: Policy, lease: str, result: PruneResult) -> None:
        result.resumed = self.catalog.list_archives(policy=policy.name, states=(DELETING,))
        if result.resumed:
            log.info("prune_resumed", policy=policy.name, archives=len(result.resumed))
            delete_archives(self.catalog, self.backends, result.resumed, result.deleted)
        result.plans = self.plan(policy)
        doomed = self.catalog.get_archives([a.id for a in result.removals])
        if doomed:
            self.catalog.acquire_lease(lease, self.holder, self.lease_ttl)  # renew before the slow part
            delete_archives(self.catalog, self.backends, doomed, result.deleted)
        result.failed_rows_removed = self._remove_failed_rows(policy)

    def _remove_failed_rows(self, policy: Policy) -> int:
        """Failed commits leave a row (and maybe an object the pipeline could not delete)."""
        cutoff = self.clock() - self.failed_row_age
        failed = [a for a in self.catalog.list_archives(policy=policy.name, states=(FAILED,)) if a.created_at < cutoff]
        if failed:
            delete_archives(self.catalog, self.backends, failed)
        return len(failed)


@dataclass
class OrphanReport:
    backend: str
    orphans: list[str] = field(default_factory=list)  # object keys without a manifest
    removed: list[str] = field(default_factory=list)


def find_orphans(catalog: Catalog, backend: Backend, *, grace: timedelta, now: datetime,
                 prefix: str = "") -> OrphanReport:
    """Archive objects with no manifest, older than ``grace``, not owned by an in-flight row.

    An upload in progress has its object before its manifest for a moment; its row is
    ``pending`` and its object young, so neither the grace period nor the row lets it be
    mistaken for an orphan. Keys outside the storage layout are never touched.
    """
    report = OrphanReport(backend.name)
    objects = {}
    manifests = set()
    for info in backend.list(prefix):
        parsed = layout.parse_key(info.key)
        if parsed is None:
            continue
        if parsed.is_manifest:
            manifests.add(info.key)
        else:
            objects[info.key] = info
    if not objects:
        return report
    rows = catalog.archive_keys(backend.name)
    for key, info in sorted(objects.items()):
        if layout.manifest_key(key) in manifests:
            continue
        if rows.get(key) in ("pending", DELETING):
            continue
        if now - info.modified >= grace:
            report.orphans.append(key)
    return report


def remove_orphans(catalog: Catalog, backend: Backend, *, grace: timedelta, now: datetime,
                   prefix: str = "") -> OrphanReport:
    report = find_orphans(catalog, backend, grace=grace, now=now, prefix=prefix)
    if report.orphans:
        backend.delete_many(report.orphans)
        report.removed = list(report.orphans)
        log.info("orphans_removed", backend=backend.name, count=len(report.removed))
    return report
