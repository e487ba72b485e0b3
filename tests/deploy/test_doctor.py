"""``backupd doctor`` against the node simulator (real mTLS) failing in each way the doctor
must recognise, a real SQLite/PostgreSQL catalog, filesystem backends and moto's S3 server.

Most cases call :func:`backupd.doctor.diagnose` in-process (fast); the CLI cases run the real
``backupd`` command as a subprocess, as an operator would with ``kubectl exec``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backupd.catalog.store import Catalog
from backupd.doctor import Report, diagnose
from backupd.errors import EXIT_CATALOG, EXIT_INVALID_INPUT, EXIT_KUBELET, EXIT_OK, EXIT_STORAGE
from backupd.node.kubelet import Target
from backupd.policy.document import parse_policies
from backupd.simulator.pki import generate_pki
from backupd.simulator.server import NodeSimulator

DB_RUNNING = Target("shop", "db-0", "postgres")  # a running container of the default topology


def toml(sections: dict[str, dict[str, Any]], backends: list[dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in values.items()]
    for b in backends:
        out.append("[[backends]]")
        out += [f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in b.items()]
    return "\n".join(out) + "\n"


def write_config(tmp_path: Path, sim: NodeSimulator, *, db_url: str | None = None,
                 backends: list[dict[str, Any]] | None = None, **changes: dict[str, Any]) -> Path:
    """The config an operator would write for this node; ``changes`` override keys per
    section (a value of None removes the key)."""
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": db_url or f"sqlite:///{tmp_path / 'catalog.db'}"},
        "kubelet": {"url": sim.url, "ca_file": sim.ca_file, "cert_file": sim.client_cert,
                    "key_file": sim.client_key, "checkpoint_dir": sim.checkpoint_dir, "node_name": "sim-node"},
        "daemon": {"min_free_space": 0},
    }
    for section, values in changes.items():
        for key, value in values.items():
            if value is None:
                sections[section].pop(key, None)
            else:
                sections[section][key] = value
    if backends is None:
        backends = [{"name": "local", "type": "filesystem", "path": tmp_path / "backend"}]
    path = tmp_path / "config.toml"
    path.write_text(toml(sections, backends))
    return path


@pytest.fixture
def upgraded(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog.open(url)
    catalog.upgrade()
    catalog.close()
    return url


def by_name(report: Report) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


def statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def backupd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    return subprocess.run([sys.executable, "-m", "backupd", *args], capture_output=True, text=True, env=env,
                          timeout=120)


# -- the CLI as an operator runs it ------------------------------------------------------


def test_healthy_node_passes_every_check_in_one_line_each(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    cfg = write_config(tmp_path, sim)
    proc = backupd("--config", str(cfg), "doctor")
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    names = ["config", "catalog", "kubelet-tls", "kubelet-credentials", "kubelet-pods", "checkpoint-api",
             "runtime", "checkpoint-dir", "backend:local"]
    assert [line.split()[1] for line in lines[:-1]] == names
    assert all(line.startswith("✓ ") for line in lines[:-1] if " runtime " not in line), proc.stdout
    runtime = next(line for line in lines if " runtime " in line)
    assert runtime.startswith("- ") and "not tested" in runtime and "--checkpoint-test" in runtime
    assert lines[-1] == "nothing blocks checkpoints on this node"
    # the probes leave nothing behind
    assert list(sim.checkpoint_dir.iterdir()) == []
    assert [p for p in (tmp_path / "backend").rglob("*") if p.is_file()] == []
    # the API probe asked for a pod that cannot exist, and nothing else was checkpointed
    posted = [r.path for r in sim.requests if r.method == "POST"]
    assert posted == ["/checkpoint/backupd_doctor/probe_no_such_pod/probe"]


def test_checkpoint_test_proves_the_runtime_and_removes_the_node_tar(
    tmp_path: Path, sim: NodeSimulator, upgraded: str
) -> None:
    cfg = write_config(tmp_path, sim)
    proc = backupd("--config", str(cfg), "doctor", "--checkpoint-test", str(DB_RUNNING), "--output", "json")
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["exit_code"] == 0 and report["node"] == "sim-node"
    runtime = next(c for c in report["checks"] if c["name"] == "runtime")
    assert runtime["status"] == "ok" and "checkpointed shop/db-0/postgres" in runtime["message"]
    assert {c["status"] for c in report["checks"]} == {"ok"}
    assert any(r.path == "/checkpoint/shop/db-0/postgres" and r.status == 200 for r in sim.requests)
    assert list(sim.checkpoint_dir.iterdir()) == []  # the node tar it produced is gone


def test_bad_checkpoint_test_value_exits_2_naming_it(tmp_path: Path, sim: NodeSimulator) -> None:
    proc = backupd("--config", str(write_config(tmp_path, sim)), "doctor", "--checkpoint-test", "shop/db-0")
    assert proc.returncode == EXIT_INVALID_INPUT
    assert "'shop/db-0'" in proc.stderr and "NAMESPACE/POD/CONTAINER" in proc.stderr


def test_invalid_config_exits_2_and_tests_nothing_else(tmp_path: Path, sim: NodeSimulator) -> None:
    cfg = write_config(tmp_path, sim, daemon={"max_concurent_checkpoints": 4})
    proc = backupd("--config", str(cfg), "doctor", "-o", "json")
    assert proc.returncode == EXIT_INVALID_INPUT, proc.stderr
    report = json.loads(proc.stdout)
    config, *rest = report["checks"]
    assert config["status"] == "failed" and "daemon.max_concurent_checkpoints: unknown key" in config["message"]
    assert {c["status"] for c in rest} == {"skipped"}
    assert sim.requests == []


def test_blocking_failure_lines_name_the_fix_and_set_the_exit_code(tmp_path: Path, sim: NodeSimulator) -> None:
    sim.checkpoint_api_enabled = False
    cfg = write_config(tmp_path, sim)  # and no `db upgrade`: the catalog fails first
    proc = backupd("--config", str(cfg), "doctor")
    assert proc.returncode == EXIT_CATALOG, proc.stdout + proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines()[:-1]}
    assert lines["catalog"].startswith("✗ ") and "fix: run `backupd db upgrade`" in lines["catalog"]
    assert lines["checkpoint-api"].startswith("✗ ") and "ContainerCheckpoint" in lines["checkpoint-api"]
    assert proc.stdout.splitlines()[-1] == "2 problem(s) block checkpoints on this node"


# -- catalog -----------------------------------------------------------------------------


def test_catalog_unreachable(tmp_path: Path, sim: NodeSimulator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    report = diagnose(write_config(tmp_path, sim, db_url=f"postgresql+psycopg://backupd@127.0.0.1:{port}/backupd"))
    catalog = by_name(report)["catalog"]
    assert catalog.status == "failed" and catalog.error_kind == "CatalogUnavailable"
    assert "database server is up" in catalog.fix and report.exit_code == EXIT_CATALOG


def test_catalog_on_postgresql_is_checked_too(tmp_path: Path, sim: NodeSimulator, pg_url: str) -> None:
    report = diagnose(write_config(tmp_path, sim, db_url=pg_url))
    assert by_name(report)["catalog"].error_kind == "SchemaOutdated"
    catalog = Catalog.open(pg_url)
    catalog.upgrade()
    catalog.close()
    report = diagnose(write_config(tmp_path, sim, db_url=pg_url))
    assert by_name(report)["catalog"].ok is True and report.exit_code == EXIT_OK


# -- kubelet -----------------------------------------------------------------------------


def test_kubelet_certificate_not_signed_by_the_configured_ca(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    other = generate_pki(tmp_path / "other-pki")
    report = diagnose(write_config(tmp_path, sim, kubelet={"ca_file": other.ca_file}))
    s = statuses(report)
    tls = by_name(report)["kubelet-tls"]
    assert tls.status == "failed" and tls.error_kind == "KubeletTLSError" and "serverTLSBootstrap" in tls.fix
    assert [s[n] for n in ("kubelet-credentials", "kubelet-pods", "checkpoint-api", "runtime")] == ["skipped"] * 4
    assert report.exit_code == EXIT_KUBELET


def test_kubelet_unreachable(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = diagnose(write_config(tmp_path, sim, kubelet={"url": f"https://127.0.0.1:{port}"}))
    tls = by_name(report)["kubelet-tls"]
    assert tls.error_kind == "KubeletUnreachable" and "NODE_IP" in tls.fix and report.exit_code == EXIT_KUBELET


def test_credentials_refused_401(tmp_path: Path, upgraded: str) -> None:
    with NodeSimulator(tmp_path / "node", tokens={"the-right-token": "system:serviceaccount:backupd:backupd"}) as sim:
        token = tmp_path / "token"
        token.write_text("a-token-the-kubelet-does-not-know\n")
        cfg = write_config(tmp_path, sim, kubelet={"cert_file": None, "key_file": None, "token_file": token})
        report = diagnose(cfg)
    checks = by_name(report)
    assert checks["kubelet-tls"].ok is True
    creds = checks["kubelet-credentials"]
    assert creds.status == "failed" and creds.error_kind == "KubeletUnauthorized"
    assert "authentication.webhook.enabled" in creds.fix
    assert "a-token-the-kubelet-does-not-know" not in json.dumps(report.to_json())
    assert checks["checkpoint-api"].status == "skipped" and report.exit_code == EXIT_KUBELET


def test_token_file_missing(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    cfg = write_config(tmp_path, sim, kubelet={"cert_file": None, "key_file": None,
                                               "token_file": tmp_path / "no-token-here"})
    creds = by_name(diagnose(cfg))["kubelet-credentials"]
    assert creds.status == "failed" and "no-token-here" in creds.message and "automountServiceAccountToken" in creds.fix


def test_rbac_without_create_nodes_checkpoint_403(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    sim.set_allowed_users({"backupd": ["pods"]})
    report = diagnose(write_config(tmp_path, sim))
    checks = by_name(report)
    assert checks["kubelet-credentials"].ok is True and checks["kubelet-pods"].ok is True
    api = checks["checkpoint-api"]
    assert api.status == "failed" and api.error_kind == "KubeletForbidden"
    assert '"nodes/checkpoint"' in api.fix and '"create"' in api.fix and report.exit_code == EXIT_KUBELET


def test_rbac_without_get_nodes_pods_403(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    sim.set_allowed_users({"backupd": ["checkpoint"]})
    report = diagnose(write_config(tmp_path, sim))
    checks = by_name(report)
    pods = checks["kubelet-pods"]
    assert pods.status == "failed" and pods.error_kind == "KubeletForbidden"
    assert '"nodes/pods"' in pods.fix and "nodes/proxy" in pods.fix
    assert checks["checkpoint-api"].ok is True and report.exit_code == EXIT_KUBELET


def test_checkpoint_api_disabled_plain_404(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    sim.checkpoint_api_enabled = False
    report = diagnose(write_config(tmp_path, sim), checkpoint_test=DB_RUNNING)
    checks = by_name(report)
    api = checks["checkpoint-api"]
    assert api.status == "failed" and api.error_kind == "CheckpointApiDisabled"
    assert "ContainerCheckpoint" in api.fix and "enableDebuggingHandlers" in api.fix
    assert checks["runtime"].status == "skipped"  # never asked to checkpoint the real container
    assert not any(r.path == "/checkpoint/shop/db-0/postgres" for r in sim.requests)
    assert report.exit_code == EXIT_KUBELET


# -- runtime -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["crio", "containerd"])
def test_runtime_without_checkpoint_support(tmp_path: Path, sim: NodeSimulator, upgraded: str, variant: str) -> None:
    sim.add_fault("unsupported", method="POST", path="/checkpoint/shop/*", variant=variant)
    report = diagnose(write_config(tmp_path, sim), checkpoint_test=DB_RUNNING)
    checks = by_name(report)
    assert checks["checkpoint-api"].ok is True  # the probe never reached the runtime
    runtime = checks["runtime"]
    assert runtime.status == "failed" and runtime.error_kind == "CheckpointUnsupported"
    assert "enable_criu_support = true" in runtime.fix and report.exit_code == EXIT_KUBELET


def test_cri_v1_only_message_is_unsupported_too(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    sim.add_fault("checkpoint_error", method="POST", path="/checkpoint/shop/*",
                  message="rpc error: code = Unimplemented desc = CheckpointContainer is only supported in the "
                          "CRI v1 runtime API")
    runtime = by_name(diagnose(write_config(tmp_path, sim), checkpoint_test=DB_RUNNING))["runtime"]
    assert runtime.error_kind == "CheckpointUnsupported" and runtime.blocks


def test_checkpoint_test_of_a_container_that_is_not_running_is_a_warning(
    tmp_path: Path, sim: NodeSimulator, upgraded: str
) -> None:
    cart = next(p for p in sim.pods if p.name.startswith("cart-"))
    report = diagnose(write_config(tmp_path, sim), checkpoint_test=Target("shop", cart.name, "cart"))
    runtime = by_name(report)["runtime"]
    assert runtime.status == "warning" and "running container" in runtime.fix
    assert report.exit_code == EXIT_OK


def test_runtime_judged_from_this_nodes_run_history(tmp_path: Path, sim: NodeSimulator, app_factory: Any) -> None:
    app = app_factory()
    policy = parse_policies(
        "apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: db}\nspec:\n"
        "  selector: {namespaces: [shop], containers: [postgres]}\n  schedule: '@every 1h'\n"
        "  backend: local\n  retention: {keepLast: 1}\n", "db.yaml", backends=["local"])[0]
    app.catalog.apply_policies([(policy.name, policy.canonical_json())])
    cfg = write_config(tmp_path, sim)

    sim.add_fault("unsupported", method="POST", path="/checkpoint/shop/*")
    assert app.runner.cycle(policy).failed
    runtime = by_name(diagnose(cfg))["runtime"]
    assert runtime.status == "failed" and runtime.error_kind == "CheckpointUnsupported"
    assert "shop/db-0/postgres" in runtime.message and "enable_criu_support" in runtime.fix

    sim.clear_faults()
    assert not app.runner.cycle(policy).failed
    runtime = by_name(diagnose(cfg))["runtime"]
    assert runtime.ok is True and "succeeded" in runtime.message

    # another node's history says nothing about this one
    other = write_config(tmp_path, sim, kubelet={"node_name": "another-node"})
    assert by_name(diagnose(other))["runtime"].status == "skipped"


# -- checkpoint directory ----------------------------------------------------------------


def test_checkpoint_dir_missing(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    report = diagnose(write_config(tmp_path, sim, kubelet={"checkpoint_dir": tmp_path / "not-mounted"}))
    check = by_name(report)["checkpoint-dir"]
    assert check.status == "failed" and "not-mounted" in check.message and "hostPath" in check.fix
    assert report.exit_code == EXIT_STORAGE


def test_checkpoint_dir_not_a_directory(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    (tmp_path / "a-file").write_text("")
    check = by_name(diagnose(write_config(tmp_path, sim, kubelet={"checkpoint_dir": tmp_path / "a-file"})))[
        "checkpoint-dir"]
    assert check.status == "failed" and "not a directory" in check.message


def test_checkpoint_dir_below_the_free_space_floor(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    report = diagnose(write_config(tmp_path, sim, daemon={"min_free_space": "1000000Ti"}))
    check = by_name(report)["checkpoint-dir"]
    assert check.status == "failed" and check.error_kind == "NoSpace" and "min_free_space" in check.fix
    assert report.exit_code == EXIT_STORAGE


def test_checkpoint_dir_reads_an_existing_node_tar(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    tar = sim.checkpoint_dir / "checkpoint-web_default-nginx-2026-03-13T21:43:06Z.tar"
    tar.write_bytes(b"x" * 4096)
    os.chmod(tar, 0o600)
    check = by_name(diagnose(write_config(tmp_path, sim)))["checkpoint-dir"]
    assert check.ok is True and "1 node tar(s)" in check.message
    assert [p.name for p in sim.checkpoint_dir.iterdir()] == [tar.name]  # untouched


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permission bits; run as a non-root user to test this")
def test_checkpoint_dir_not_writable(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    os.chmod(sim.checkpoint_dir, 0o500)
    try:
        check = by_name(diagnose(write_config(tmp_path, sim)))["checkpoint-dir"]
    finally:
        os.chmod(sim.checkpoint_dir, 0o700)
    assert check.status == "failed" and "uid 0" in check.fix


# -- backends ----------------------------------------------------------------------------


def test_filesystem_backend_not_writable(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    (tmp_path / "a-file").write_text("")
    report = diagnose(write_config(tmp_path, sim, backends=[
        {"name": "good", "type": "filesystem", "path": tmp_path / "good"},
        {"name": "bad", "type": "filesystem", "path": tmp_path / "a-file" / "below"},
    ]))
    checks = by_name(report)
    assert checks["backend:good"].ok is True
    bad = checks["backend:bad"]
    assert bad.status == "failed" and "a-file" in bad.fix and report.exit_code == EXIT_STORAGE


def test_no_backend_configured(tmp_path: Path, sim: NodeSimulator, upgraded: str) -> None:
    report = diagnose(write_config(tmp_path, sim, backends=[]))
    assert by_name(report)["backends"].status == "failed" and report.exit_code == EXIT_INVALID_INPUT


def s3_backend(endpoint: str, bucket: str, tmp_path: Path) -> dict[str, Any]:
    from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION

    (tmp_path / "key-id").write_text(FAKE_ACCESS_KEY)
    (tmp_path / "secret").write_text(FAKE_SECRET)
    return {"name": "s3", "type": "s3", "bucket": bucket, "prefix": "prod", "endpoint_url": endpoint,
            "region": REGION, "addressing_style": "path", "access_key_id_file": tmp_path / "key-id",
            "secret_access_key_file": tmp_path / "secret"}


def test_s3_backend_probe_object_written_and_removed(
    tmp_path: Path, sim: NodeSimulator, upgraded: str, moto_endpoint: str, s3_bucket: str, s3_admin: Any
) -> None:
    report = diagnose(write_config(tmp_path, sim, backends=[s3_backend(moto_endpoint, s3_bucket, tmp_path)]))
    check = by_name(report)["backend:s3"]
    assert check.ok is True and s3_bucket in check.message and report.exit_code == EXIT_OK
    assert s3_admin.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0  # the probe is gone


def test_s3_bucket_missing(
    tmp_path: Path, sim: NodeSimulator, upgraded: str, moto_endpoint: str, s3_bucket: str
) -> None:
    from tests.s3_rig import FAKE_SECRET

    report = diagnose(write_config(tmp_path, sim, backends=[s3_backend(moto_endpoint, s3_bucket + "-nope", tmp_path)]))
    check = by_name(report)["backend:s3"]
    assert check.status == "failed" and check.error_kind == "StorageNotFound" and "create the bucket" in check.fix
    assert FAKE_SECRET not in json.dumps(report.to_json()) and report.exit_code == EXIT_STORAGE
