"""The core loop end to end, against the node simulator (a kubelet stand-in these tests did not
write) over real mTLS, with the config and policy formats of DESIGN.md."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from backupd.backends.filesystem import TEMP_PREFIX
from backupd.model import COMMITTED, FAILED, PENDING, RUN_FAILED, SUCCEEDED
from backupd.policy.document import Policy
from backupd.simulator.server import NodeSimulator
from backupd.storage import layout
from tests import policies


def web_policy(app, keep_on_node: int = 0) -> Policy:  # type: ignore[no-untyped-def]
    return policies.apply(app, policies.web_policy(keep_on_node=keep_on_node))


def expected_targets(sim: NodeSimulator) -> set[tuple[str, str, str]]:
    return {
        (p.namespace, p.name, c.name)
        for p in sim.pods
        if p.namespace == "default" and p.labels.get("app") == "web"
        for c in p.containers
        if c.name == "nginx" and c.state == "running"
    }


def test_policy_selects_exactly_the_matching_containers(app_factory, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    result = app.runner.cycle(web_policy(app))
    assert not result.failed, result
    got = {(o.run.namespace, o.run.pod, o.run.container) for o in result.outcomes}
    assert got == expected_targets(sim) and len(got) == 2
    posted = {r.path for r in sim.requests if r.method == "POST"}
    assert posted == {f"/checkpoint/{ns}/{pod}/{c}" for ns, pod, c in got}


def test_archives_decompress_to_the_byte_identical_kubelet_tar(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("zstd") is None:
        pytest.skip("the zstd command is not installed (apt-get install zstd)")
    app = app_factory()
    app.runner.cycle(web_policy(app, keep_on_node=5))  # keep the node tars to compare with
    archives = app.catalog.list_archives(policy="web")
    assert len(archives) == 2
    for a in archives:
        node_tar = sim.checkpoint_dir / a.node_path
        stored = tmp_path / "backend" / a.key
        out = tmp_path / f"{a.id}.tar"
        subprocess.run(["zstd", "-d", "-q", str(stored), "-o", str(out)], check=True)
        assert out.read_bytes() == node_tar.read_bytes()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == a.tar_sha256
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == a.stored_sha256
        assert a.tar_size == node_tar.stat().st_size and a.stored_size == stored.stat().st_size
        manifest = json.loads((tmp_path / "backend" / layout.manifest_key(a.key)).read_text())
        assert manifest["tar_sha256"] == a.tar_sha256 and manifest["archive_id"] == a.id
        assert (manifest["namespace"], manifest["pod"], manifest["workload"], manifest["container"]) == (
            a.namespace, a.pod, "deployment/web", "nginx")


def test_catalog_lists_each_archive_and_node_tars_are_removed(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    app.runner.cycle(web_policy(app))
    archives = app.catalog.list_archives()
    assert {(a.namespace, a.workload, a.container) for a in archives} == {("default", "deployment/web", "nginx")}
    for a in archives:
        assert a.state == COMMITTED and a.pod.startswith("web-") and a.node == "sim-node"
        assert a.tar_size and a.stored_size and len(a.tar_sha256) == 64 and len(a.stored_sha256) == 64
        assert a.key.startswith(f"default/deployment-web/nginx/{a.checkpoint_time:%Y%m%dT%H%M%SZ}-{a.id}")
        assert a.node_tar_deleted
        assert (tmp_path / "backend" / a.key).stat().st_mode & 0o777 == 0o600
    assert list(sim.checkpoint_dir.glob("checkpoint-*.tar")) == []
    runs = app.catalog.list_runs(policy="web")
    assert {r.outcome for r in runs} == {SUCCEEDED}
    assert all(r.bytes_in > r.bytes_out > 0 and r.duration_seconds is not None for r in runs)


def test_keep_on_node_leaves_the_newest_tars(app_factory, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    policy = web_policy(app, keep_on_node=1)
    for _ in range(3):
        app.runner.cycle(policy)
    tars = sorted(sim.checkpoint_dir.glob("checkpoint-*.tar"))
    assert len(tars) == 2  # one per container
    kept = {a.node_path for a in app.catalog.list_archives() if not a.node_tar_deleted}
    assert {t.name for t in tars} == kept


def no_partial_objects(tmp_path: Path) -> None:
    backend = tmp_path / "backend"
    if backend.exists():
        assert [p for p in backend.rglob("*") if p.is_file()] == [], "a failed run left an object behind"


@pytest.mark.parametrize(
    ("fault", "error_kind", "reason"),
    [
        ({"action": "respond", "status": 403,
          "body": "Forbidden (user=backupd, verb=create, resource=nodes, subresource(s)=[checkpoint])\n"},
         "KubeletForbidden", "nodes/checkpoint"),
        ({"action": "respond", "status": 404, "body": "404 page not found\n"},
         "CheckpointApiDisabled", "ContainerCheckpoint"),
        ({"action": "unsupported", "variant": "crio"}, "CheckpointUnsupported", "enable_criu_support"),
        ({"action": "checkpoint_error", "message": "running criu failed: exit status 1"},
         "CheckpointFailed", "criu failed"),
        ({"action": "delay", "seconds": 5}, "KubeletTimeout", "did not answer in time"),
        ({"action": "reset", "variant": "partial"}, "KubeletUnreachable", "cannot reach the kubelet"),
    ],
)
def test_kubelet_failures_give_a_failed_run_with_a_clear_reason(  # type: ignore[no-untyped-def]
    app_factory, sim: NodeSimulator, tmp_path: Path, fault: dict, error_kind: str, reason: str
) -> None:
    app = app_factory(request_timeout_seconds=1.5)
    app.pipeline.kubelet_backoff = type(app.pipeline.kubelet_backoff)(attempts=2, base_delay=0.01, max_delay=0.01)
    sim.add_fault(fault.pop("action"), method="POST", path="/checkpoint/*", **fault)
    result = app.runner.cycle(web_policy(app))
    assert result.failed and result.error is None
    runs = app.catalog.list_runs(policy="web")
    assert len(runs) == 2 and {r.outcome for r in runs} == {RUN_FAILED}
    assert {r.error_kind for r in runs} == {error_kind}
    assert all(reason in r.error for r in runs), runs[0].error
    assert app.catalog.list_archives() == []
    no_partial_objects(tmp_path)
    # the daemon's machinery keeps working once the kubelet recovers
    sim.clear_faults()
    assert not app.runner.cycle(web_policy(app)).failed


def test_untrusted_client_certificate_is_a_tls_failure(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stranger = sim.pki.issue_untrusted_client_cert("stranger", cn="backupd")
    app = app_factory()
    app.config.kubelet.cert_file, app.config.kubelet.key_file = stranger.cert_file, stranger.key_file
    result = app.runner.cycle(web_policy(app))
    assert result.error is not None and result.error.kind == "KubeletTLSError"
    assert "client certificate" in str(result.error)
    (run,) = app.catalog.list_runs(policy="web")
    assert run.outcome == RUN_FAILED and run.error_kind == "KubeletTLSError"
    no_partial_objects(tmp_path)


def test_hostile_kubelet_paths_are_refused(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    for variant in ("outside", "symlink", "traversal"):
        sim.clear_faults()
        sim.add_fault("hostile_path", method="POST", path="/checkpoint/*", variant=variant)
        result = app.runner.cycle(web_policy(app))
        assert result.failed
        assert {o.run.error_kind for o in result.outcomes} == {"UnsafeCheckpointPath"}, variant
    no_partial_objects(tmp_path)


def test_upload_failure_midway_leaves_no_object(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from backupd.backends.wrappers import Fault, FaultInjectingBackend
    from backupd.errors import NoSpace

    app = app_factory()
    app.backends["local"] = FaultInjectingBackend(
        app.backends["local"], [Fault("put", key="*.tar.zst", at_byte=100_000, error=NoSpace("disk full"), times=None)])
    result = app.runner.cycle(web_policy(app))
    assert {o.run.error_kind for o in result.outcomes} == {"NoSpace"}
    no_partial_objects(tmp_path)
    assert list(sim.checkpoint_dir.glob("checkpoint-*.tar")) == []


def test_reconcile_settles_what_a_crash_left(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    policy = web_policy(app, keep_on_node=5)
    app.runner.cycle(policy)
    done, undone = app.catalog.list_archives()
    backend = app.backends["local"]
    # crash after the manifest, before the committed row: the archive exists
    app.catalog.update_archive(done.id, state=PENDING, node_tar_deleted=False)
    # crash after the object, before the manifest: an orphan
    backend.delete(layout.manifest_key(undone.key))
    app.catalog.update_archive(undone.id, state=PENDING, node_tar_deleted=False)
    # a run the crash interrupted after the kubelet wrote its tar, before the row was added
    app.catalog.start_run("checkpoint", policy="web", node="sim-node", namespace=done.namespace, pod=done.pod,
                          workload=done.workload, container=done.container)
    answered = sim.checkpoint_dir / f"checkpoint-{done.pod}_{done.namespace}-{done.container}-2099-01-01T00:00:00Z.tar"
    answered.write_bytes(b"tar")
    manual = sim.checkpoint_dir / f"checkpoint-{undone.pod}_{undone.namespace}-{undone.container}-x.tar"
    manual.write_bytes(b"an operator's own checkpoint")  # no run asked for it: left to the stale sweep
    counts = app.pipeline.reconcile()
    assert counts == {"interrupted_runs": 1, "completed": 1, "failed": 1, "leases_released": 0,
                      "node_tars_removed": 1}
    assert not answered.exists() and manual.exists()
    assert app.catalog.get_archive(done.id).state == COMMITTED
    assert app.catalog.get_archive(undone.id).state == FAILED
    assert backend.stat(undone.key) is None
    assert [a.id for a in app.catalog.list_archives()] == [done.id]
    assert not (sim.checkpoint_dir / undone.node_path).exists()


def test_reconcile_fails_a_pending_row_whose_manifest_is_not_what_it_wrote(app_factory) -> None:  # type: ignore[no-untyped-def]
    """A manifest at a pending row's key that fails the schema, disagrees with its key or names
    another object completes nothing: the row fails with the reason, the daemon still starts,
    and what is in the bucket is left for `catalog rebuild` and `verify` to report."""
    app = app_factory()
    app.runner.cycle(web_policy(app, keep_on_node=5))
    app.runner.cycle(web_policy(app, keep_on_node=5))
    archives = app.catalog.list_archives()
    backend = app.backends["local"]
    written = [json.loads(layout.read_manifest(backend, layout.manifest_key(a.key)).to_json()) for a in archives]
    tampered = {
        archives[0].id: json.dumps({**written[0], "namespace": "evil"}).encode(),
        archives[1].id: b'{"tar_size": 99999999999999999999999}',
        # agrees with its key, but names the encrypted object beside it, not the row's
        archives[2].id: json.dumps({**written[2], "key": archives[2].key + ".age", "encryption": "age"}).encode(),
        archives[3].id: json.dumps({**written[3], "checkpoint_time": "2026-01-01T00:00:00"}).encode(),
    }
    for a in archives:
        backend.delete(layout.manifest_key(a.key))
        backend.put_bytes(layout.manifest_key(a.key), tampered[a.id])
        app.catalog.update_archive(a.id, state=PENDING)
    counts = app.pipeline.reconcile()
    assert (counts["completed"], counts["failed"]) == (0, 4)
    errors = {a.id: a.error or "" for a in app.catalog.list_archives(states=(FAILED,))}
    assert errors.keys() == tampered.keys()
    assert "disagrees with its key: namespace is 'default' in the key, 'evil' in the manifest" in errors[archives[0].id]
    assert "tar_size: Input should be less than" in errors[archives[1].id]
    assert f"names the object {archives[2].key + '.age'!r}, not {archives[2].key!r}" in errors[archives[2].id]
    assert "checkpoint_time: must be an RFC 3339 time" in errors[archives[3].id]
    assert all(backend.stat(a.key) is not None for a in archives)  # reported, not deleted


def test_failed_commit_removes_the_node_tar_and_temp_files(app_factory, sim: NodeSimulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from backupd.backends.wrappers import Fault, FaultInjectingBackend
    from backupd.errors import StorageError

    app = app_factory()
    policy = web_policy(app)
    # the manifest write fails after the object was stored
    app.backends["local"] = FaultInjectingBackend(
        app.backends["local"], [Fault("put", key="*.json", error=StorageError("disk went away"), times=None)])
    result = app.runner.cycle(policy)
    assert result.failed
    assert app.catalog.list_archives() == []
    assert {a.state for a in app.catalog.list_archives(states=(FAILED,))} == {FAILED}
    assert list(sim.checkpoint_dir.glob("checkpoint-*.tar")) == []
    assert [p for p in (tmp_path / "backend").rglob("*") if p.is_file()] == []
    assert not list((tmp_path / "backend").rglob(TEMP_PREFIX + "*"))
