"""Everything backupd writes is private: files 0600, directories 0700 -- the SQLite catalog and
its -wal/-shm files, the backend tree, temp files, restored tars and OCI layouts, reports --
whatever the umask of whoever started it (the session below runs with umask 000)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupd.simulator.server import NodeSimulator
from tests.policies import web_policy

POLICY = web_policy(retention="{keepLast: 2}", schedule="@every 1s")


def modes(*roots: Path) -> dict[str, str]:
    """``path -> octal mode`` of every file and directory under ``roots`` (roots included)."""
    out = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # a temp file or -shm that went away while walking
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                out[str(path)] = oct(stat.S_IMODE(st.st_mode))
    return out


def wrong(found: dict[str, str]) -> dict[str, str]:
    return {p: m for p, m in found.items()
            if m != ("0o700" if os.path.isdir(p) else "0o600")}


@pytest.mark.parametrize("fmt", ["full", "dedup"])
def test_files_0600_and_directories_0700_everywhere_backupd_writes(tmp_path: Path, sim: NodeSimulator,
                                                                    fmt: str) -> None:
    state, backend, out = tmp_path / "state", tmp_path / "backend", tmp_path / "out"
    out.mkdir(mode=0o700)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{state / "db" / "catalog.db"}"\n'
        f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
        f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
        f'[daemon]\nmin_free_space = 0\nhttp_listen = "127.0.0.1:0"\nshutdown_grace_seconds = 10\n'
        f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{backend / "deep" / "root"}"\n'
        f'format = "{fmt}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}

    def backupd(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([sys.executable, "-m", "backupd", "--config", str(config), *args], input=stdin,
                              capture_output=True, text=True, env=env, timeout=120, preexec_fn=lambda: os.umask(0))
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr[-2000:])
        return proc.stdout

    backupd("db", "upgrade")
    backupd("policy", "apply", "-f", "-", stdin=POLICY)
    backupd("checkpoint")
    backupd("checkpoint")
    backupd("prune")
    backupd("verify")
    archive = backupd("list").splitlines()[1].split()[0]
    backupd("restore", archive, "--to", str(out / "restored.tar"))
    backupd("restore", archive, "--oci-layout", str(out / "layout"))
    backupd("report", "-o", "html", "--out", str(out / "report.html"))

    daemon = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "run"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: os.umask(0))
    during: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(p.endswith("-wal") for p in during):
            during.update(modes(state, backend))
            time.sleep(0.05)
        for _ in range(40):  # the daemon checkpoints every second: catch its temp files too
            during.update(modes(state, backend))
            time.sleep(0.05)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.stderr.read()[-2000:] if daemon.stderr else ""

    after = modes(state, backend, *[p for p in out.iterdir()])
    created = {**during, **after}
    names = {Path(p).name for p in created}
    assert {"catalog.db", "catalog.db-wal", "catalog.db-shm", "restored.tar", "report.html", "index.json"} <= names
    stored = (".tar.zst",) if fmt == "full" else (".pack", ".recipe")
    assert all(any(name.endswith(suffix) for name in names) for suffix in stored), sorted(names)
    assert any(name.endswith(".json") for name in names)
    assert str(state) in created and str(backend / "deep") in created, "backupd did not create its own directories"
    assert wrong(created) == {}
