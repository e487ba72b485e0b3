"""SIGKILL of a real backupd process at every step of the commit and delete protocols, then a
restart: nothing committed is lost, nothing half-written is visible, nothing is duplicated.
Each runs on both storage formats (``format = "full"`` and ``"dedup"``); the deduplicated one
adds the steps of its packs and of garbage collection, after which every archive must still
restore byte for byte.

The kill comes from ``python -m tests.faults`` (backupd with the faults of BACKUPD_TEST_FAULTS):
a fault-injecting wrapper around the real backend that sends SIGKILL to its own process just
before or just after a chosen backend call.
"""

from __future__ import annotations

import hashlib
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
from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION

POLICY = web_policy(retention="{keepLast: 1}")


#: a grace period of about a second: garbage collection's two phases within one test
DEDUP_GRACE_HOURS = 0.0003


class Rig:
    def __init__(self, tmp_path: Path, sim: NodeSimulator, fmt: str = "full",
                 s3: tuple[str, str] | None = None) -> None:
        """``s3``: (moto endpoint, bucket) for an S3 backend instead of a directory."""
        self.tmp, self.sim, self.format = tmp_path, sim, fmt
        #: the archive object's key pattern: the compressed tar, or the recipe
        self.object = "*.tar.zst" if fmt == "full" else "*.recipe"
        dedup = fmt == "dedup"
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
            + (f'orphan_grace_hours = {DEDUP_GRACE_HOURS}\n' if dedup else '')
            + (f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{self.backend}"\n' if s3 is None else
               f'[[backends]]\nname = "local"\ntype = "s3"\nbucket = "{s3[1]}"\nprefix = "prod"\n'
               f'endpoint_url = "{s3[0]}"\nregion = "{REGION}"\naddressing_style = "path"\n'
               f'access_key_id = "{FAKE_ACCESS_KEY}"\nsecret_access_key = "{FAKE_SECRET}"\n')
            + ('format = "dedup"\n' if dedup else '')
        )
        self.on_s3 = s3 is not None
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

    def keys(self) -> set[str]:
        """Every object the backend lists, read with the config the killed processes used."""
        from backupd.backends import open_backend
        from backupd.config import load_config

        return {o.key for o in open_backend(load_config(self.cfg).backends[0], retries=False).list("")}

    def catalog(self) -> Catalog:
        return Catalog.open(f"sqlite:///{self.tmp / 'catalog.db'}")

    def assert_consistent(self) -> None:
        c = self.catalog()
        try:
            assert c.list_archives(states=(PENDING,)) == [], "a pending row survived the restart"
            assert c.list_runs(outcome=RUNNING) == [], "a run is still 'running'"
            listed = c.list_archives()
            files = self.keys()
            if not self.on_s3:
                on_disk = {p.relative_to(self.backend).as_posix() for p in self.backend.rglob("*") if p.is_file()}
                assert not [f for f in on_disk if Path(f).name.startswith(TEMP_PREFIX)], "temp files left"
            for a in listed:
                assert a.key in files and layout.manifest_key(a.key) in files, f"{a.id} listed but missing"
            archive_files = {f for f in files if not f.endswith(".json") and not f.startswith("dedup/")}
            assert archive_files == {a.key for a in listed}, "objects without a committed archive"
            for p in c.list_packs("local"):
                assert p.archives == 0 or p.key in files, f"pack {p.key} used by an archive is gone"
            keys = [a.key for a in listed]
            assert len(keys) == len(set(keys))
            assert len({a.node_path for a in listed}) == len(listed), "one node tar committed twice"
        finally:
            c.close()
        assert list(self.sim.checkpoint_dir.glob("checkpoint-*.tar")) == [], "node tars left behind"
        if self.format == "dedup":
            # every archive is rebuilt from its recipe and packs, each chunk and the whole tar
            # checked against their digests: byte for byte what the kubelet wrote
            self.run("verify", "--read-data")
            c = self.catalog()
            try:
                newest = max(c.list_archives(), key=lambda a: a.checkpoint_time, default=None)
            finally:
                c.close()
            if newest is not None:  # and restore writes that tar
                out = self.tmp / f"restored-{newest.id}.tar"
                self.run("restore", newest.id, "--to", str(out), "--force")
                assert hashlib.sha256(out.read_bytes()).hexdigest() == newest.tar_sha256


def make_rig(tmp_path: Path, sim: NodeSimulator, request: pytest.FixtureRequest) -> Rig:
    fmt, _, where = request.param.partition("-")
    s3 = (request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")) if where == "s3" else None
    return Rig(tmp_path, sim, fmt, s3)


@pytest.fixture(params=["full", "dedup"])
def rig(tmp_path: Path, sim: NodeSimulator, request: pytest.FixtureRequest) -> Rig:
    """Each storage format, on a directory. The steps only the deduplicated format has (packs,
    GC) run on S3 (moto) too (``dedup_rig``); both formats meet S3 faults in test_s3_faults."""
    return make_rig(tmp_path, sim, request)


@pytest.fixture(params=["dedup", "dedup-s3"])
def dedup_rig(tmp_path: Path, sim: NodeSimulator, request: pytest.FixtureRequest) -> Rig:
    return make_rig(tmp_path, sim, request)


@pytest.fixture(params=["full"])
def full_rig(tmp_path: Path, sim: NodeSimulator, request: pytest.FixtureRequest) -> Rig:
    """The scheduler's catch-up does not depend on the format: one rig is enough."""
    return make_rig(tmp_path, sim, request)


def steps(rig: Rig, table: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """A step table with ``{object}`` filled in for the rig's format."""
    return {name: {k: v.format(object=rig.object) if isinstance(v, str) else v for k, v in step.items()}
            for name, step in table.items()}


COMMIT_STEPS: dict[str, dict[str, object]] = {
    "before the object put": {"operation": "put", "key": "{object}"},
    "after the object put": {"operation": "put", "key": "{object}", "after": True},
    "before the manifest put": {"operation": "put", "key": "*.json"},
    "after the manifest put (before the row is committed)": {"operation": "put", "key": "*.json", "after": True},
    "after the row is committed (at the next container's put)": {"operation": "put", "key": "{object}", "skip": 1},
}
#: the deduplicated format's packs come first (and are recorded in the catalog as each put returns)
PACK_STEPS: dict[str, dict[str, object]] = {
    "before a pack put": {"operation": "put", "key": "dedup/packs/*"},
    "after a pack put (before it is recorded)": {"operation": "put", "key": "dedup/packs/*", "after": True},
}


@pytest.mark.parametrize("step", list(COMMIT_STEPS))
def test_sigkill_during_the_commit_protocol(rig: Rig, step: str) -> None:
    crash_a_commit(rig, steps(rig, COMMIT_STEPS)[step], step)


@pytest.mark.parametrize("step", list(PACK_STEPS))
def test_sigkill_before_and_after_a_pack_put(dedup_rig: Rig, step: str) -> None:
    crash_a_commit(dedup_rig, PACK_STEPS[step], step)


def crash_a_commit(rig: Rig, fault: dict[str, object], step: str) -> None:
    crashed = rig.run("checkpoint", faults=[{**fault, "kill": True}], expect=None)
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


DELETE_STEPS: dict[str, dict[str, object]] = {
    "before manifests are deleted (rows marked deleting)": {"operation": "delete_many", "key": "*.json"},
    "after manifests are deleted": {"operation": "delete_many", "key": "*.json", "after": True},
    "before objects are deleted": {"operation": "delete_many", "key": "{object}"},
    "after objects are deleted (before rows are removed)": {"operation": "delete_many", "key": "{object}",
                                                            "after": True},
}


@pytest.mark.parametrize("step", list(DELETE_STEPS))
def test_sigkill_during_the_delete_protocol(rig: Rig, step: str) -> None:
    rig.run("checkpoint")
    rig.run("checkpoint")
    crashed = rig.run("prune", faults=[{**steps(rig, DELETE_STEPS)[step], "kill": True}], expect=None)
    assert crashed.returncode == -signal.SIGKILL
    # four archives of one workload (two pods of deployment/web, two cycles); keepLast 1
    c = rig.catalog()
    try:
        assert len(c.list_archives()) == 1, "doomed archives must stop being listed at once"
        for a in c.list_archives():
            assert a.key in rig.keys()
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
    crashed = rig.run("delete", "--policy", "web", "--yes", faults=[{**steps(rig, DELETE_STEPS)[step], "kill": True}],
                      expect=None)
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
        left = [k for k in rig.keys() if not k.startswith("dedup/")]
        assert not left, "objects or manifests left"  # (packs stay for garbage collection)
        runs = c.list_runs(kind="delete")
        assert sorted((r.outcome, r.error_kind) for r in runs) == [("failed", "Interrupted"), ("succeeded", None)]
    finally:
        c.close()


def test_daemon_killed_mid_cycle_catches_up_exactly_once(full_rig: Rig) -> None:
    rig = full_rig
    faults = [{"operation": "put", "key": rig.object, "after": True, "kill": True}]
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


GC_STEPS: dict[str, dict[str, object]] = {
    "before packs are deleted (rows marked deleting)": {"operation": "delete_many", "key": "dedup/packs/*"},
    "after packs are deleted (before their rows are dropped)": {"operation": "delete_many", "key": "dedup/packs/*",
                                                                "after": True},
}


@pytest.mark.parametrize("step", list(GC_STEPS))
def test_sigkill_during_garbage_collection(dedup_rig: Rig, step: str) -> None:
    rig = dedup_rig
    rig.run("checkpoint")
    rig.run("delete", "--policy", "web", "--yes")
    time.sleep(DEDUP_GRACE_HOURS * 3600 + 0.3)
    marked = json.loads(rig.run("gc", "-o", "json").stdout)[0]
    assert marked["marked"], "the deleted archives' packs are unused"
    time.sleep(1.1)  # a new second for the kubelet's tar names
    rig.run("checkpoint")  # unused packs are not offered: these archives have packs of their own
    c = rig.catalog()
    try:
        kept = {a.id: a.tar_sha256 for a in c.list_archives()}
    finally:
        c.close()
    assert len(kept) == 2
    time.sleep(DEDUP_GRACE_HOURS * 3600 + 0.3)
    crashed = rig.run("gc", faults=[{**GC_STEPS[step], "kill": True}], expect=None)
    assert crashed.returncode == -signal.SIGKILL
    rig.assert_consistent()  # every kept archive still restores byte for byte
    done = json.loads(rig.run("gc", "-o", "json").stdout)[0]
    assert set(done["deleted"]) == set(marked["marked"])
    files = {k for k in rig.keys() if k.endswith(".pack")}
    c = rig.catalog()
    try:
        assert {p.key for p in c.list_packs("local")} == files
        assert {a.id: a.tar_sha256 for a in c.list_archives()} == kept
    finally:
        c.close()
    rig.assert_consistent()


#: repacking (gc's third phase): the new pack is put, then recorded; a note per (old, new) pack
#: is put; then the catalog's swap. The first cycle's two packs are repacked into one new pack,
#: so the second note is put after the first swap.
REPACK_STEPS: dict[str, dict[str, object]] = {
    "after the new pack put (before it is recorded)": {"operation": "put", "key": "dedup/packs/*", "after": True},
    "after a note put (before the swap)": {"operation": "put", "key": "dedup/moved/*", "after": True},
    "after a swap (at the next note put)": {"operation": "put", "key": "dedup/moved/*", "skip": 1},
}


@pytest.fixture(params=["dedup"])
def dedup_fs_rig(tmp_path: Path, sim: NodeSimulator, request: pytest.FixtureRequest) -> Rig:
    """The deduplicated format on a directory: repacking uses no backend call GC does not."""
    return make_rig(tmp_path, sim, request)


@pytest.mark.parametrize("step", list(REPACK_STEPS))
def test_sigkill_during_a_repack(dedup_fs_rig: Rig, step: str) -> None:
    rig = dedup_fs_rig
    rig.run("checkpoint")
    time.sleep(1.1)  # a new second for the kubelet's tar names
    rig.run("checkpoint")
    c = rig.catalog()
    try:
        first, second = (sorted(c.list_archives(), key=lambda a: a.checkpoint_time)[i:i + 2] for i in (0, 2))
    finally:
        c.close()
    rig.run("delete", *(a.id for a in first), "--yes")  # the first cycle's packs: partly dead now
    time.sleep(DEDUP_GRACE_HOURS * 3600 + 0.3)
    crashed = rig.run("gc", "--repack-below", "1", faults=[{**REPACK_STEPS[step], "kill": True}], expect=None)
    assert crashed.returncode == -signal.SIGKILL, "two packs to repack were expected: " + crashed.stdout
    rig.assert_consistent()  # every archive rebuilt byte for byte by verify --read-data, and restored
    # the next collection repacks what is left (again, for a pack whose swap did not happen;
    # after a swap, the new pack holds dead copies too: it is a candidate, and with the other
    # old pack it makes the same pack again, which stays as it is) ...
    again = json.loads(rig.run("gc", "--repack-below", "1", "-o", "json").stdout)[0]
    assert all("same pack again" in kept["reason"] for kept in again["repack"]["kept"]), again
    time.sleep(DEDUP_GRACE_HOURS * 3600 + 0.3)
    # ... and one a grace period later deletes the old packs and what the crash left unused
    rig.run("gc", "--repack-below", "1")
    time.sleep(DEDUP_GRACE_HOURS * 3600 + 0.3)
    swept = json.loads(rig.run("gc", "--repack-below", "1", "-o", "json").stdout)[0]
    assert swept["repack"]["candidates"] == 0 and swept["marked"] == []
    c = rig.catalog()
    try:
        packs = c.list_packs("local")
        assert {p.key for p in packs} == {k for k in rig.keys() if k.endswith(".pack")}
        assert all(p.state == "stored" and p.archives for p in packs), "only packs the archives use are left"
        assert {a.id for a in c.list_archives()} == {a.id for a in second}
    finally:
        c.close()
    rig.assert_consistent()
    for a in second:
        out = rig.tmp / f"restored-{a.id}.tar"
        rig.run("restore", a.id, "--to", str(out), "--force")
        assert hashlib.sha256(out.read_bytes()).hexdigest() == a.tar_sha256
