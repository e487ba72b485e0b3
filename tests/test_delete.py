"""Explicit deletion: ``backupd delete`` and ``policy delete --purge`` through the entry point, on a
real catalog (SQLite and PostgreSQL) and real backends (filesystem, moto's S3 over HTTP); the
refusals that leave everything as it was; crashes mid-delete finished by the next delete or prune.
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupd.app import App
from backupd.config import load_config
from backupd.daemon.api import Api
from backupd.errors import StorageAuthError, StorageUnavailable
from backupd.model import COMMITTED, DELETING, FAILED, PENDING, RUN_FAILED, SUCCEEDED, Archive
from backupd.storage import layout
from backupd.storage.delete import Deleter, Selection
from backupd.storage.prune import Pruner
from tests.faults import Fault, FaultInjectingBackend
from tests.policies import apply, web_policy
from tests.reliability.inprocess import run_cli
from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION
from tests.test_prune import archive, consistent, store

NOW = datetime.now(UTC)


class Rig:
    """A config file with a filesystem backend ``local`` (and with ``s3`` an S3 backend ``s3`` on
    moto), the App behind it, archives stored for real, and the command line."""

    def __init__(self, tmp_path: Path, db_url: str, s3: dict[str, Any] | None = None) -> None:
        self.root = tmp_path / "backend"
        self.s3 = s3
        self.config = tmp_path / "config.toml"
        text = (f'[database]\nurl = "{db_url}"\n'
                f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{self.root}"\n')
        if s3:
            text += (f'[[backends]]\nname = "s3"\ntype = "s3"\nbucket = "{s3["bucket"]}"\nprefix = "prod"\n'
                     f'endpoint_url = "{s3["endpoint"]}"\nregion = "{REGION}"\naddressing_style = "path"\n'
                     f'access_key_id = "{FAKE_ACCESS_KEY}"\nsecret_access_key = "{FAKE_SECRET}"\n')
        self.config.write_text(text)
        self.app = App(load_config(self.config))
        self.app.catalog.upgrade()
        self.catalog = self.app.catalog

    def add(self, days: float, *, backend: str = "local", **fields: Any) -> Archive:
        """An archive taken ``days`` ago, its object and manifest stored in ``backend``."""
        base = archive(0, backend=backend, **fields)
        aid, t = secrets.token_hex(8), NOW - timedelta(days=days)
        a = replace(base, id=aid, checkpoint_time=t, created_at=t,
                    key=layout.archive_key(base.namespace, base.workload.replace("/", "-"), base.container, t, aid))
        store(self.catalog, self.app.backends[backend], [a])
        return a

    def raw_keys(self, backend: str = "local") -> set[str]:
        """What the backend really holds, read around backupd (the files, or S3's own listing)."""
        if backend == "local":
            return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}
        assert self.s3
        pages = self.s3["admin"].get_paginator("list_objects_v2").paginate(Bucket=self.s3["bucket"], Prefix="prod/")
        return {o["Key"].removeprefix("prod/") for page in pages for o in page.get("Contents", ())}

    def assert_gone(self, archives: list[Archive]) -> None:
        left = self.catalog.get_archives([a.id for a in archives])
        assert left == [], f"rows left: {[a.id for a in left]}"
        for a in archives:
            keys = self.raw_keys(a.backend)
            assert a.key not in keys, f"object of {a.id} left"
            assert layout.manifest_key(a.key) not in keys, f"manifest of {a.id} left"

    def assert_intact(self, archives: list[Archive]) -> None:
        listed = {a.id for a in self.catalog.list_archives(states=(COMMITTED,))}
        for a in archives:
            assert a.id in listed, f"{a.id} no longer listed"
            keys = self.raw_keys(a.backend)
            assert a.key in keys and layout.manifest_key(a.key) in keys, f"{a.id} lost its object or manifest"

    def cli(self, *args: str, code: int = 0, faults: list[Fault] | None = None) -> tuple[str, str]:
        """``backupd ARGS...``; ``faults`` are injected beneath the retries of every backend."""
        wrap = (lambda backend: FaultInjectingBackend(backend, faults)) if faults else None
        status, out, err = run_cli(self.config, *args, wrap_backend=wrap)
        assert status == code, (status, out, err)
        return out, err

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json")[0])


def events(err: str, name: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(line) for line in err.splitlines() if line.startswith("{")) if e["event"] == name]


@pytest.fixture
def rig(tmp_path: Path, db_url: str) -> Iterator[Rig]:
    r = Rig(tmp_path, db_url)
    yield r
    r.app.close()


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Iterator[tuple[Rig, str]]:
    """A rig whose archives go to the filesystem backend, or to S3 (moto over HTTP)."""
    s3 = None
    if request.param == "s3":
        s3 = {"endpoint": request.getfixturevalue("moto_endpoint"), "bucket": request.getfixturevalue("s3_bucket"),
              "admin": request.getfixturevalue("s3_admin")}
    r = Rig(tmp_path, db_url, s3)
    yield r, request.param
    r.app.close()


def test_delete_by_id_and_by_unique_prefix(backend: tuple[Rig, str]) -> None:
    rig, name = backend
    first, second, third = (rig.add(days, backend=name) for days in (3, 2, 1))
    out, err = rig.cli("delete", first.id, second.id[:8], second.id, "-o", "json")
    result = json.loads(out)
    assert [a["id"] for a in result["deleted"]] == [first.id, second.id]  # oldest first, the repeat once
    assert result["bytes_freed"] == 200 and result["dry_run"] is False
    rig.assert_gone([first, second])
    rig.assert_intact([third])
    consistent(rig.catalog, rig.app.backends[name])  # type: ignore[arg-type]
    (run,) = rig.catalog.list_runs(kind="delete")
    assert (run.policy, run.outcome, run.bytes_in, run.error) == ("web", SUCCEEDED, 200, None)
    status, _, body = Api(rig.catalog, rig.app.metrics).handle("/api/v1/runs", {"kind": ["delete"]}, None)
    assert status == 200 and [r["id"] for r in json.loads(body)] == [run.id]
    assert {e["archive_id"] for e in events(err, "archive_deleted")} == {first.id, second.id}
    (summary,) = events(err, "delete_finished")
    assert (summary["outcome"], summary["deleted"], summary["bytes_freed"]) == (SUCCEEDED, 2, 200)
    # explicit ids need no confirmation, and the table says what went
    out, _ = rig.cli("delete", third.id)
    assert out.splitlines()[0].split() == ["ID", "TIME", "NAMESPACE", "WORKLOAD", "POD", "CONTAINER", "STORED"]
    assert third.id in out and "deleted 1 archive(s), 100 B" in out
    rig.assert_gone([third])


def test_bad_selections_change_nothing(rig: Rig) -> None:
    kept = [rig.add(2), rig.add(1)]
    inflight = rig.add(0.5, state=PENDING)
    _, err = rig.cli("delete", "0123456789abcdef", code=3)
    assert "no archive '0123456789abcdef'" in err
    _, err = rig.cli("delete", kept[0].id, "--policy", "web", code=2)
    assert "archive IDs or filters" in err and "not both" in err
    _, err = rig.cli("delete", code=2)
    assert "at least one of --policy" in err
    _, err = rig.cli("delete", "--older-than", "7 days", code=2)
    assert "--older-than" in err and "'7 days'" in err
    _, err = rig.cli("delete", inflight.id, kept[0].id, code=2)
    assert f"{inflight.id} are pending" in err and "a commit is in flight" in err
    # matched by filters, a pending archive is left alone and said so
    result = rig.json("delete", "--policy", "web", "--dry-run")
    assert [a["id"] for a in result["deleted"]] == [a.id for a in kept] and result["pending_skipped"] == [inflight.id]
    rig.assert_intact(kept)
    assert rig.catalog.get_archives([inflight.id])[0].state == PENDING
    assert rig.catalog.list_runs(kind="delete") == []


def test_delete_by_filters_older_than_needs_yes(backend: tuple[Rig, str]) -> None:
    rig, name = backend
    old, older = rig.add(20, backend=name), rig.add(40, backend=name)
    young = rig.add(1, backend=name)
    other_workload = rig.add(40, backend=name, workload="statefulset/db", container="postgres", pod="db-0")
    other_policy = rig.add(40, backend=name, policy="batch")
    selection = ("delete", "--policy", "web", "--workload", "deployment/web", "--older-than", "15d")
    before = rig.raw_keys(name), rig.catalog.list_archives()

    _, err = rig.cli(*selection, code=2)
    assert "2 archives (200 B) match the filters: add --yes" in err and "nothing was deleted" in err
    dry = rig.json(*selection, "--dry-run")
    assert [a["id"] for a in dry["deleted"]] == [older.id, old.id]
    assert dry["dry_run"] is True and dry["bytes_freed"] == 200
    out, _ = rig.cli(*selection, "--dry-run")
    assert older.id in out and old.id in out and "would delete 2 archive(s), 200 B" in out
    assert (rig.raw_keys(name), rig.catalog.list_archives()) == before  # dry runs changed nothing
    assert rig.catalog.list_runs(kind="delete") == []

    done = rig.json(*selection, "--yes")
    assert [a["id"] for a in done["deleted"]] == [older.id, old.id] and done["dry_run"] is False
    rig.assert_gone([older, old])
    rig.assert_intact([young, other_workload, other_policy])
    # one archive matched by filters needs no --yes; -n is the namespace
    assert [a["id"] for a in rig.json("delete", "-n", "default", "--container", "postgres", "--older-than", "1y")[
        "deleted"]] == []  # 40 days is not older than a year
    assert [a["id"] for a in rig.json("delete", "-n", "default", "--container", "postgres", "--older-than", "1m")[
        "deleted"]] == [other_workload.id]
    rig.assert_gone([other_workload])
    assert [a["id"] for a in rig.json("delete", "--policy", "nothing-here", "--yes")["deleted"]] == []


def test_pinned_archives_are_refused_all_or_nothing_unless_forced(rig: Rig) -> None:
    plain, pinned = rig.add(2), rig.add(1, pinned=True)
    _, err = rig.cli("delete", plain.id, pinned.id, code=2)
    assert f"1 pinned archive(s) selected: {pinned.id}" in err and "--force" in err and "nothing was deleted" in err
    _, err = rig.cli("delete", "--policy", "web", "--yes", "--dry-run", code=2)  # a dry run refuses the same way
    assert pinned.id in err
    rig.assert_intact([plain, pinned])
    out, _ = rig.cli("delete", plain.id, pinned.id, "--force")
    assert "deleted 2 archive(s), 200 B (1 pinned)" in out
    rig.assert_gone([plain, pinned])


def test_a_live_prune_or_delete_holding_the_policy_lease_makes_delete_wait(rig: Rig) -> None:
    a = rig.add(1)
    assert rig.catalog.acquire_lease("prune/web", "other-host:1:abcdef", timedelta(minutes=5))
    _, err = rig.cli("delete", a.id, code=9)
    assert "another backupd is pruning policy 'web'" in err
    rig.assert_intact([a])
    rig.catalog.release_lease("prune/web", "other-host:1:abcdef")
    rig.cli("delete", a.id)
    rig.assert_gone([a])


def test_archives_of_a_deleted_policy(rig: Rig) -> None:
    apply(rig.app, web_policy())
    archives = [rig.add(2), rig.add(1)]
    out, _ = rig.cli("policy", "delete", "web")
    assert "2 archive(s) are kept" in out and "`backupd delete --policy web --yes`" in out and "--purge" in out
    rig.assert_intact(archives)
    _, err = rig.cli("prune", "--policy", "web", code=3)
    assert "no policy named 'web', but it still has 2 archive(s) (200 B)" in err
    assert "`backupd delete --policy web --yes`" in err
    assert len(rig.json("delete", "--policy", "web", "--yes")["deleted"]) == 2
    rig.assert_gone(archives)
    (run,) = rig.catalog.list_runs(kind="delete")
    assert (run.policy, run.outcome, run.bytes_in) == ("web", SUCCEEDED, 200)
    _, err = rig.cli("prune", "--policy", "web", code=3)
    assert "error: no policy named 'web'\n" in err and "still has" not in err


def test_policy_delete_purge(rig: Rig) -> None:
    apply(rig.app, web_policy())
    apply(rig.app, web_policy(name="batch"))
    mine = [rig.add(3), rig.add(2), rig.add(1, pinned=True)]
    theirs = rig.add(2, policy="batch")
    _, err = rig.cli("policy", "delete", "web", "--force", code=2)
    assert "--force applies to --purge only" in err
    _, err = rig.cli("policy", "delete", "web", "--purge", code=2)
    assert mine[2].id in err and "--force" in err
    assert "web" in {p.name for p in rig.catalog.list_policies()}  # nothing happened: policy and archives stay
    rig.assert_intact(mine)
    out, _ = rig.cli("policy", "delete", "web", "--purge", "--force")
    assert "deleted 3 archive(s), 300 B (1 pinned)" in out and "checkpointpolicy/web deleted with its archives" in out
    rig.assert_gone(mine)
    assert [p.name for p in rig.catalog.list_policies()] == ["batch"]
    rig.assert_intact([theirs])
    _, err = rig.cli("policy", "delete", "web", "--purge", code=3)
    assert "no policy named 'web'" in err


DELETE_STEPS = {
    "before the manifests": Fault("delete_many", key="*.json", error=StorageUnavailable("crash")),
    "after the manifests": Fault("delete_many", key="*.json", error=StorageUnavailable("crash"), after=True),
    "before the objects": Fault("delete_many", key="*.tar.zst", error=StorageUnavailable("crash")),
    "after the objects (before the rows)": Fault("delete_many", key="*.tar.zst", error=StorageUnavailable("crash"),
                                                 after=True),
}


@pytest.mark.parametrize("step", list(DELETE_STEPS))
def test_a_failure_at_each_delete_step_is_finished_by_deleting_again(backend: tuple[Rig, str], step: str) -> None:
    rig, name = backend
    doomed, kept = [rig.add(3, backend=name), rig.add(2, backend=name)], rig.add(1, backend=name)
    real = rig.app.backends[name]
    flaky = Deleter(rig.catalog, {name: FaultInjectingBackend(real, [replace(DELETE_STEPS[step])])}, holder="h:1:a")
    selection = Selection(ids=tuple(a.id for a in doomed))
    result = flaky.delete(flaky.plan(selection))
    assert isinstance(result.error, StorageUnavailable) and result.deleted == []
    assert {a.id for a in rig.catalog.list_archives()} == {kept.id}  # marked: no longer listed, at once
    assert {a.state for a in rig.catalog.get_archives([a.id for a in doomed])} == {DELETING}
    consistent(rig.catalog, real)  # type: ignore[arg-type]
    (run,) = rig.catalog.list_runs(kind="delete")
    assert (run.outcome, run.error_kind) == (RUN_FAILED, "StorageUnavailable")
    assert flaky.metrics.registry.get_sample_value("backupd_runs_total", {"kind": "delete", "outcome": "failed"}) == 1
    assert rig.catalog.lease_holders() == {}

    # the same command again (the rows are deleting now, and still named) finishes them
    out = rig.json("delete", *selection.ids)
    assert sorted(a["id"] for a in out["deleted"]) == sorted(a.id for a in doomed)
    rig.assert_gone(doomed)
    rig.assert_intact([kept])
    consistent(rig.catalog, real)  # type: ignore[arg-type]


def test_a_refused_object_delete_exits_with_its_code_and_says_how_to_finish(rig: Rig) -> None:
    """The backend refuses to delete objects (an IAM policy without s3:DeleteObject, say)."""
    doomed = [rig.add(2), rig.add(1)]
    refused = Fault("delete_many", key="*.tar.zst", error=lambda: StorageAuthError("access denied"), times=None)
    out, err = rig.cli("delete", *(a.id for a in doomed), "-o", "json", code=6, faults=[refused])
    assert json.loads(out) | {"dry_run": None} == {"dry_run": None, "deleted": [], "bytes_freed": 0,
                                                   "pending_skipped": [], "error": "access denied"}
    assert "Run the same command again" in err and "error: access denied" in err
    assert rig.catalog.list_archives() == []  # marked deleting: no longer listed, though their objects are there
    assert {a.key for a in doomed} <= rig.raw_keys()
    (run,) = rig.catalog.list_runs(kind="delete")
    assert (run.outcome, run.error_kind, run.error) == (RUN_FAILED, "StorageAuthError", "access denied")
    rig.cli("delete", *(a.id for a in doomed))
    rig.assert_gone(doomed)


def test_a_failed_delete_is_finished_by_the_next_prune_of_the_policy(rig: Rig) -> None:
    policy = apply(rig.app, web_policy(retention="{keepLast: 5}"))
    doomed, kept = [rig.add(3), rig.add(2)], rig.add(1)
    fault = DELETE_STEPS["after the manifests"]
    flaky = Deleter(rig.catalog, {"local": FaultInjectingBackend(rig.app.backends["local"], [replace(fault)])})
    assert flaky.delete(flaky.plan(Selection(ids=tuple(a.id for a in doomed)))).error
    result = Pruner(rig.catalog, rig.app.backends).prune(policy)
    assert result.error is None and sorted(a.id for a in result.resumed) == sorted(a.id for a in doomed)
    rig.assert_gone(doomed)
    rig.assert_intact([kept])
    assert [r.outcome for r in rig.catalog.list_runs(kind="prune")] == [SUCCEEDED]


def test_leftovers_of_a_deleted_policy_are_finished_by_prune_and_by_maintenance(rig: Rig) -> None:
    """Nothing prunes a deleted policy: ``backupd prune`` (every policy) and the daemon's hourly
    maintenance finish the deletes a crash interrupted in it."""
    apply(rig.app, web_policy())
    apply(rig.app, web_policy(name="batch", retention="{keepLast: 5}"))
    gone = [rig.add(3), rig.add(2), rig.add(1, policy="old")]
    batch = rig.add(1, policy="batch")
    failed = rig.add(4, state=FAILED)  # a failed commit's row and leftover object: the protocol takes those too
    crashed = Deleter(rig.catalog, {"local": FaultInjectingBackend(
        rig.app.backends["local"], [Fault("delete_many", key="*", error=StorageUnavailable("crash"), times=None)])})
    for policy in ("web", "old"):
        assert crashed.delete(crashed.plan(Selection(policy=policy))).error is not None
    rig.catalog.delete_policy("web")
    assert {a.id for a in rig.catalog.list_archives(states=(DELETING,))} == {a.id for a in gone} | {failed.id}

    dry = rig.json("prune", "--dry-run")
    assert {r["policy"]: len(r["resumed"]) for r in dry} == {"batch": 0, "old": 1, "web": 3}
    assert len(rig.catalog.list_archives(states=(DELETING,))) == 4
    done = rig.json("prune")
    assert {r["policy"]: sorted(r["deleted"]) for r in done if r["deleted"]} == {
        "old": [gone[2].id], "web": sorted([gone[0].id, gone[1].id, failed.id])}
    rig.assert_gone([*gone, failed])
    rig.assert_intact([batch])
    assert rig.catalog.list_runs(outcome="running") == []
    assert sorted((r.policy, r.outcome) for r in rig.catalog.list_runs(kind="delete")) == [
        ("old", RUN_FAILED), ("old", SUCCEEDED), ("web", RUN_FAILED), ("web", SUCCEEDED)]

    # the daemon's maintenance does the same, hourly
    later = rig.add(1, policy="old")
    rig.catalog.set_state([later.id], DELETING, expect=COMMITTED)
    rig.app.maintenance()
    rig.assert_gone([later])


def test_confirmation_prompt_on_a_terminal(rig: Rig) -> None:
    archives = [rig.add(2), rig.add(1)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}

    def answer(text: str) -> subprocess.CompletedProcess[str]:
        primary, replica = pty.openpty()
        try:
            os.write(primary, text.encode())  # typed ahead: the terminal holds it until the prompt reads
            return subprocess.run([sys.executable, "-m", "backupd", "--config", str(rig.config), "delete", "--policy",
                                   "web"], stdin=replica, capture_output=True, text=True, env=env, timeout=60)
        finally:
            os.close(primary)
            os.close(replica)

    declined = answer("n\n")
    assert "Delete these 2 archives (200 B)?" in declined.stderr and declined.returncode == 130
    rig.assert_intact(archives)
    accepted = answer("y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert "deleted 2 archive(s), 200 B" in accepted.stdout
    rig.assert_gone(archives)
