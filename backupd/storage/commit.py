"""The commit protocol: one checkpoint from the kubelet to a committed archive.

    run row (running) -> kubelet checkpoint -> archive row ``pending``
      -> stream the node tar once (hash, compress, hash) into the backend (atomic, create-only)
      -> manifest beside it -> archive row ``committed`` -> node-local tar removed
         (the ``keepOnNode`` newest committed tars of the container stay)
      -> run row (succeeded | failed, with bytes and duration)

A failure at any step leaves nothing half-visible: the backend put is atomic; an object whose
manifest could not be written is deleted again (or, if even that fails, left as an orphan that
prune and verify report -- never listed as an archive); a crash between steps leaves a
``pending`` row that :meth:`Pipeline.reconcile` settles at start-up from what the backend holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from backupd import __version__, retry
from backupd.backends.base import Backend
from backupd.catalog.store import Catalog
from backupd.errors import BackupdError, IntegrityError, StorageNotFound
from backupd.metrics import Metrics
from backupd.model import (
    COMMITTED,
    FAILED,
    PENDING,
    Archive,
    Container,
    Pod,
    Run,
    now_utc,
    replica_of,
)
from backupd.node.checkpoints import CheckpointDir, node_tar_prefix
from backupd.node.kubelet import KubeletClient, Target
from backupd.policy.document import Policy
from backupd.storage import layout
from backupd.storage.dedup import commit as dedup_commit
from backupd.storage.dedup.ids import ChunkIds
from backupd.storage.prune import release_dead_leases
from backupd.storage.runs import RunRecord, recorded_run
from backupd.storage.transfer import DEFAULT_LEVEL, DEFAULT_THREADS, PackingReader, parse_recipients

log = structlog.get_logger("backupd.pipeline")


@dataclass(frozen=True)
class Outcome:
    run: Run
    archive: Archive | None


class Pipeline:
    def __init__(
        self,
        *,
        catalog: Catalog,
        backends: Mapping[str, Backend],
        kubelet: KubeletClient,
        checkpoint_dir: CheckpointDir,
        node: str,
        min_free_space: int = 0,
        recipients: dict[str, list[str]] | None = None,
        kubelet_backoff: retry.Backoff = retry.Backoff(attempts=3, base_delay=1.0, max_delay=20.0),
        level: int = DEFAULT_LEVEL,
        threads: int = DEFAULT_THREADS,
        clock: Callable[[], datetime] = now_utc,
        sleep: Callable[[float], None] = time.sleep,
        metrics: Metrics | None = None,
        dedup: dict[str, ChunkIds] | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        #: backends with ``format = "dedup"`` and their chunk ids (keyed when they encrypt)
        self.dedup = dict(dedup or {})
        # parsed once: a bad recipient is a config error at start-up, not a failed run later
        self.recipients = {name: parse_recipients(r, f"backends[{name}].encryption_recipients")
                           for name, r in (recipients or {}).items() if r}
        self.catalog = catalog
        self.backends = backends
        self.kubelet = kubelet
        self.checkpoint_dir = checkpoint_dir
        self.node = node
        self.min_free_space = min_free_space
        self.kubelet_backoff = kubelet_backoff
        self.level, self.threads = level, threads
        self.clock = clock
        self.sleep = sleep

    def checkpoint(self, policy: Policy, pod: Pod, container: Container,
                   kubelet_slot: AbstractContextManager[object] = nullcontext()) -> Outcome:
        """Checkpoint one container and commit the archive; never raises a BackupdError.

        ``kubelet_slot`` is held around each checkpoint request only (not the backoff between
        attempts, nor the upload): it bounds what the node's runtime is asked to freeze and dump
        at once. The outcome (and the run row) says what happened; the daemon keeps going
        either way.
        """
        workload = str(pod.workload)
        target = Target(pod.namespace, pod.name, container.name)
        bound = log.bind(policy=policy.name, namespace=pod.namespace, pod=pod.name, workload=workload,
                         container=container.name)
        run: RunRecord | None = None
        try:
            with recorded_run(self.catalog, self.metrics, "checkpoint", policy=policy.name, node=self.node, log=bound,
                              namespace=pod.namespace, pod=pod.name, workload=workload,
                              container=container.name) as run:
                self.checkpoint_dir.ensure_free(self.min_free_space)
                requested = self.clock()

                def on_retry(exc: BackupdError, attempt: int, pause: float) -> None:
                    bound.warning("kubelet_retry", error=str(exc), attempt=attempt, pause_seconds=round(pause, 2))

                checkpoint_seconds = 0.0

                def request() -> Path:
                    nonlocal checkpoint_seconds
                    with kubelet_slot:
                        asked = time.monotonic()
                        path = self.kubelet.checkpoint(target)
                        checkpoint_seconds = time.monotonic() - asked
                        return path

                node_path = retry.call(request, self.kubelet_backoff, sleep=self.sleep, on_retry=on_retry)
                self.metrics.checkpoint_seconds.observe(checkpoint_seconds)
                archive = self.commit(policy, pod, container, node_path, requested)
                if policy.spec.keep_on_node:
                    self.clean_node(policy, pod.namespace, pod.name, container.name)
                run.bytes_in, run.bytes_out = archive.tar_size or 0, archive.stored_size or 0
                run.archive_id = archive.id
                run.fields.update(archive_id=archive.id, bytes_in=archive.tar_size, bytes_out=archive.stored_size,
                                  checkpoint_seconds=round(checkpoint_seconds, 3))
                self.metrics.bytes_read.inc(archive.tar_size or 0)
                self.metrics.bytes_shipped.labels(backend=archive.backend).inc(archive.stored_size or 0)
        except Exception:
            if run is None or run.run is None:
                raise  # the catalog could not record the run at all
            return Outcome(run.run, None)  # recorded and logged: the daemon keeps going
        assert run.run is not None
        return Outcome(run.run, archive)

    def commit(self, policy: Policy, pod: Pod, container: Container, node_path: Path, when: datetime) -> Archive:
        """Ship one node-local tar (already written by the kubelet) and commit it.

        Steps 2-5 of the commit protocol; raises a BackupdError with the archive row failed and
        no object visible, or returns the committed archive.
        """
        backend = self.backends[policy.spec.backend]
        recipients = self.recipients.get(backend.name, [])
        archive_id = layout.new_archive_id()
        replica = replica_of(pod, self.node, policy.spec.group_by)
        ids = self.dedup.get(backend.name)
        key = layout.archive_key(pod.namespace, pod.workload.segment, container.name, when, archive_id,
                                 encrypted=bool(recipients), dedup=ids is not None)
        pending = Archive(
            id=archive_id, state=PENDING, policy=policy.name, backend=backend.name, key=key, node=self.node,
            namespace=pod.namespace, pod=pod.name, workload=str(pod.workload), container=container.name,
            image=container.image, checkpoint_time=when, created_at=self.clock(), node_path=node_path.name,
            encryption="age" if recipients else "none", replica=replica,
        )
        self.catalog.add_archive(pending)
        upload_started = time.monotonic()
        used: dict[str, int] = {}  # deduplicated: which chunks of each pack the recipe uses
        try:
            extra: dict[str, Any] = {}
            with self.checkpoint_dir.open(node_path.name) as raw:
                if ids is not None:
                    shipped = dedup_commit.ship(backend, self.catalog, raw, key, ids=ids, recipients=recipients,
                                                what=f"archive {archive_id}", level=self.level)
                    used = shipped.used
                    committed = replace(pending, tar_size=shipped.tar_size, stored_size=shipped.new_bytes,
                                        tar_sha256=shipped.tar_sha256, stored_sha256=shipped.recipe_sha256)
                    extra = {"format": "dedup", "recipe_size": shipped.recipe_size, "packs": shipped.packs}
                else:
                    reader = PackingReader(raw, level=self.level, threads=self.threads, recipients=recipients)
                    backend.put(key, reader)
                    committed = replace(pending, tar_size=reader.tar_size, stored_size=reader.stored_size,
                                        tar_sha256=reader.tar_sha256, stored_sha256=reader.stored_sha256,
                                        encryption=reader.encryption)
            manifest = layout.Manifest.of(committed, labels=dict(pod.labels), backupd_version=__version__, **extra)
            try:
                backend.put_bytes(layout.manifest_key(key), manifest.to_json())
            except BackupdError:
                self._discard_object(backend, key)
                raise
        except BackupdError as exc:
            self.catalog.update_archive(archive_id, state=FAILED, error=str(exc))
            # The tar was never committed; leaving it would fill the node's disk while the
            # backend is down, and the next scheduled run takes a fresh checkpoint anyway.
            self._remove_node_tar(node_path.name)
            raise
        self.metrics.upload_seconds.labels(backend=backend.name).observe(time.monotonic() - upload_started)
        # With the manifest written the archive exists, so the node's copy can go now -- in the
        # same transaction as the commit when nothing is to stay on the node (the common case).
        removed = policy.spec.keep_on_node == 0 and self._remove_node_tar(node_path.name)
        if manifest.format == "dedup":
            try:
                return self._commit_dedup_row(backend, manifest, archive_id, used=used, node_tar_deleted=removed)
            except IntegrityError as exc:
                self.catalog.update_archive(archive_id, state=FAILED, error=str(exc))
                self._remove_node_tar(node_path.name)
                raise
        return self.catalog.update_archive(
            archive_id, expect_state=PENDING, state=COMMITTED, committed_at=self.clock(),
            tar_size=manifest.tar_size, stored_size=manifest.stored_size, tar_sha256=manifest.tar_sha256,
            stored_sha256=manifest.stored_sha256, node_tar_deleted=removed,
        )

    def _commit_dedup_row(self, backend: Backend, manifest: layout.Manifest, archive_id: str,
                          used: dict[str, int] | None = None, **fields: object) -> Archive:
        """Commit the row of a deduplicated archive, only if every pack it uses is still there
        (garbage collection may have doomed one while the archive was being written: then its
        recipe and manifest are removed again and :class:`IntegrityError` says why). ``used``:
        which chunks of each pack the recipe uses, as the writer learnt them; reconcile, which
        commits from the manifest alone, has none: those packs count as wholly used."""
        try:
            return self.catalog.commit_dedup_archive(
                archive_id, backend.name, manifest.packs, used=used, expect_state=PENDING, state=COMMITTED,
                committed_at=self.clock(), tar_size=manifest.tar_size, stored_size=manifest.stored_size,
                tar_sha256=manifest.tar_sha256, stored_sha256=manifest.stored_sha256, **fields,
            )
        except IntegrityError:
            self._discard_object(backend, layout.manifest_key(manifest.key))
            self._discard_object(backend, manifest.key)
            raise

    def _discard_object(self, backend: Backend, key: str) -> None:
        try:
            backend.delete(key)
        except BackupdError as exc:
            log.warning("orphan_left", backend=backend.name, key=key, error=str(exc))

    def _remove_node_tar(self, name: str) -> bool:
        try:
            return self.checkpoint_dir.remove(name)
        except BackupdError as exc:
            log.warning("node_tar_not_removed", file=name, error=str(exc))
            return False

    def clean_node(self, policy: Policy, namespace: str, pod: str, container: str) -> int:
        """Remove committed node-local tars of one container beyond the ``keepOnNode`` newest."""
        on_node = [
            a for a in self.catalog.list_archives(policy=policy.name, namespace=namespace, pod=pod,
                                                  container=container, node=self.node)
            if not a.node_tar_deleted and a.node_path
        ]
        keep = policy.spec.keep_on_node
        doomed = on_node[: len(on_node) - keep] if keep else on_node
        for a in doomed:
            assert a.node_path is not None
            self._remove_node_tar(a.node_path)
            self.catalog.update_archive(a.id, node_tar_deleted=True)
        return len(doomed)

    def node_lease(self, holder: str, ttl: timedelta = timedelta(minutes=2)) -> bool:
        """Take (or renew) the lease that says "this process runs checkpoints on this node".

        The daemon holds it for its lifetime; a one-off ``backupd checkpoint`` takes it when no
        daemon runs. Its holder alone may :meth:`reconcile`.
        """
        name = f"node/{self.node}"
        return self.catalog.acquire_lease(name, holder, ttl) or bool(
            release_dead_leases(self.catalog) and self.catalog.acquire_lease(name, holder, ttl)
        )

    def release_node_lease(self, holder: str) -> None:
        self.catalog.release_lease(f"node/{self.node}", holder)

    def sweep_node(self, max_age: timedelta) -> list[str]:
        """Remove node-local tars older than ``max_age`` that no committed archive keeps.

        The kubelet never deletes ``/var/lib/kubelet/checkpoints``; tars left by a crash, or by
        a commit that failed before its clean-up, would otherwise fill the node's disk. Tars
        kept on purpose (``keepOnNode``) belong to committed rows and stay. Only regular
        ``checkpoint-*.tar`` files directly in the directory are considered; symlinks never.
        """
        if max_age <= timedelta(0):
            return []
        kept = self._kept_node_tars()
        cutoff = self.clock() - max_age
        removed = []
        for tar in self.checkpoint_dir.list():
            if tar.modified < cutoff and tar.name not in kept and self._remove_node_tar(tar.name):
                removed.append(tar.name)
        if removed:
            log.info("stale_node_tars_removed", count=len(removed), files=removed[:20])
        return removed

    def _kept_node_tars(self) -> set[str]:
        return {
            a.node_path for a in self.catalog.list_archives(node=self.node, states=(COMMITTED, PENDING))
            if a.node_path and not a.node_tar_deleted
        }

    def _remove_tars_of(self, interrupted: list[Run]) -> int:
        """Tars the kubelet wrote for checkpoint requests of a crashed daemon that never got a
        row: a request's own container, written after the run started, unknown to the catalog.
        (Other unknown tars, such as an operator's manual checkpoints, wait for the stale sweep.)"""
        asked = [(node_tar_prefix(r.pod, r.namespace, r.container), r.started_at - timedelta(seconds=1))
                 for r in interrupted if r.pod and r.namespace and r.container]
        if not asked:
            return 0
        kept = self._kept_node_tars()
        removed = 0
        for tar in self.checkpoint_dir.list():
            if tar.name not in kept and any(tar.name.startswith(prefix) and tar.modified >= since
                                            for prefix, since in asked):
                removed += self._remove_node_tar(tar.name)
        return removed

    def reconcile(self) -> dict[str, int]:
        """Settle what a crash of this node's daemon left behind; run at start-up, and only by
        the holder of the node lease (see :func:`node_lease`): rows another live process on this
        node is still working on must not be touched.

        * runs still ``running`` become failed runs (``Interrupted``);
        * ``pending`` archives: leftovers of their interrupted puts are removed; those whose
          manifest exists were committed (the row is completed from the manifest); those
          without a manifest are failed and any object is deleted;
        * their node-local tars are removed, and so are the tars the kubelet wrote for
          interrupted runs whose checkpoint request was answered but never got a row (with
          several workers, one can be waiting on the kubelet when another is killed).
        """
        interrupted = self.catalog.fail_interrupted_runs(node=self.node, kind="checkpoint")
        counts = {"leases_released": len(release_dead_leases(self.catalog)), "interrupted_runs": len(interrupted),
                  "completed": 0, "failed": 0}
        for a in self.catalog.list_archives(states=(PENDING,), node=self.node):
            backend = self.backends.get(a.backend)
            if backend is None:
                log.warning("reconcile_unknown_backend", archive_id=a.id, backend=a.backend)
                continue
            # A put the crash interrupted left a temp file or an unfinished multipart upload.
            mkey = layout.manifest_key(a.key)
            backend.abort_incomplete(timedelta(0), key=a.key)
            backend.abort_incomplete(timedelta(0), key=mkey)
            m: layout.Manifest | None
            try:
                m = layout.read_manifest(backend, mkey)
                bad = None if m.key == a.key else f"manifest {mkey} names the object {m.key!r}, not {a.key!r}"
            except StorageNotFound:
                m, bad = None, None
            except IntegrityError as exc:
                m, bad = None, str(exc)
            if bad is not None:
                # Not what this daemon wrote: left for `catalog rebuild` and `verify` to report.
                log.error("reconcile_bad_manifest", archive_id=a.id, backend=a.backend, key=mkey, error=bad)
                self.catalog.update_archive(a.id, state=FAILED, error=bad)
                counts["failed"] += 1
            elif m is not None and m.format == "dedup":
                try:
                    self._commit_dedup_row(backend, m, a.id)
                    counts["completed"] += 1
                except IntegrityError as exc:
                    self.catalog.update_archive(a.id, state=FAILED, error=str(exc))
                    counts["failed"] += 1
            elif m is not None:
                self.catalog.update_archive(
                    a.id, state=COMMITTED, committed_at=self.clock(), tar_size=m.tar_size, stored_size=m.stored_size,
                    tar_sha256=m.tar_sha256, stored_sha256=m.stored_sha256,
                )
                counts["completed"] += 1
            else:
                self._discard_object(backend, a.key)
                self.catalog.update_archive(a.id, state=FAILED, error="interrupted before the manifest was written")
                counts["failed"] += 1
            if a.node_path and self._remove_node_tar(a.node_path):
                self.catalog.update_archive(a.id, node_tar_deleted=True)
        counts["node_tars_removed"] = self._remove_tars_of(interrupted)
        if any(counts.values()):
            log.info("reconciled", **counts)
        return counts
