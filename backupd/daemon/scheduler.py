"""The daemon's scheduling: policies -> APScheduler jobs -> checkpoint cycles.

The catalog is the truth. APScheduler 3.11 runs with its in-memory job store only, rebuilt from
the catalog's policies at start-up and whenever their (name, generation) fingerprint changes
(``policy apply`` in another process bumps it); no job is ever pickled. A run missed while the
daemon was down is caught up once at start-up (the catalog knows when each policy last ran),
never stampeded; APScheduler's ``coalesce`` does the same for runs missed while running.

Concurrency: one cycle per policy at a time (``max_instances=1``); the kubelet is asked for at
most ``daemon.max_concurrent_checkpoints`` checkpoints at once (each freezes and dumps a
container), and as many more archives may be shipping meanwhile: a worker gives its kubelet
slot up when the checkpoint request returns, so uploads never hold the runtime back, and at
most twice that many uncommitted tars sit on the node. A container is
never checkpointed by two runs at once (a second policy selecting it at the same moment skips
it), and never twice in one second (the kubelet's file name has second resolution and the
runtimes open it without O_EXCL, so the second archive would overwrite the first).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor as APThreadPool
from apscheduler.schedulers.background import BackgroundScheduler

from backupd import retry
from backupd.catalog.store import Catalog
from backupd.errors import BackupdError, LeaseHeld, NotFound, PolicyError
from backupd.model import RUN_FAILED, Container, Pod, now_utc
from backupd.node.kubelet import KubeletClient
from backupd.policy.document import Policy
from backupd.policy.schedule import Schedule
from backupd.storage.commit import Outcome, Pipeline
from backupd.storage.runs import record_skipped, recorded_run

log = structlog.get_logger("backupd.scheduler")

SAME_CONTAINER_GAP_SECONDS = 1.1


@dataclass
class CycleResult:
    policy: str
    outcomes: list[Outcome] = field(default_factory=list)
    error: BackupdError | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.error is not None or any(o.run.outcome == RUN_FAILED for o in self.outcomes)


class ContainerGate:
    """Per-container mutual exclusion plus the one-second spacing the kubelet needs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._lock = threading.Lock()
        self._busy: set[tuple[str, str, str]] = set()
        self._last: dict[tuple[str, str, str], float] = {}
        self._clock, self._sleep = clock, sleep

    def try_enter(self, key: tuple[str, str, str]) -> bool:
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            last = self._last.get(key)
        if last is not None:
            wait = SAME_CONTAINER_GAP_SECONDS - (self._clock() - last)
            if wait > 0:
                self._sleep(wait)
        return True

    def leave(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            self._busy.discard(key)
            self._last[key] = self._clock()


class Runner:
    """Runs checkpoint cycles; used by the daemon's jobs and by ``backupd checkpoint``."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        kubelet: KubeletClient,
        pipeline: Pipeline,
        max_concurrent: int,
        holder: str = "backupd",
        lease_ttl: timedelta = timedelta(minutes=30),
        discovery_backoff: retry.Backoff = retry.Backoff(attempts=3, base_delay=1.0, max_delay=10.0),
    ) -> None:
        self.holder = holder
        self.lease_ttl = lease_ttl
        self.catalog = catalog
        self.kubelet = kubelet
        self.pipeline = pipeline
        self.kubelet_slots = threading.BoundedSemaphore(max_concurrent)
        self.workers = ThreadPoolExecutor(max_workers=2 * max_concurrent, thread_name_prefix="checkpoint")
        self.gate = ContainerGate()
        self.discovery_backoff = discovery_backoff
        self._inflight: set[Future[Outcome | None]] = set()
        self._inflight_lock = threading.Lock()

    def load_policy(self, name: str) -> Policy:
        for stored in self.catalog.list_policies():
            if stored.name == name:
                return Policy.from_spec_json(stored.name, stored.spec_json)
        raise NotFound(f"no policy named {name!r}")

    def policies(self) -> list[Policy]:
        return [Policy.from_spec_json(p.name, p.spec_json) for p in self.catalog.list_policies()]

    def _checkpoint_container(self, policy: Policy, pod: Pod, container: Container) -> Outcome | None:
        key = (pod.namespace, pod.name, container.name)
        if not self.gate.try_enter(key):
            return None
        # The in-process gate covers this daemon; the catalog lease covers two daemons pointed at
        # one kubelet (a DaemonSet rollout with surge, or a misconfiguration). A killed holder's
        # lease lapses after lease_ttl.
        lease = f"checkpoint/{pod.namespace}/{pod.name}/{container.name}"
        try:
            if not self.catalog.acquire_lease(lease, self.holder, self.lease_ttl):
                return None
            try:
                return self.pipeline.checkpoint(policy, pod, container, kubelet_slot=self.kubelet_slots)
            finally:
                self.catalog.release_lease(lease, self.holder)
        finally:
            self.gate.leave(key)

    def cycle(self, policy: Policy) -> CycleResult:
        """Discover targets, checkpoint each through the worker pool, wait for all.

        A cycle that fails as a whole (discovery, or an error escaping it) counts as one failed
        checkpoint run in the metrics: no per-container run exists to count it.
        """
        try:
            return self._cycle(policy)
        except Exception as exc:
            self.pipeline.metrics.run_failed("checkpoint", exc)
            raise

    def _cycle(self, policy: Policy) -> CycleResult:
        result = CycleResult(policy.name)
        bound = log.bind(policy=policy.name)
        try:
            pods = retry.call(
                self.kubelet.pods, self.discovery_backoff,
                on_retry=lambda e, n, p: bound.warning("kubelet_retry", error=str(e), attempt=n),
            )
        except BackupdError as exc:
            result.error = exc
            with recorded_run(self.catalog, self.pipeline.metrics, "checkpoint", policy=policy.name,
                              node=self.pipeline.node, log=bound) as run:
                run.error = exc
                run.fields["stage"] = "discovery"
            return result
        targets = policy.targets(pods)
        bound.info("cycle_started", targets=len(targets))
        futures = []
        for pod, container in targets:
            fut = self.workers.submit(self._checkpoint_container, policy, pod, container)
            with self._inflight_lock:
                self._inflight.add(fut)
            fut.add_done_callback(self._forget)
            futures.append((pod, container, fut))
        for pod, container, fut in futures:
            outcome = fut.result()
            if outcome is None:
                name = f"{pod.namespace}/{pod.name}/{container.name}"
                result.skipped.append(name)
                record_skipped(self.catalog, "checkpoint", "another run of this container is in progress",
                               policy=policy.name, node=self.pipeline.node, namespace=pod.namespace, pod=pod.name,
                               workload=str(pod.workload), container=container.name)
            else:
                result.outcomes.append(outcome)
        return result

    def _forget(self, fut: Future[Outcome | None]) -> None:
        with self._inflight_lock:
            self._inflight.discard(fut)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for in-flight checkpoints; True if all finished."""
        deadline = time.monotonic() + timeout
        while True:
            with self._inflight_lock:
                pending = list(self._inflight)
            if not pending:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)


class Daemon:
    """APScheduler jobs kept in step with the catalog's policies."""

    def __init__(
        self,
        runner: Runner,
        *,
        policy_poll_seconds: float = 5.0,
        after_cycle: Callable[[Policy, CycleResult], None] | None = None,
        periodic: dict[str, tuple[Callable[[], None], timedelta]] | None = None,
        drill: Callable[[Policy], None] | None = None,
        holder: str = "backupd",
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.runner = runner
        self.catalog = runner.catalog
        self.policy_poll_seconds = policy_poll_seconds
        self.after_cycle = after_cycle
        self.periodic = periodic or {}
        self.drill = drill
        self.holder = holder
        self.clock = clock
        self.scheduler = BackgroundScheduler(
            executors={"default": APThreadPool(max_workers=16)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        self._fingerprint: tuple[tuple[str, int], ...] | None = None
        self._stop = threading.Event()
        self.cycles_started = 0

    def _run_job(self, name: str) -> None:
        self.cycles_started += 1
        try:
            policy = self.runner.load_policy(name)
            result = self.runner.cycle(policy)
            if self.after_cycle is not None:
                self.after_cycle(policy, result)
        except BackupdError as exc:
            log.error("cycle_failed", policy=name, error=str(exc), error_kind=exc.kind)
        except Exception:
            log.exception("cycle_crashed", policy=name)

    def _run_drill(self, name: str) -> None:
        try:
            assert self.drill is not None
            self.drill(self.runner.load_policy(name))
        except BackupdError as exc:
            log.error("drill_failed", policy=name, error=str(exc), error_kind=exc.kind)
        except Exception:
            log.exception("drill_crashed", policy=name)

    def _run_periodic(self, name: str) -> None:
        try:
            self.periodic[name][0]()
        except BackupdError as exc:
            log.warning("periodic_job_failed", job=name, error=str(exc), error_kind=exc.kind)
        except Exception:
            log.exception("periodic_job_crashed", job=name)

    def sync_jobs(self) -> None:
        """Make the job store match the catalog's policies (add, replace, remove)."""
        fingerprint = self.catalog.policies_fingerprint()
        if fingerprint == self._fingerprint:
            return
        old = dict(self._fingerprint or ())
        new = dict(fingerprint)
        stored = {s.name: s for s in self.catalog.list_policies()}
        for name in old.keys() - new.keys():
            self._unschedule(name)
            log.info("policy_unscheduled", policy=name)
        now = self.clock()
        for name, generation in new.items():
            if old.get(name) == generation:
                continue
            if name not in stored:  # deleted since the fingerprint was read: the next sync forgets it
                continue
            try:
                policy = Policy.from_spec_json(name, stored[name].spec_json)
            except PolicyError as exc:
                # Stored by a backupd that accepted it (e.g. a schedule that never fires): this
                # policy is not run, every other one is. Said once per generation, not per poll.
                self._unschedule(name)
                log.error("policy_invalid", policy=name, generation=generation, error=str(exc),
                          action="not scheduled; apply a corrected policy")
                continue
            schedule = policy.schedule
            job_kwargs = {}
            if schedule.missed(self.catalog.last_run_started(name), now):
                job_kwargs["next_run_time"] = now  # caught up once, right away
            self.scheduler.add_job(
                self._run_job, trigger=schedule.trigger(start=now), args=[name], id=name, name=f"policy {name}",
                replace_existing=True, **job_kwargs,
            )
            job = self.scheduler.get_job(name)
            log.info("policy_scheduled", policy=name, schedule=schedule.text,
                     next_run=str(job.next_run_time) if job else None, catch_up=bool(job_kwargs))
            self._sync_drill(policy, now)
        self._fingerprint = fingerprint

    def _unschedule(self, name: str) -> None:
        for job_id in (name, f"verify/{name}"):
            if self.scheduler.get_job(job_id):
                self.scheduler.remove_job(job_id)

    def _sync_drill(self, policy: Policy, now: datetime) -> None:
        """A policy's ``verify`` section schedules a restore drill of a sample of its archives."""
        job_id = f"verify/{policy.name}"
        if policy.spec.verify is None or self.drill is None:
            if self.scheduler.get_job(job_id):
                self.scheduler.remove_job(job_id)
            return
        schedule = Schedule.parse(policy.spec.verify.schedule, policy.spec.timezone)
        self.scheduler.add_job(self._run_drill, trigger=schedule.trigger(start=now), args=[policy.name], id=job_id,
                               name=f"restore drill {policy.name}", replace_existing=True)

    def _renew_node_lease(self) -> None:
        try:
            if not self.runner.pipeline.node_lease(self.holder):
                log.error("node_lease_lost", node=self.runner.pipeline.node)
        except BackupdError as exc:
            log.warning("node_lease_renewal_failed", error=str(exc))

    def start(self) -> None:
        """Take the node lease (refusing to start beside a live daemon of the same node),
        reconcile what a crash left, then schedule every policy."""
        self.catalog.check_schema()
        pipeline = self.runner.pipeline
        if not pipeline.node_lease(self.holder):
            raise LeaseHeld(f"another backupd daemon is running for node {pipeline.node!r} (it holds the node "
                            "lease in the catalog); if it was killed on another host, its lease expires in 2 minutes")
        pipeline.reconcile()
        self.scheduler.start(paused=True)
        self.scheduler.add_job(self._renew_node_lease, "interval", seconds=30, id="__node_lease__")
        self.sync_jobs()
        for name, (_fn, interval) in self.periodic.items():
            self.scheduler.add_job(self._run_periodic, "interval", seconds=interval.total_seconds(), args=[name],
                                   id=f"__{name}__", next_run_time=self.clock())
        self.scheduler.resume()
        log.info("daemon_started", node=self.runner.pipeline.node)

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        """Block, re-syncing jobs with the catalog, until :meth:`stop` (or ``until()``)."""
        while not self._stop.wait(self.policy_poll_seconds):
            if until is not None and until():
                break
            try:
                self.sync_jobs()
            except BackupdError as exc:
                log.warning("policy_sync_failed", error=str(exc))

    def stop(self, grace_seconds: float) -> bool:
        """Stop scheduling, let in-flight checkpoints finish for up to ``grace_seconds``."""
        self._stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        finished = self.runner.drain(grace_seconds)
        if not finished:
            log.warning("shutdown_grace_exceeded", grace_seconds=grace_seconds)
        else:
            self.runner.pipeline.release_node_lease(self.holder)
        self.runner.close()
        log.info("daemon_stopped", clean=finished)
        return finished
