"""Explicit deletion: ``backupd delete`` and ``policy delete --purge``, possible and certain.

Checkpoints hold process memory, secrets included: an operator must be able to delete any
archive whatever retention says, including archives of policies that no longer exist (a row
names its own policy and backend). :meth:`Deleter.plan` resolves what was named -- archive ids
or unique id prefixes, or filters AND-ed together (policy, namespace, workload, pod,
container, older than a restic duration) -- and checks it before anything is touched, all or
nothing:

* ``pending`` archives are never deleted (their commit is in flight): named by id they are
  refused, matched by filters they are left out and reported;
* pinned archives are refused unless forced;
* every archive's backend must be configured.

:meth:`Deleter.delete` then deletes them with prune's own delete protocol
(:func:`backupd.storage.prune.delete_archives`: rows ``deleting``, manifests, objects, rows), holding
each affected policy's ``prune/<policy>`` lease so no prune races it, and records one
``delete`` run per policy (bytes freed in ``bytes_in``, as prune does).

A crash leaves ``deleting`` rows, which the same delete run again finishes (a selection
still names them). Otherwise those of an existing policy are finished by its next prune; those
of a policy that no longer exists have no prune, so :meth:`Deleter.finish_leftovers` finishes
them, from ``backupd prune`` and the daemon's hourly maintenance.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from backupd.backends.base import Backend
from backupd.catalog.store import Catalog
from backupd.errors import BackupdError, InvalidInput, LeaseHeld, NotFound
from backupd.metrics import Metrics
from backupd.model import COMMITTED, DELETING, FAILED, PENDING, Archive, now_utc
from backupd.policy import retention
from backupd.sizes import human_bytes
from backupd.storage.prune import PruneResult, check_backends, delete_archives, lease_holder, take_policy_lease
from backupd.storage.runs import recorded_run

log = structlog.get_logger("backupd.delete")

#: states an archive can be deleted from (``pending``: a commit is in flight)
DELETABLE = (COMMITTED, FAILED, DELETING)


def _ids(archives: Iterable[Archive], limit: int = 10) -> str:
    ids = [a.id for a in archives]
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _by_policy(archives: Iterable[Archive]) -> dict[str, list[Archive]]:
    groups: dict[str, list[Archive]] = {}
    for a in archives:
        groups.setdefault(a.policy, []).append(a)
    return dict(sorted(groups.items()))


def stored_bytes(archives: Iterable[Archive]) -> int:
    return sum(a.stored_size or 0 for a in archives)


@dataclass(frozen=True)
class Selection:
    """What to delete: ``ids`` (full ids or unique prefixes), or filters AND-ed together."""

    ids: tuple[str, ...] = ()
    policy: str | None = None
    namespace: str | None = None
    workload: str | None = None
    pod: str | None = None
    container: str | None = None
    older_than: retention.Duration | None = None

    @property
    def filters(self) -> dict[str, Any]:
        """The equality filters given (``older_than`` aside)."""
        named = {"policy": self.policy, "namespace": self.namespace, "workload": self.workload, "pod": self.pod,
                 "container": self.container}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def by_filter(self) -> bool:
        return not self.ids

    def check(self) -> None:
        """Raise :class:`InvalidInput` unless exactly one of the two forms is given."""
        has_filter = bool(self.filters) or self.older_than is not None
        if self.ids and has_filter:
            raise InvalidInput("give archive IDs or filters (--policy, --namespace, --workload, --pod, --container, "
                               "--older-than), not both")
        if not self.ids and not has_filter:
            raise InvalidInput("name what to delete: archive IDs, or at least one of --policy, --namespace, "
                               "--workload, --pod, --container, --older-than")


@dataclass(frozen=True)
class Plan:
    """What a delete will remove (oldest first), and what the filters matched but it leaves."""

    selection: Selection
    archives: list[Archive]
    pending: list[Archive] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return stored_bytes(self.archives)


@dataclass
class DeleteResult:
    plan: Plan
    deleted: list[Archive] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)
    error: BackupdError | None = None

    @property
    def bytes_freed(self) -> int:
        return stored_bytes(self.deleted)


def select(catalog: Catalog, selection: Selection, *, now: datetime) -> list[Archive]:
    """The catalog rows a selection names, in any state, oldest first.

    Ids resolve as ``pin`` and ``restore`` resolve them (a full id or a unique prefix of at
    least 4 characters; :class:`NotFound` or :class:`InvalidInput` otherwise). ``older_than``
    keeps archives taken before ``now`` minus the duration (restic's calendar arithmetic).
    """
    selection.check()
    if selection.ids:
        found: dict[str, Archive] = {}
        for ref in selection.ids:
            archive = catalog.get_archive(ref)
            found.setdefault(archive.id, archive)
        return sorted(found.values(), key=lambda a: (a.checkpoint_time, a.id))
    archives = catalog.list_archives(**selection.filters, states=(PENDING, *DELETABLE))
    if selection.older_than is not None:
        try:
            cutoff = selection.older_than.cutoff(now)
        except OverflowError:
            return []  # the cutoff is before year 1: nothing is that old
        archives = [a for a in archives if a.checkpoint_time < cutoff]
    return archives


class Deleter:
    """Plans and executes explicit deletions; see the module docstring for the rules."""

    #: the policy leases' lifetime, renewed before each policy's deletion (as prune does)
    lease_ttl = timedelta(minutes=15)

    def __init__(self, catalog: Catalog, backends: dict[str, Backend], *, holder: str | None = None, node: str = "",
                 metrics: Metrics | None = None) -> None:
        self.catalog = catalog
        self.backends = backends
        self.holder = holder or lease_holder()
        self.node = node or self.holder.split(":")[0]
        self.metrics = metrics or Metrics()

    def plan(self, selection: Selection, *, force: bool = False) -> Plan:
        """Exactly what :meth:`delete` would remove. Changes nothing.

        Raises :class:`InvalidInput` for a bad selection, a pending archive named by id or a
        pinned archive without ``force``; :class:`NotFound` for an unknown id;
        :class:`ConfigError` for an archive in a backend the config lacks.
        """
        archives = select(self.catalog, selection, now=now_utc())
        pending = [a for a in archives if a.state == PENDING]
        if pending and selection.ids:
            raise InvalidInput(f"archive(s) {_ids(pending)} are pending: a commit is in flight; nothing was deleted "
                               "(delete them once committed)")
        plan = Plan(selection, [a for a in archives if a.state != PENDING], pending)
        self._check(plan.archives, force=force)
        return plan

    def _check(self, archives: list[Archive], *, force: bool) -> None:
        pinned = [a for a in archives if a.pinned and a.state != DELETING]  # deleting: already on its way
        if pinned and not force:
            raise InvalidInput(
                f"{len(pinned)} pinned archive(s) selected: {_ids(pinned)}; nothing was deleted. Unpin them "
                "(`backupd unpin ID`) or add --force to delete pinned archives too"
            )
        check_backends(archives, self.backends)

    def delete(self, plan: Plan, *, force: bool = False) -> DeleteResult:
        """Delete the planned archives: every affected policy's lease first, then per policy one
        ``delete`` run through the delete protocol.

        Raises :class:`LeaseHeld` (nothing deleted) if a live prune or delete holds one of the
        leases, and what :meth:`plan` raises if the rows changed meanwhile (a pin). A failure
        part-way is returned in ``error``, with what was deleted before it; the rows it left
        are ``deleting`` and are finished by running the same delete again, or by the next prune.
        """
        result = DeleteResult(plan)
        leases: dict[str, str] = {}
        try:
            for name in sorted({a.policy for a in plan.archives}):
                leases[name] = take_policy_lease(self.catalog, name, self.holder, self.lease_ttl)
            # The rows as they are now, under the leases: a prune may have removed some (gone
            # already is fine), someone may have pinned one since the plan was printed.
            current = self.catalog.get_archives([a.id for a in plan.archives])
            self._check(current, force=force)
            for name, members in _by_policy(current).items():
                self.catalog.acquire_lease(leases[name], self.holder, self.lease_ttl)  # renew: earlier ones took time
                run_id, error = self._delete_policy(name, members, result.deleted)
                result.run_ids.append(run_id)
                if error is not None:
                    result.error = error
                    break
        finally:
            for lease in leases.values():
                self.catalog.release_lease(lease, self.holder)
        return result

    def _delete_policy(self, policy: str, archives: list[Archive],
                       deleted: list[Archive]) -> tuple[int, BackupdError | None]:
        """One ``delete`` run: the archives of one policy, the policy's lease held."""
        with recorded_run(self.catalog, self.metrics, "delete", policy=policy, node=self.node, log=log,
                          event="delete_finished") as run:
            done: list[Archive] = []
            try:
                delete_archives(self.catalog, self.backends, archives, done)
            except BackupdError as exc:
                run.error = exc
            deleted.extend(done)
            run.bytes_in = stored_bytes(done)
            run.fields.update(policy=policy, deleted=len(done), bytes_freed=run.bytes_in)
            if run.error is not None:
                run.fields["left"] = len(archives) - len(done)
        return run.id, run.error

    def finish_leftovers(self, existing: Collection[str], *, dry_run: bool = False) -> list[PruneResult]:
        """Finish the ``deleting`` rows of policies not in ``existing`` (a crash during a delete
        or a prune of a policy deleted since): nothing else would, since only a policy's own
        prune resumes its rows. A policy whose lease a live holder has is skipped: that holder
        is at it. Results in prune's shape (``resumed``, ``deleted``, ``error``)."""
        results = []
        leftovers = [a for a in self.catalog.list_archives(states=(DELETING,)) if a.policy not in existing]
        for name, members in _by_policy(leftovers).items():
            if dry_run:
                results.append(PruneResult(name, dry_run, resumed=members))
                continue
            try:
                lease = take_policy_lease(self.catalog, name, self.holder, self.lease_ttl)
            except LeaseHeld as exc:
                log.info("leftovers_skipped", policy=name, reason=str(exc))
                continue
            try:
                result = PruneResult(name, dry_run, resumed=self.catalog.list_archives(policy=name, states=(DELETING,)))
                if result.resumed:
                    log.info("delete_resumed", policy=name, archives=len(result.resumed))
                    _run_id, result.error = self._delete_policy(name, result.resumed, result.deleted)
                    results.append(result)
            finally:
                self.catalog.release_lease(lease, self.holder)
        return results


def policy_gone(catalog: Catalog, name: str) -> NotFound:
    """The error for a policy that is not in the catalog, saying what to do about the archives
    it left (nothing prunes them)."""
    left = catalog.list_archives(policy=name)
    if not left:
        return NotFound(f"no policy named {name!r}")
    return NotFound(
        f"no policy named {name!r}, but it still has {len(left)} archive(s) ({human_bytes(stored_bytes(left))}) that "
        f"nothing prunes: delete them with `backupd delete --policy {name} --yes` (add --dry-run first to list "
        "them), or pin what must stay"
    )
