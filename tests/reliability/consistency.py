"""The end state every fault test asserts: catalog, backends and node directory agree.

:func:`assert_consistent` is the one definition of "nothing committed is lost, nothing
half-written is visible" that the reliability suite checks after each fault, and
:func:`daemon_cycle` runs one policy exactly as a daemon's scheduled job does.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.app import App
from backupd.backends.base import Backend
from backupd.backends.filesystem import TEMP_PREFIX, FilesystemBackend
from backupd.backends.s3 import S3Backend
from backupd.daemon.scheduler import CycleResult
from backupd.model import COMMITTED, DELETING, PENDING, RUNNING, Archive
from backupd.policy.document import Policy
from backupd.retry import Backoff
from backupd.storage import layout

FAST = Backoff(attempts=2, base_delay=0.01, max_delay=0.01)


def fast_retries(app: App) -> App:
    """Shorten the kubelet retry pauses (the attempts still happen) so fault tests stay quick."""
    app.pipeline.kubelet_backoff = FAST
    app.runner.discovery_backoff = FAST
    return app


def daemon_cycle(app: App, policy: Policy) -> CycleResult:
    """One scheduled run of ``policy`` as the daemon's job runs it: the cycle, then retention
    and the node sweep (``App.after_cycle``). Exceptions are not swallowed here, so a crash
    that the daemon would only log fails the test."""
    result = app.runner.cycle(policy)
    app.after_cycle(policy, result)
    return result


def innermost(backend: Backend) -> Backend:
    """The real backend under the retry / fault-injection wrappers."""
    while hasattr(backend, "inner"):
        backend = backend.inner
    return backend


def leftovers(backend: Backend) -> list[str]:
    """What interrupted puts left behind: temp files, unfinished multipart uploads."""
    real = innermost(backend)
    if isinstance(real, FilesystemBackend):
        if not real.root.exists():
            return []
        return [str(p) for p in real.root.rglob(f"{TEMP_PREFIX}*")]
    if isinstance(real, S3Backend):
        prefix = f"{real.prefix}/" if real.prefix else ""
        answer = real.client.list_multipart_uploads(Bucket=real.bucket, Prefix=prefix)
        return [f"multipart upload of {u['Key']}" for u in answer.get("Uploads", [])]
    return []


@dataclass(frozen=True)
class State:
    """What a consistent app holds: its committed archives, oldest first."""

    archives: list[Archive]

    @property
    def ids(self) -> set[str]:
        return {a.id for a in self.archives}


def assert_consistent(app: App, *, node_dir: Path | None = None, read_data: bool = True) -> State:
    """Assert the invariants backupd promises after any run, whatever failed during it.

    * no archive row is ``pending`` and no run is ``running``;
    * every committed archive has its object and its manifest, the manifest names the archive
      and its digests, and (``read_data``) the object's bytes still hash to ``stored_sha256``;
    * every archive object and every manifest in each backend is accounted for by a committed
      (or ``deleting``) row: nothing half-written is visible, no orphan;
    * ``format = "dedup"``: every pack is recorded in the catalog, and every pack a committed
      archive uses is there (a deduplicated archive's object is its recipe: its size is the
      manifest's ``recipe_size``, its SHA-256 the row's ``stored_sha256``);
    * no temp file or unfinished multipart upload is left in any backend;
    * the node checkpoint directory (``node_dir``, default the configured one) holds no regular
      ``checkpoint-*.tar`` except those committed archives keep on purpose (``keepOnNode``).

    Returns the committed archives so callers can check that none of them was lost.
    """
    catalog = app.catalog
    assert catalog.list_archives(states=(PENDING,)) == [], "a pending archive row survived the run"
    assert catalog.list_runs(outcome=RUNNING, limit=1000) == [], "a run is still 'running'"
    committed = catalog.list_archives()
    for name, backend in app.backends.items():
        objects = {o.key: o for o in backend.list("")}
        rows = catalog.archive_keys(name)
        accounted = {key for key, state in rows.items() if state in (COMMITTED, DELETING)}
        for a in (a for a in committed if a.backend == name):
            assert a.key in objects, f"archive {a.id} is listed but its object {a.key} is gone"
            manifest_key = layout.manifest_key(a.key)
            assert manifest_key in objects, f"archive {a.id} is listed but its manifest is gone"
            manifest: dict[str, Any] = json.loads(backend.read_bytes(manifest_key))
            object_size = manifest["recipe_size"] if manifest.get("format") == "dedup" else a.stored_size
            assert objects[a.key].size == object_size, f"archive {a.id}: stored size differs from the catalog"
            assert manifest["archive_id"] == a.id and manifest["tar_sha256"] == a.tar_sha256, a.id
            assert manifest["stored_sha256"] == a.stored_sha256, a.id
            if read_data:
                digest = hashlib.sha256()
                with backend.open(a.key) as stream:
                    while chunk := stream.read(1 << 20):
                        digest.update(chunk)
                assert digest.hexdigest() == a.stored_sha256, f"archive {a.id}: the stored bytes changed"
        accounted |= {layout.manifest_key(key) for key in accounted}
        packs = catalog.list_packs(name)
        for p in packs:
            assert p.archives == 0 or p.key in objects, f"pack {p.key} of a committed archive is gone"
        accounted |= {p.key for p in packs} | {k for k in objects if k.startswith("dedup/keys/")}
        for key in objects:
            assert key in accounted, f"backend {name!r} holds {key!r}, which no committed archive accounts for"
        assert leftovers(backend) == [], f"backend {name!r} has leftovers of interrupted puts"
    keep_on_node = {a.node_path for a in catalog.list_archives(node=app.node) if a.node_path and not a.node_tar_deleted}
    directory = node_dir or Path(app.config.kubelet.checkpoint_dir)
    on_node = {
        p.name for p in directory.glob("checkpoint-*.tar") if stat.S_ISREG(p.lstat().st_mode)
    } if directory.exists() else set()
    assert on_node <= keep_on_node, f"uncommitted tars left on the node: {sorted(on_node - keep_on_node)}"
    return State(committed)
