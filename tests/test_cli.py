"""The command line as users run it: a subprocess, a TOML config, exit codes, JSON output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupd.simulator.server import NodeSimulator

POLICY = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: web}
spec:
  selector: {namespaces: [default], matchLabels: {app: web}}
  schedule: "@every 2s"
  backend: local
  retention: {keepLast: 3}
"""


@pytest.fixture
def cfg(tmp_path: Path, sim: NodeSimulator) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n'
        f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
        f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
        f'[daemon]\nmin_free_space = 0\nshutdown_grace_seconds = 10\nhttp_listen = "127.0.0.1:0"\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path / "backend"}"\n'
    )
    return path


def backupd(cfg: Path | None, *args: str, stdin: str | None = None, check: int | None = 0,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``backupd [--config CFG] ARGS`` in a new process; the test's BACKUPD_* variables are hidden, ``env`` adds."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")} | (env or {})
    config = ["--config", str(cfg)] if cfg is not None else []
    proc = subprocess.run([sys.executable, "-m", "backupd", *config, *args], input=stdin,
                          capture_output=True, text=True, env=environment, timeout=120, cwd=cwd)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_daemon_refuses_an_outdated_schema(cfg: Path) -> None:
    proc = backupd(cfg, "run", check=4)
    assert "run `backupd db upgrade`" in proc.stderr


def test_policy_lifecycle_and_a_checkpoint_cycle(cfg: Path, tmp_path: Path) -> None:
    assert "upgraded from empty" in backupd(cfg, "db", "upgrade").stdout
    assert "checkpointpolicy/web created" in backupd(cfg, "policy", "apply", "-f", "-", stdin=POLICY).stdout
    assert "checkpointpolicy/web unchanged" in backupd(cfg, "policy", "apply", "-f", "-", stdin=POLICY).stdout
    listed = json.loads(backupd(cfg, "policy", "list", "--output", "json").stdout)
    assert listed[0]["metadata"]["name"] == "web" and listed[0]["spec"]["retention"] == {"keepLast": 3}
    out = backupd(cfg, "checkpoint", "--policy", "web").stdout
    assert out.count("succeeded") == 2
    archives = json.loads(backupd(cfg, "list", "--output", "json").stdout)
    assert len(archives) == 2
    assert {a["workload"] for a in archives} == {"deployment/web"}
    assert all(len(a["tar_sha256"]) == 64 and a["state"] == "committed" for a in archives)
    table = backupd(cfg, "list", "--workload", "deployment/web").stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "TIME", "NAMESPACE"] and len(table.splitlines()) == 3
    assert backupd(cfg, "list", "--namespace", "nowhere", "-o", "json").stdout.strip() == "[]"
    backupd(cfg, "policy", "delete", "web")
    assert json.loads(backupd(cfg, "policy", "list", "-o", "json").stdout) == []
    assert "no policy named 'web'" in backupd(cfg, "policy", "delete", "web", check=3).stderr


def test_bad_policy_file_applies_nothing_and_exits_2(cfg: Path, tmp_path: Path) -> None:
    backupd(cfg, "db", "upgrade")
    bad = POLICY + "---\n" + POLICY.replace("name: web", "name: db").replace("keepLast: 3", "keepLast: lots")
    proc = backupd(cfg, "policy", "apply", "-f", "-", stdin=bad, check=2)
    assert "document 2 ('db'): spec.retention.keepLast" in proc.stderr and "'lots'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(backupd(cfg, "policy", "list", "-o", "json").stdout) == []
    proc = backupd(cfg, "policy", "apply", "-f", "-", stdin="key: [unclosed\n", check=2)
    assert "not valid YAML" in proc.stderr


def test_invalid_config_exits_2_naming_the_key(cfg: Path) -> None:
    cfg.write_text(cfg.read_text().replace("[daemon]\n", "[daemon]\nmax_concurent_checkpoints = 4\n"))
    proc = backupd(cfg, "list", check=2)
    assert "daemon.max_concurent_checkpoints: unknown key" in proc.stderr


def test_failed_checkpoints_exit_8(cfg: Path, sim: NodeSimulator) -> None:
    backupd(cfg, "db", "upgrade")
    backupd(cfg, "policy", "apply", "-f", "-", stdin=POLICY)
    sim.add_fault("respond", method="POST", path="/checkpoint/*", status=403, times=None,
                  body="Forbidden (user=backupd, verb=create, resource=nodes, subresource(s)=[checkpoint])\n")
    proc = backupd(cfg, "checkpoint", check=8)
    assert proc.stdout.count("failed") >= 2 and "nodes/checkpoint" in proc.stdout


def test_run_logs_json_and_stops_cleanly_on_sigterm(cfg: Path) -> None:
    backupd(cfg, "db", "upgrade")
    backupd(cfg, "policy", "apply", "-f", "-", stdin=POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    log = cfg.parent / "daemon.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(cfg), "run"], env=env,
                                stdout=subprocess.DEVNULL, stderr=sink, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and log.read_text().count('"run_finished"') < 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    err = log.read_text()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    finished = [e for e in lines if e["event"] == "run_finished"]
    assert len(finished) >= 4 and all(e["outcome"] == "succeeded" for e in finished)
    assert all({"bytes_in", "bytes_out", "duration_seconds", "policy", "container"} <= e.keys() for e in finished)
    assert any(e["event"] == "daemon_stopped" and e["clean"] for e in lines)


def test_policy_apply_refuses_a_schedule_that_never_fires_and_list_survives_a_stored_one(cfg: Path,
                                                                                        tmp_path: Path) -> None:
    from backupd.catalog.store import Catalog

    backupd(cfg, "db", "upgrade")
    proc = backupd(cfg, "policy", "apply", "-f", "-", stdin=POLICY.replace("@every 2s", "0 0 30 2 *"), check=2)
    assert "spec.schedule: cron expression '0 0 30 2 *' never fires" in proc.stderr
    assert "Traceback" not in proc.stderr
    backupd(cfg, "policy", "apply", "-f", "-", stdin=POLICY)
    # one stored by an older backupd, which accepted it
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.apply_policies([("feb30", '{"schedule": "0 0 30 2 *", "backend": "local", "retention": {"keepLast": 1}}')])
    catalog.close()
    proc = backupd(cfg, "policy", "list")
    assert "stored policy 'feb30': spec.schedule: cron expression '0 0 30 2 *' never fires" in proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "INVALID" in rows["feb30"] and "keepLast=3" in rows["web"]
    listed = {p["metadata"]["name"]: p for p in json.loads(backupd(cfg, "policy", "list", "-o", "json").stdout)}
    assert listed["feb30"]["spec"]["schedule"] == "0 0 30 2 *" and "never fires" in listed["feb30"]["error"]
    assert listed["web"]["error"] is None and listed["web"]["generation"] == 1
    assert listed["web"]["updated_at"].endswith("Z")  # RFC 3339 UTC, as every JSON time of backupd


@pytest.mark.parametrize(("change", "env", "expected"), [
    (None, {"BACKUPD_DATABSE__URL": "sqlite:////tmp/x.db"},
     "BACKUPD_DATABSE__URL: unknown variable: no config section 'databse'"),
    (None, {"BACKUPD_BACKENDS": '[{"name": "x"'}, "BACKUPD_BACKENDS: not valid JSON ("),
    (lambda text: text.encode() + b"# caf\xe9\n", {}, "not UTF-8 text (byte"),
    (lambda text: text.replace("[daemon]", "[daemon"), {}, "not valid TOML: "),
    (lambda text: text.replace(text.split("path = ")[1].split("\n")[0], '""'), {},
     "backends.0.filesystem.path: must not be empty"),
    (lambda text: text.replace(text.split("ca_file = ")[1].split("\n")[0], '""'), {},
     "kubelet.ca_file: must not be empty"),
    (lambda text: text.replace(text.split("checkpoint_dir = ")[1].split("\n")[0], '""'), {},
     "kubelet.checkpoint_dir: must not be empty"),
])
def test_config_errors_exit_2_naming_the_key_without_a_traceback(cfg: Path, change, env: dict[str, str],  # type: ignore[no-untyped-def]
                                                                 expected: str) -> None:
    if change is not None:
        changed = change(cfg.read_text())
        cfg.write_bytes(changed if isinstance(changed, bytes) else changed.encode())
    proc = backupd(cfg, "list", env=env, check=2)
    assert expected in proc.stderr and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


NEEDS_CONFIG = [("list",), ("report",), ("policy", "list"), ("checkpoint",), ("prune", "--dry-run"), ("verify",),
                ("db", "upgrade"), ("run",), ("pin", "abcdef12"), ("restore", "abcdef12", "--to", "x.tar"),
                ("inspect", "abcdef12"), ("catalog", "rebuild"), ("doctor",)]


@pytest.mark.skipif(Path("/etc/backupd/config.toml").exists(), reason="/etc/backupd/config.toml exists here")
@pytest.mark.parametrize("args", NEEDS_CONFIG, ids=" ".join)
def test_without_a_config_file_a_command_says_so_and_creates_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    default_catalog_dir = Path("/var/lib/backupd")
    existed = default_catalog_dir.exists()
    home = tmp_path / "home"
    home.mkdir()
    proc = backupd(None, *args, env={"HOME": str(home)}, cwd=home, check=2)
    assert ("no config file: give --config FILE, set BACKUPD_CONFIG, or create /etc/backupd/config.toml "
            "(see config/example.toml)") in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(home.iterdir()) == [] and default_catalog_dir.exists() == existed


def test_retention_simulate_measures_windows_from_now_by_default(tmp_path: Path) -> None:
    """As restic's forget: an archive dated in the future does not anchor keep-within windows
    (before, the default anchor was the newest archive, wherever it was). Needs no config."""
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC).replace(microsecond=0)
    recent, future = now - timedelta(hours=2), now + timedelta(days=30)
    times = tmp_path / "times.json"
    times.write_text(json.dumps([t.isoformat().replace("+00:00", "Z") for t in (future, recent)]))
    by_default = json.loads(backupd(None, "retention", "simulate", "-i", str(times), "--keep-within", "1d",
                                    cwd=tmp_path).stdout)
    assert len(by_default["keep"]) == 2 and by_default["remove"] == []  # recent: within a day of now
    anchored = json.loads(backupd(None, "retention", "simulate", "-i", str(times), "--keep-within", "1d",
                                  "--now", (future + timedelta(hours=1)).isoformat(), cwd=tmp_path).stdout)
    assert [k["reasons"] for k in anchored["keep"]] == [["within"]] and len(anchored["remove"]) == 1


HOURLY = POLICY.replace("@every 2s", "@hourly")
#: values that depend on the moment a command runs, not on the data
VOLATILE = {"generated_at", "recovery_point_age_seconds", "reason", "next_run", "bytes_read"}


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _camel_keys(value: object) -> set[str]:
    """Keys with an upper-case letter, outside policy documents (Kubernetes-style on purpose)."""
    if isinstance(value, list):
        return set().union(*map(_camel_keys, value))
    if not isinstance(value, dict) or "apiVersion" in value:
        return set()
    own = {k for k in value if k != k.lower()}
    return own.union(*map(_camel_keys, value.values()))


def test_yaml_output_is_the_json_data_for_every_listing_command(cfg: Path, tmp_path: Path) -> None:
    import structlog
    import yaml

    from tests.reliability.inprocess import run_cli  # the same entry point, without an interpreter per call

    backupd(cfg, "db", "upgrade")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(HOURLY)
    backupd(cfg, "policy", "apply", "-f", str(policy_file))
    taken = yaml.safe_load(backupd(cfg, "checkpoint", "-o", "yaml").stdout)
    assert [r["outcome"] for r in taken[0]["runs"]] == ["succeeded", "succeeded"]
    archive = json.loads(backupd(cfg, "list", "-o", "json").stdout)[0]["id"]
    times = tmp_path / "times.json"
    times.write_text('["2026-01-02T03:04:05Z", "2026-01-01T03:04:05Z"]')
    commands = [("list",), ("list", "--all-states"), ("policy", "list"), ("policy", "apply", "-f", str(policy_file)),
                ("prune", "--dry-run"), ("delete", "-n", "default", "--dry-run"), ("verify",), ("catalog", "rebuild"),
                ("report",), ("inspect", archive),
                ("retention", "simulate", "-i", str(times), "--keep-last", "1", "--now", "2026-02-01T00:00:00Z")]
    saved = structlog.get_config()
    try:
        for args in commands:
            code, out, err = run_cli(cfg, *args, "-o", "json")
            assert code == 0, (args, err)
            as_json = json.loads(out)
            code, text, err = run_cli(cfg, *args, "-o", "yaml")
            assert code == 0, (args, err)
            assert not text.lstrip().startswith(("{", "[")), (args, text[:200])  # block style, not JSON
            assert as_json and _stable(yaml.safe_load(text)) == _stable(as_json), args
            if args != ("catalog", "rebuild"):  # rebuild.py's report is being rewritten on its own branch
                assert _camel_keys(as_json) == set(), args
        _, doctor, _ = run_cli(cfg, "doctor", "-o", "json")
        assert json.loads(doctor)["checks"] and _camel_keys(json.loads(doctor)) == set()
    finally:
        structlog.configure(**saved)
    # keys are snake_case everywhere (the policy document itself is Kubernetes-style camelCase)
    pruned = json.loads(backupd(cfg, "prune", "--dry-run", "-o", "json").stdout)[0]
    assert {"dry_run", "bytes_freed"} <= pruned.keys() and "stored_size" in pruned["groups"][0]["decisions"][0]
    assert "bytes_read" in json.loads(backupd(cfg, "verify", "-o", "json").stdout)
    assert "'xml' is not one of 'table', 'json', 'yaml'" in backupd(cfg, "list", "-o", "xml", check=2).stderr


def test_n_is_namespace(cfg: Path, tmp_path: Path) -> None:
    backupd(cfg, "db", "upgrade")
    backupd(cfg, "policy", "apply", "-f", "-", stdin=HOURLY)
    backupd(cfg, "checkpoint")
    everything = json.loads(backupd(cfg, "list", "-o", "json").stdout)
    assert everything and json.loads(backupd(cfg, "list", "-n", "default", "-o", "json").stdout) == everything
    assert json.loads(backupd(cfg, "list", "-n", "nowhere", "-o", "json").stdout) == []
    out = tmp_path / "latest.tar"
    newest = max(everything, key=lambda a: (a["checkpoint_time"], a["id"]))
    restored = json.loads(backupd(cfg, "restore", "--latest", "-n", "default", "--workload", "deployment/web",
                                  "--container", newest["container"], "--to", str(out), "-o", "json").stdout)
    assert restored["archive"]["id"] == newest["id"] and restored["to"] == str(out)
    assert out.stat().st_size == restored["bytes"] == newest["tar_size"]
    # a local archive needs no config
    inspected = json.loads(backupd(None, "inspect", str(out), "-o", "json", cwd=tmp_path).stdout)
    assert inspected["container_name"] == newest["container"]


def _demo_hints(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("the catalog and the archives stay. Try:"))
    return [line.strip() for line in lines[start + 1:] if line.startswith("  ")]


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "backupd"


@pytest.mark.parametrize("how", ["console script from the repo root", "python -m backupd"])
def test_every_command_the_demo_prints_at_the_end_works_as_printed(tmp_path: Path, how: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    if how == "python -m backupd":
        cwd, start = tmp_path, [sys.executable, "-m", "backupd"]
        state = "demo"  # relative to cwd, as `make demo` gives .backupd/demo
    else:
        if not SCRIPT.is_file():
            pytest.skip(f"no console script beside {sys.executable}")
        cwd, start = ROOT, [os.path.relpath(SCRIPT, ROOT)]  # what `make demo` runs: .venv/bin/backupd
        state = str(tmp_path / "demo")
    demo = subprocess.run([*start, "demo", "--duration", "2", "--dir", state], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    hints = _demo_hints(demo.stdout)
    assert [h.split()[-1 if "inspect" not in h else -2] for h in hints] == ["list", "inspect", "report", "verify"]
    for hint in hints:
        proc = subprocess.run(hint, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (hint, proc.stdout, proc.stderr)
        assert proc.stdout.strip(), hint
