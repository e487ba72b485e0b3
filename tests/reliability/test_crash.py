"""SIGKILL of a real backupd process at every step of the commit and delete protocols, then a
restart: nothing committed is lost, nothing half-written is visible, nothing is duplicated.

The kill comes from ``python -m tests.faults`` (backupd with the faults of BACKUPD_TEST_FAULTS):
a fault-injecting wrapper around the real backend that sends SIGKILL to its own process just
before or just after a chosen backend call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupd.backends.filesystem import TEMP_PREFIX
from backupd.catalog.store import Catalog
from backupd.model import PENDING, RUNNING
from backupd.simulator.server import NodeSimulator
from backupd.storage import layout
from tests.faults import FAULTS_ENV
from tests.policies import web_policy

POLICY = web_policy(retention="{keepLast: 1}")


class Rig:
    def __init__(self, tmp_path: Path, sim: NodeSimulator) -> None:
        self.tmp, self.sim = tmp_path, sim
        # Two workers share the one kubelet slot: while one ships, the other waits on the
        # kubelet. A kubelet slower than shipping a small archive keeps the protocol steps of
        # the two containers in order (the first is committed before the second's tar exists),
        # so each step below is hit where its name says.
        sim.checkpoint_latency = 0.5
        self.backend = tmp_path / "backend"
        self.cfg = tmp_path / "config.toml"
        self.cfg.write_text(
            f'[database]\nurl = "sqlite:///{tmp_path / "catalog.db"}"\n'
            f'[kubelet]\nurl = "{sim.url}"\nca_file = "{sim.ca_file}"\ncert_file = "{sim.client_cert}"\n'
            f'key_file = "{sim.client_key}"\ncheckpoint_dir = "{sim.checkpoint_dir}"\nnode_name = "sim-node"\n'
            f'[daemon]\nmin_free_space = 0\nmax_concurrent_checkpoints = 1\nhttp_listen = "127.0.0.1:0"\n'
            f'shutdown_grace_seconds = 10\n'
            f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{self.backend}"\n'
        )
        self.run("db", "upgrade")
        self.run("policy", "apply", "-f", "-", stdin=POLICY)

    def env(self, faults: list[dict] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # `tests.faults`, from any directory
        if faults:
            env[FAULTS_ENV] = json.dumps(faults)
        return env

    def argv(self, *args: str, faults: list[dict] | None = None) -> list[str]:
        """The real ``backupd`` (with ``faults``: the same, its backends faulty) with this config."""
        return [sys.executable, "-m", "tests.faults" if faults else "backupd", "--config", str(self.cfg), *args]

    def run(self, *args: str, faults: list[dict] | None = None, stdin: str | None = None,
            expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args, faults=faults), input=stdin,
                              capture_output=True, text=True, env=self.env(faults), timeout=120)
        if expect is not None:
            assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr[-2000:])
        return proc

    def catalog(self) -> Catalog:
        return Catalog.open(f"sqlite:///{self.tmp / 'catalog.db'}")

    def assert_consistent(self) -> None:
        c = self.catalog()
        try:
            assert c.list_archives(states=(PENDING,)) == [], "a pending row survived the restart"
            assert c.list_runs(outcome=RUNNING) == [], "a run is still 'running'"
            listed = c.list_archives()
            files = {p.relative_to(self.backend).as_posix() for p in self.backend.rglob("*") if p.is_file()}
            assert not [f for f in files if Path(f).name.startswith(TEMP_PREFIX)], "temp files left"
            for a in listed:
                assert a.key in files and layout.manifest_key(a.key) in files, f"{a.id} listed but missing"
            archive_files = {f for f in files if not f.endswith(".json")}
            assert archive_files == {a.key for a in listed}, "objects without a committed archive"
            keys = [a.key for a in listed]
            assert len(keys) == len(set(keys))
            assert len({a.node_path for a in listed}) == len(listed), "one node tar committed twice"
        finally:
            c.close()
        assert list(self.sim.checkpoint_dir.glob("checkpoint-*.tar")) == [], "node tars left behind"


@pytest.fixture
def rig(tmp_path: Path, sim: NodeSimulator) -> Rig:
    return Rig(tmp_path, sim)


COMMIT_STEPS = {
    "before the object put": {"operation": "put", "key": "*.tar.zst"},
    "after the object put": {"operation": "put", "key": "*.tar.zst", "after": True},
    "before the manifest put": {"operation": "put", "key": "*.json"},
    "after the manifest put (before the row is committed)": {"operation": "put", "key": "*.json", "after": True},
    "after the row is committed (at the next container's put)": {"operation": "put", "key": "*.tar.zst", "skip": 1},
}


@pytest.mark.parametrize("step", list(COMMIT_STEPS))
def test_sigkill_during_the_commit_protocol(rig: Rig, step: str) -> None:
    crashed = rig.run("checkpoint", faults=[{**COMMIT_STEPS[step], "kill": True}], expect=None)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    # The kubelet names tars by the second: a restart within the same second would get the
    # killed run's file name again (the in-process one-second gate died with the process).
    time.sleep(1.1)
    rig.run("checkpoint")  # restart: reconciles, then a full cycle
    rig.assert_consistent()
    c = rig.catalog()
    try:
        runs = c.list_runs(policy="web", limit=100)
        archives = {a.id for a in c.list_archives()}
        # the restart's cycle took both containers; an archive whose manifest was written before
        # the kill exists (committed, or completed by reconcile); one whose manifest was not, not
        kept_from_crash = step.startswith(("after the manifest", "after the row"))
        finished_before_kill = step.startswith("after the row")
        assert len(archives) == 2 + kept_from_crash
        assert sum(r.outcome == "succeeded" for r in runs) == 2 + finished_before_kill
        # every run either succeeded, with its archive listed, or was interrupted: the one the
        # kill hit, and the other container's if it had started; nothing else
        for r in runs:
            assert (r.outcome == "succeeded" and r.archive_id in archives) or r.error_kind == "Interrupted", r
        assert 1 <= sum(r.error_kind == "Interrupted" for r in runs) <= 2
    finally:
        c.close()


DELETE_STEPS = {
    "before manifests are deleted (rows marked deleting)": {"operation": "delete_many", "key": "*.json"},
    "after manifests are deleted": {"operation": "delete_many", "key": "*.json", "after": True},
    "before objects are deleted": {"operation": "delete_many", "key": "*.tar.zst"},
    "after objects are deleted (before rows are removed)": {"operation": "delete_many", "key": "*.tar.zst",
                                                            "after": True},
}


@pytest.mark.parametrize("step", list(DELETE_STEPS))
def test_sigkill_during_the_delete_protocol(rig: Rig, step: str) -> None:
    rig.run("checkpoint")
    rig.run("checkpoint")
    crashed = rig.run("prune", faults=[{**DELETE_STEPS[step], "kill": True}], expect=None)
    assert crashed.returncode == -signal.SIGKILL
    # four archives of one workload (two pods of deployment/web, two cycles); keepLast 1
    c = rig.catalog()
    try:
        assert len(c.list_archives()) == 1, "doomed archives must stop being listed at once"
        for a in c.list_archives():
            assert (rig.backend / a.key).exists()
    finally:
        c.close()
    done = json.loads(rig.run("prune", "-o", "json").stdout)
    assert len(done[0]["resumed"]) == 3
    rig.assert_consistent()
    c = rig.catalog()
    try:
        assert len(c.list_archives()) == 1
    finally:
        c.close()


FINISHERS = [("delete", "--policy", "web", "--yes"), ("prune",)]  # each step is finished by one of them, in turn


@pytest.mark.parametrize(("step", "finisher"), [
    pytest.param(step, FINISHERS[i % 2], id=f"{step}, then {' '.join(FINISHERS[i % 2])}")
    for i, step in enumerate(DELETE_STEPS)
])
def test_sigkill_during_backupd_delete_of_a_deleted_policy(rig: Rig, step: str, finisher: tuple[str, ...]) -> None:
    """The policy is gone, so no prune of its own will ever resume its rows: the same delete run
    again, or `backupd prune` (every policy), must finish them."""
    rig.run("checkpoint")
    rig.run("policy", "delete", "web")
    crashed = rig.run("delete", "--policy", "web", "--yes", faults=[{**DELETE_STEPS[step], "kill": True}], expect=None)
    assert crashed.returncode == -signal.SIGKILL
    c = rig.catalog()
    try:
        assert c.list_archives() == [], "archives being deleted must stop being listed at once"
        assert len(c.list_archives(states=("deleting",))) == 2
    finally:
        c.close()
    rig.run(*finisher)
    rig.assert_consistent()
    c = rig.catalog()
    try:
        assert c.list_archives(states=("committed", "deleting", "failed")) == []
        assert not [p for p in rig.backend.rglob("*") if p.is_file()], "objects or manifests left"
        runs = c.list_runs(kind="delete")
        assert sorted((r.outcome, r.error_kind) for r in runs) == [("failed", "Interrupted"), ("succeeded", None)]
    finally:
        c.close()


def test_daemon_killed_mid_cycle_catches_up_exactly_once(rig: Rig) -> None:
    faults = [{"operation": "put", "key": "*.tar.zst", "after": True, "kill": True}]
    first = subprocess.Popen(rig.argv("run", faults=faults), env=rig.env(faults),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert first.wait(60) == -signal.SIGKILL

    def daemon_for(seconds: float) -> None:
        proc = subprocess.Popen(rig.argv("run"), env=rig.env(None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    daemon_for(6)
    c = rig.catalog()
    try:
        ok = [r for r in c.list_runs(policy="web", kind="checkpoint") if r.outcome == "succeeded"]
        assert len(ok) == 2, "the interrupted cycle must run again exactly once at start-up"
    finally:
        c.close()
    daemon_for(4)  # nothing was missed since: no new run
    c = rig.catalog()
    try:
        assert sum(r.outcome == "succeeded" for r in c.list_runs(policy="web", kind="checkpoint")) == 2
    finally:
        c.close()
    rig.assert_consistent()
