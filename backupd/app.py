"""The composition root: builds catalog, backends, kubelet client and workers from a Config.

Everything is created lazily, so a command only touches what it needs (``policy list`` never
opens a TLS connection; ``retention simulate`` never opens the database). The daemon's
housekeeping -- what runs after each policy's cycle and once an hour -- is wired here too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog

from backupd.backends import Backends, BackendWrapper, open_backends
from backupd.catalog.store import Catalog
from backupd.config import Config
from backupd.daemon.alerts import Notifier, check_and_alert, notifier_from_config
from backupd.daemon.api import Api
from backupd.daemon.http import HttpServer
from backupd.daemon.scheduler import CycleResult, Daemon, Runner
from backupd.errors import BackupdError, ConfigError, IntegrityError, LeaseHeld, NotFound
from backupd.metrics import Metrics
from backupd.model import now_utc
from backupd.node.checkpoints import CheckpointDir
from backupd.node.kubelet import KubeletClient
from backupd.policy.document import Policy
from backupd.report.cache import ReportCache
from backupd.report.load import load_report
from backupd.report.model import RetentionReport
from backupd.storage.commit import Pipeline
from backupd.storage.dedup.gc import GcReport, collect
from backupd.storage.dedup.ids import ChunkIds
from backupd.storage.delete import Deleter
from backupd.storage.prune import Pruner, lease_holder, remove_orphans
from backupd.storage.runs import recorded_run
from backupd.storage.transfer import parse_recipients
from backupd.storage.verify import VerifyReport, choose_sample, verify

log = structlog.get_logger("backupd.app")


class App:
    """``wrap_backend`` wraps each configured backend beneath its retry wrapper (the test
    suite's fault injection; see :data:`backupd.backends.BackendWrapper`)."""

    def __init__(self, config: Config, *, wrap_backend: BackendWrapper | None = None) -> None:
        self.config = config
        self.holder = lease_holder()
        self.wrap_backend = wrap_backend

    @functools.cached_property
    def catalog(self) -> Catalog:
        return Catalog.open(self.config.database.resolved_url())

    @functools.cached_property
    def backends(self) -> Backends:
        return open_backends(self.config.backends, wrap=self.wrap_backend)

    @functools.cached_property
    def kubelet(self) -> KubeletClient:
        return KubeletClient(self.config.kubelet)

    @property
    def node(self) -> str:
        return self.config.kubelet.node()

    @functools.cached_property
    def metrics(self) -> Metrics:
        metrics = Metrics()
        metrics.watch_catalog(self.catalog)
        return metrics

    @functools.cached_property
    def pipeline(self) -> Pipeline:
        return Pipeline(
            catalog=self.catalog,
            backends=self.backends,
            kubelet=self.kubelet,
            checkpoint_dir=CheckpointDir(self.config.kubelet.checkpoint_dir),
            node=self.node,
            min_free_space=self.config.daemon.min_free_space,
            metrics=self.metrics,
            recipients={b.name: b.encryption_recipients for b in self.config.backends},
            dedup={b.name: ChunkIds.keyed(key) if (key := b.id_key()) else ChunkIds()
                   for b in self.config.backends if b.format == "dedup"},
        )

    @functools.cached_property
    def runner(self) -> Runner:
        return Runner(
            catalog=self.catalog,
            kubelet=self.kubelet,
            pipeline=self.pipeline,
            max_concurrent=self.config.daemon.max_concurrent_checkpoints,
            holder=self.holder,
            # long enough for the kubelet's own limit plus the upload of a large archive
            lease_ttl=timedelta(seconds=2 * self.config.kubelet.request_timeout()) + timedelta(minutes=20),
        )

    def policies(self) -> list[Policy]:
        """The stored policies: the catalog alone, no kubelet (``prune`` runs off the node too)."""
        return [Policy.from_spec_json(p.name, p.spec_json) for p in self.catalog.list_policies()]

    def load_policy(self, name: str) -> Policy:
        """The stored policy ``name``; :class:`NotFound` when there is none."""
        for policy in self.policies():
            if policy.name == name:
                return policy
        raise NotFound(f"no policy named {name!r}")

    @functools.cached_property
    def pruner(self) -> Pruner:
        return Pruner(self.catalog, self.backends, holder=self.holder, node=self.node, metrics=self.metrics)

    @functools.cached_property
    def deleter(self) -> Deleter:
        return Deleter(self.catalog, self.backends, holder=self.holder, node=self.node, metrics=self.metrics)

    def after_cycle(self, policy: Policy, result: CycleResult) -> None:
        """After each policy's runs: apply its retention, then tidy the node directory."""
        try:
            self.pruner.prune(policy)
        except LeaseHeld as exc:
            log.info("prune_skipped", policy=policy.name, reason=str(exc))
        except BackupdError as exc:
            log.error("prune_failed", policy=policy.name, error=str(exc), error_kind=exc.kind)
        self.pipeline.sweep_node(timedelta(hours=self.config.daemon.stale_tar_hours))

    def maintenance(self) -> None:
        """Hourly: forget old run records, finish deletes that crashed in policies deleted since,
        sweep orphans and dead multipart uploads.

        Full backend listings are costly on big buckets, so one daemon of the cluster does
        them per interval: the lease is taken for the interval and not released.
        """
        daemon = self.config.daemon
        now = now_utc()
        self.catalog.purge_runs(now - timedelta(days=daemon.run_history_days))
        self.deleter.finish_leftovers({p.name for p in self.catalog.list_policies()})
        for name, backend in self.backends.items():
            if not self.catalog.acquire_lease(f"orphans/{name}", self.holder, timedelta(minutes=55)):
                continue
            grace = timedelta(hours=daemon.orphan_grace_hours)
            remove_orphans(self.catalog, backend, grace=grace, now=now)
            backend.abort_incomplete(max(grace, timedelta(hours=24)))
            if self.config.backend(name).format == "dedup":
                try:
                    self.collect_garbage(name)
                except BackupdError as exc:
                    log.error("gc_failed", backend=name, error=str(exc), error_kind=exc.kind)

    def collect_garbage(self, name: str, *, dry_run: bool = False, repack_below: float | None = None,
                        identities: Sequence[Any] = ()) -> GcReport:
        """Remove the packs no archive of a ``format = "dedup"`` backend uses (two phases, each
        ``daemon.orphan_grace_hours`` apart) and repack those whose live share is below
        ``repack_below`` (default ``daemon.repack_below_live_share``; an encrypted backend's
        only with ``identities``): :mod:`backupd.storage.dedup.gc`."""
        config = self.config.backend(name)
        if config.format != "dedup":
            raise ConfigError(f"backend {name!r} has format {config.format!r}: only "
                              "format = \"dedup\" backends have packs to collect")
        backend = self.backends[name]
        grace = timedelta(hours=self.config.daemon.orphan_grace_hours)
        below = self.config.daemon.repack_below_live_share if repack_below is None else repack_below
        ids = []
        try:
            if below > 0 and (key := config.id_key()) is not None:
                ids.append(ChunkIds.keyed(key))
        except ConfigError as exc:  # unless the identities decrypt its copy, such chunks cannot be checked:
            log.warning("repack_without_id_key", backend=name, error=str(exc))  # their packs stay as they are
        recipients = parse_recipients(config.encryption_recipients, f"backends[{name}].encryption_recipients")
        return collect(self.catalog, backend, grace=grace, now=now_utc(), holder=self.holder, dry_run=dry_run,
                       repack_below=below, identities=identities, recipients=recipients, ids=ids)

    def drill(self, policy: Policy) -> VerifyReport:
        """A restore drill: re-read a sample of the policy's archives (always its newest),
        check digests and that each is a checkpoint archive; recorded as a ``verify`` run."""
        sample = policy.spec.verify.sample if policy.spec.verify else None
        archives = choose_sample(self.catalog.list_archives(policy=policy.name), sample)
        with recorded_run(self.catalog, self.metrics, "verify", policy=policy.name, node=self.node, log=log,
                          event="drill_finished") as run:
            report = verify(self.catalog, self.backends, archives, structure=True)
            run.bytes_in = report.bytes_read
            run.fields.update(policy=policy.name, checked=len(report.findings))
            if not report.clean:
                problems = [f"{f.archive_id}: {f.status} ({f.detail})" for f in report.problems]
                problems += [f"orphan {key}" for keys in report.orphans.values() for key in keys]
                run.error = IntegrityError(f"{len(problems)} problem(s): " + "; ".join(problems[:10]))
        return report

    def report(self) -> RetentionReport:
        """A fresh report of the whole catalog (``backupd report``; seconds at a million archives)."""
        return load_report(self.catalog, stale_intervals=self.config.alerts.stale_intervals)

    @functools.cached_property
    def reports(self) -> ReportCache:
        """The last report, which the API serves (:meth:`refresh_report` keeps it fresh)."""
        return ReportCache(self.report)

    def refresh_report(self) -> None:
        """Every minute: a fresh report for the API while someone reads it, and the alerts
        from it when this daemon sends them (:meth:`check_alerts`)."""
        sends_alerts = self._sends_alerts()
        lately = timedelta(minutes=10)
        if sends_alerts or self.reports.read_within(lately):
            report = self.reports.refresh(serialise_read_within=lately)
            if sends_alerts:
                assert self.notifier is not None
                check_and_alert(self.notifier, report)

    @functools.cached_property
    def notifier(self) -> Notifier | None:
        return notifier_from_config(self.config.alerts, source=self.node)

    def check_alerts(self) -> None:
        """Alerts from a fresh report, when this daemon sends them."""
        if self._sends_alerts():
            assert self.notifier is not None
            check_and_alert(self.notifier, self.report())

    def _sends_alerts(self) -> bool:
        """Alerts come from the cluster-wide report, so one daemon sends them: the holder of the
        ``alerts`` lease (kept while it lives; a successor re-alerts what is still wrong)."""
        return self.notifier is not None and self.catalog.acquire_lease("alerts", self.holder, timedelta(minutes=3))

    def http_server(self, listen: str | None = None) -> HttpServer:
        kubelet = self.kubelet

        def kubelet_reachable() -> None:  # /readyz asks only that the kubelet answers
            kubelet.pods()

        api = Api(self.catalog, self.metrics, token=self.config.daemon.api_token(),
                  kubelet_probe=kubelet_reachable,
                  report=lambda timelines: self.reports.json(timelines=timelines))
        daemon = self.config.daemon
        return HttpServer(api, listen or daemon.http_listen, timeout=daemon.http_timeout_seconds,
                          max_connections=daemon.http_max_connections)

    def daemon(self, *, policy_poll_seconds: float = 5.0) -> Daemon:
        periodic = {"maintenance": (self.maintenance, timedelta(hours=1)),
                    "report": (self.refresh_report, timedelta(minutes=1))}

        def drill(policy: Policy) -> None:  # the run records the outcome; the daemon needs no report
            self.drill(policy)

        return Daemon(self.runner, policy_poll_seconds=policy_poll_seconds, after_cycle=self.after_cycle,
                      periodic=periodic, drill=drill, holder=self.holder)

    def close(self) -> None:
        if self.__dict__.get("notifier") is not None:
            self.__dict__["notifier"].close()
        for name in ("runner", "kubelet", "catalog"):
            if name in self.__dict__:
                self.__dict__[name].close()
