"""``backupd report`` on a real catalog filled by real cycles against the node simulator: the
numbers, the three formats, the private output file, and bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from backupd.app import App
from backupd.cli import main
from backupd.policy.document import Policy, parse_policies
from backupd.report.load import load_report
from backupd.report.model import OK
from backupd.simulator.server import NodeSimulator
from backupd.storage.prune import plan_policy
from tests.policies import web_policy
from tests.report.browser import Browser


def fill(app: App, sim: NodeSimulator) -> Policy:
    """Two cycles over the two web replicas; in the second one replica's checkpoint fails."""
    policy = parse_policies(web_policy(retention="{keepLast: 2}"), "web.yaml", backends=["local"])[0]
    app.catalog.apply_policies([(policy.name, policy.canonical_json())])
    assert not app.runner.cycle(policy).failed
    pods = sorted(p.name for p in sim.pods if p.namespace == "default" and p.labels.get("app") == "web")
    sim.add_fault("checkpoint_error", method="POST", path=f"/checkpoint/default/{pods[1]}/nginx",
                  message="criu dump failed: Resource temporarily unavailable")
    assert app.runner.cycle(policy).failed
    sim.clear_faults()
    return policy


def test_report_from_a_real_catalog(db_url: str, app_factory, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(db_url)
    policy = fill(app, sim)
    report = load_report(app.catalog)
    [w] = list(report.workloads())
    archives = app.catalog.list_archives(policy="web")
    assert (w.policy, w.namespace, w.workload, w.container) == ("web", "default", "deployment/web", "nginx")
    assert w.status == OK and w.failing and w.archives == len(archives) == 3
    assert w.stored_bytes == sum(a.stored_size or 0 for a in archives)
    assert w.newest == max(a.checkpoint_time for a in archives)
    assert w.last_failure is not None and w.last_failure.error_kind == "CheckpointFailed"
    assert "Resource temporarily unavailable" in (w.last_failure.error or "")
    assert {p.id for p in w.prune_remove} == {a.id for plan in plan_policy(policy, archives) for a in plan.remove}
    assert len(w.prune_remove) == 1
    assert report.policies[0].next_run is not None and report.policies[0].next_run > w.newest


def backupd(cfg: Path, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: a new process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    proc = subprocess.run([sys.executable, "-m", "backupd", "--config", str(cfg), *args], capture_output=True,
                          text=True, env=env, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def in_process(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str, check: int = 0) -> tuple[str, str]:
    """The same entry point without a new interpreter each time (stdout, stderr)."""
    capsys.readouterr()
    saved = structlog.get_config()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["--config", str(cfg), *args])
    finally:
        # main() configures logging onto this test's captured stderr, which closes with the test
        structlog.configure(**saved)
    out, err = capsys.readouterr()
    assert exit_.value.code == check, (exit_.value.code, out, err)
    return out, err


def test_report_command(app_factory, sim: NodeSimulator, tmp_path: Path,  # type: ignore[no-untyped-def]
                        capsys: pytest.CaptureFixture[str]) -> None:
    app = app_factory()
    fill(app, sim)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n'
        f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
        f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
    )

    doc = json.loads(backupd(cfg, "report", "--output", "json").stdout)
    assert doc["format"] == "backupd.report/v1"
    assert doc["summary"] | {"stored_bytes": 0} == {
        "policies": 1, "workloads": 1, "ok": 1, "late": 0, "missing": 0, "unmanaged": 0, "failing": 1,
        "archives": 3, "stored_bytes": 0, "prune_remove_archives": 1,
        "prune_remove_bytes": doc["summary"]["prune_remove_bytes"]}
    workload = doc["policies"][0]["workloads"][0]
    assert workload["failing"] and workload["last_failure"]["error_kind"] == "CheckpointFailed"
    assert [p["keep"] for p in workload["timeline"]] == [False, True, True]

    table, _ = in_process(capsys, cfg, "report")
    assert "1 workload(s): 1 OK, 0 LATE, 0 MISSING (1 failing)" in table
    assert "OK!" in table and "deployment/web" in table and "CheckpointFailed" in table

    out = tmp_path / "reports" / "report.html"
    out.parent.mkdir()
    out.write_text("an older report, world-readable")
    os.chmod(out, 0o644)
    in_process(capsys, cfg, "report", "--output", "html", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # replaced, not rewritten in place
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temp file left
    page = out.read_text()
    assert page.startswith("<!doctype html>") and page.count('class="timeline"') == 1

    with Browser(tmp_path, height=1400) as browser:
        browser.open(out.as_uri())
        facts = browser.evaluate("({dots: document.querySelectorAll('svg.timeline circle').length,"
                                 " charts: document.querySelectorAll('svg.storage path').length})")
        errors, requests = browser.errors, browser.requests
    assert errors == [] and requests == [out.as_uri()]
    assert facts == {"dots": 3, "charts": 2}

    _, err = in_process(capsys, cfg, "report", "--output", "xml", check=2)
    assert "'xml' is not one of 'table', 'json', 'yaml', 'html'" in err
    _, err = in_process(capsys, cfg, "report", "--out", str(out.parent), check=2)
    assert f"'{out.parent}' is a directory" in err
    _, err = in_process(capsys, cfg, "report", "--out", str(tmp_path / "no-such-dir" / "r.json"), check=2)
    assert "no-such-dir" in err and "cannot write" in err
    _, err = in_process(capsys, cfg, "report", "--stale-intervals", "0", check=2)
    assert "--stale-intervals" in err
