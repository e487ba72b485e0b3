"""The catalog under faults: a PostgreSQL restart while the daemon works, SQLite busy, and two
daemons sharing one catalog."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from backupd.errors import LeaseHeld
from backupd.model import RUNNING
from backupd.policy.document import parse_policies
from tests.reliability.proxy import TcpProxy

POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: db}\n"
          "spec: {selector: {namespaces: [shop], containers: [postgres]}, schedule: '@hourly', backend: local, "
          "retention: {keepLast: 10}}\n")


def apply(app):  # type: ignore[no-untyped-def]
    (p,) = parse_policies(POLICY, "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    return p


@pytest.fixture
def proxied_pg_url(pg_url: str):  # type: ignore[no-untyped-def]
    parts = urlsplit(pg_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    yield proxy, urlunsplit(parts._replace(netloc=netloc))
    proxy.close()


def test_postgres_restart_mid_run_loses_no_run_record(app_factory, sim, proxied_pg_url) -> None:  # type: ignore[no-untyped-def]
    proxy, url = proxied_pg_url
    app = app_factory(url)
    p = apply(app)
    # the checkpoint takes 2 s; the database goes away for 3 s in the middle of it
    sim.add_fault("delay", method="POST", path="/checkpoint/*", seconds=2.0)
    threading.Timer(0.5, proxy.outage, args=(3.0,)).start()
    result = app.runner.cycle(p)
    assert proxy.refused > 0, "the outage did not happen"
    assert not result.failed, result
    runs = app.catalog.list_runs(policy="db")
    assert [r.outcome for r in runs] == ["succeeded"]
    assert app.catalog.list_runs(outcome=RUNNING) == []
    assert len(app.catalog.list_archives()) == 1


def test_sqlite_busy_writer_is_waited_for(app_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    p = apply(app)
    blocker = sqlite3.connect(tmp_path / "catalog.db", timeout=1, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    threading.Timer(1.5, blocker.rollback).start()
    started = time.monotonic()
    result = app.runner.cycle(p)
    assert not result.failed
    assert time.monotonic() - started >= 1.0
    blocker.close()


def test_two_daemons_on_one_catalog_never_double_checkpoint(app_factory, sim, pg_url) -> None:  # type: ignore[no-untyped-def]
    first, second = app_factory(pg_url), app_factory(pg_url)
    p = apply(first)
    sim.add_fault("delay", method="POST", path="/checkpoint/*", seconds=1.0, times=1)
    results = []
    threads = [threading.Thread(target=lambda a=a: results.append(a.runner.cycle(p))) for a in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    posts = [r for r in sim.requests if r.method == "POST"]
    assert len(posts) == 1, "the same container was checkpointed by both daemons"
    assert sum(len(r.skipped) for r in results) == 1
    assert len(first.catalog.list_archives()) == 1
    # and they never prune the same policy at once: the lease in the shared catalog
    assert first.catalog.acquire_lease("prune/db", first.holder, timedelta(minutes=1))
    with pytest.raises(LeaseHeld):
        second.pruner.prune(p)
