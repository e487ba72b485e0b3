"""Catalog and migrations, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from backupd.catalog.schema import Base
from backupd.catalog.store import Catalog
from backupd.errors import CatalogError, CatalogUnavailable, InvalidInput, NotFound, SchemaOutdated
from backupd.model import (
    COMMITTED,
    DELETING,
    FAILED,
    PENDING,
    RUN_FAILED,
    RUNNING,
    SUCCEEDED,
    Archive,
    recorded_replica,
)
from backupd.retry import Backoff

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def make_archive(i: int, **kw: object) -> Archive:
    base = Archive(
        id=f"{i:016x}", state=COMMITTED, policy="web", backend="local", key=f"default/deployment-web/nginx/{i}.tar.zst",
        node="node-a", namespace="default", pod=f"web-{i}", workload="deployment/web", container="nginx",
        image="nginx:1.27", checkpoint_time=T0 + timedelta(minutes=i), created_at=T0 + timedelta(minutes=i),
        tar_size=1000 + i, stored_size=200 + i, tar_sha256="a" * 64, stored_sha256="b" * 64,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_schema_check_names_the_upgrade_command(db_url: str) -> None:
    c = Catalog.open(db_url)
    with pytest.raises(SchemaOutdated, match="backupd db upgrade"):
        c.check_schema()
    before, after = c.upgrade()
    assert before is None and after == c.head_revision()
    c.check_schema()
    assert c.upgrade() == (after, after)  # idempotent
    c.close()


def test_models_and_migrations_never_drift(catalog: Catalog) -> None:
    with catalog.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_migrations_downgrade_to_base_and_up_again(catalog: Catalog) -> None:
    cfg = catalog._alembic_config()
    with catalog.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert catalog.current_revision() is None
    catalog.upgrade()
    catalog.check_schema()


def _migrate(catalog: Catalog, step: Callable[..., None], revision: str) -> None:
    cfg = catalog._alembic_config()
    with catalog.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        step(cfg, revision)


def test_the_replica_migration_backfills_existing_archives(db_url: str) -> None:
    """0002 adds archives.replica: rows from before it get the replica their workload kind
    implies, exactly as a manifest without the field derives it; downgrading keeps the rows."""
    c = Catalog.open(db_url)
    _migrate(c, command.upgrade, "0001")
    old = [
        make_archive(0, workload="statefulset/db", pod="db-1", node="node-a"),
        make_archive(1, workload="statefulset/db", pod="db-0", node="node-b"),
        make_archive(2, workload="daemonset/agent", pod="agent-x7k2p", node="node-b"),
        make_archive(3, workload="deployment/web", pod="web-7d9f8c6b5-abc12", node="node-a"),
        make_archive(4, workload="job/backup", pod="backup-q2w3e", node="node-a"),
        make_archive(5, workload="replicaset/standalone", pod="standalone-zz9xq", node="node-a"),
        make_archive(6, workload="pod/debug", pod="debug", node="node-a"),
    ]
    with c.engine.begin() as conn:
        archives = sa.Table("archives", sa.MetaData(), autoload_with=conn)
        assert "replica" not in archives.c
        conn.execute(archives.insert(), [{f: getattr(a, f) for f in Archive.__dataclass_fields__ if f != "replica"}
                                         for a in old])
    assert c.upgrade() == ("0001", c.head_revision())
    c.check_schema()
    migrated = {a.id: a for a in c.list_archives()}
    assert [migrated[a.id].replica for a in old] == ["db-1", "db-0", "node-b", "", "", "", ""]
    assert all(a.replica == recorded_replica(a.workload, a.pod, a.node) for a in migrated.values())
    # new rows without a replica get the server default
    with c.engine.begin() as conn:
        conn.execute(sa.Table("archives", sa.MetaData(), autoload_with=conn).insert(),
                     [{f: getattr(make_archive(7), f) for f in Archive.__dataclass_fields__ if f != "replica"}])
    assert c.get_archive(f"{7:016x}").replica == ""
    _migrate(c, command.downgrade, "0001")
    with c.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM archives")).scalar() == 8
    c.upgrade()
    assert {a.id: a.replica for a in c.list_archives()} == {**{a.id: a.replica for a in migrated.values()},
                                                           f"{7:016x}": ""}
    c.close()


def test_pod_filter_matches_the_pod_name_or_the_replica(catalog: Catalog) -> None:
    catalog.add_archive(make_archive(0, workload="daemonset/agent", pod="agent-aaaaa", node="node-a", replica="node-a"))
    catalog.add_archive(make_archive(1, workload="daemonset/agent", pod="agent-bbbbb", node="node-b", replica="node-b"))
    catalog.add_archive(make_archive(2, workload="daemonset/agent", pod="agent-ccccc", node="node-b", replica="node-b"))
    ids = lambda archives: [a.id[-1] for a in archives]  # noqa: E731
    assert ids(catalog.list_archives(pod_or_replica="node-b")) == ["1", "2"]  # across the rollout's pod names
    assert ids(catalog.list_archives(pod_or_replica="agent-aaaaa")) == ["0"]
    assert ids(catalog.list_archives(replica="node-a")) == ["0"]
    assert ids(catalog.list_archives(pod="node-b")) == []  # pod alone stays the exact pod name
    assert catalog.get_archive(f"{1:016x}").group == ("web", "default", "daemonset/agent", "node-b", "nginx")


def test_policies_apply_is_idempotent_and_versioned(catalog: Catalog) -> None:
    assert catalog.apply_policies([("web", '{"a":1}'), ("db", '{"b":1}')]) == [("web", "created"), ("db", "created")]
    assert catalog.apply_policies([("web", '{"a":1}')]) == [("web", "unchanged")]
    assert catalog.apply_policies([("web", '{"a":2}')]) == [("web", "updated")]
    assert catalog.policies_fingerprint() == (("db", 1), ("web", 2))
    catalog.delete_policy("db")
    assert [p.name for p in catalog.list_policies()] == ["web"]
    with pytest.raises(NotFound):
        catalog.delete_policy("db")


def test_archive_states_and_filters(catalog: Catalog) -> None:
    for i in range(5):
        catalog.add_archive(make_archive(i, state=PENDING if i == 4 else COMMITTED))
    catalog.add_archive(make_archive(9, namespace="shop", workload="statefulset/db", container="postgres",
                                     key="shop/statefulset-db/postgres/9.tar.zst"))
    assert [a.id for a in catalog.list_archives(namespace="default")] == [f"{i:016x}" for i in range(4)]
    assert len(catalog.list_archives(states=(PENDING,))) == 1
    assert [a.container for a in catalog.list_archives(workload="statefulset/db")] == ["postgres"]
    a = catalog.update_archive(f"{4:016x}", expect_state=PENDING, state=COMMITTED)
    assert a.state == COMMITTED and a.checkpoint_time.tzinfo is not None
    assert a.checkpoint_time == T0 + timedelta(minutes=4)
    with pytest.raises(CatalogError, match="expected pending"):
        catalog.update_archive(f"{4:016x}", expect_state=PENDING, state=DELETING)
    catalog.update_archive(f"{3:016x}", state=FAILED, error="boom")
    assert catalog.get_archive(f"{3:016x}").error == "boom"
    catalog.delete_archive_row(f"{3:016x}")
    with pytest.raises(NotFound):
        catalog.get_archive(f"{3:016x}")


def test_archive_lookup_by_unique_prefix(catalog: Catalog) -> None:
    catalog.add_archive(make_archive(0, id="abcd000000000001", key="k/1"))
    catalog.add_archive(make_archive(1, id="abcd000000000002", key="k/2"))
    catalog.add_archive(make_archive(2, id="ffff000000000003", key="k/3"))
    assert catalog.get_archive("ffff").id == "ffff000000000003"
    with pytest.raises(InvalidInput, match="ambiguous"):
        catalog.get_archive("abcd")
    with pytest.raises(NotFound):
        catalog.get_archive("abc")  # too short for prefix matching


def test_backend_key_is_unique(catalog: Catalog) -> None:
    catalog.add_archive(make_archive(0))
    with pytest.raises(CatalogError):
        catalog.add_archive(make_archive(1, key=make_archive(0).key))


def test_runs_record_every_attempt(catalog: Catalog) -> None:
    run_id = catalog.start_run("checkpoint", policy="web", node="node-a", namespace="default", pod="p",
                               workload="deployment/web", container="nginx")
    run = catalog.finish_run(run_id, SUCCEEDED, bytes_in=100, bytes_out=25, archive_id="x")
    assert run.outcome == SUCCEEDED and run.duration_seconds is not None and run.duration_seconds >= 0
    failed_id = catalog.start_run("checkpoint", policy="web", node="node-a")
    catalog.finish_run(failed_id, RUN_FAILED, error=SchemaOutdated("no"))
    runs = catalog.list_runs(policy="web")
    assert [r.outcome for r in runs] == [RUN_FAILED, SUCCEEDED]
    assert runs[0].error_kind == "SchemaOutdated" and runs[0].error == "no"
    assert catalog.last_run_started("web") == runs[0].started_at


def test_interrupted_runs_are_failed_at_start(catalog: Catalog) -> None:
    catalog.start_run("checkpoint", policy="web", node="node-a")
    catalog.start_run("checkpoint", policy="web", node="node-b")
    (failed,) = catalog.fail_interrupted_runs(node="node-a")
    assert (failed.node, failed.outcome, failed.error_kind) == ("node-a", RUN_FAILED, "Interrupted")
    outcomes = sorted((r.node, r.outcome) for r in catalog.list_runs())
    assert outcomes == [("node-a", RUN_FAILED), ("node-b", RUNNING)]


def test_lease_exclusive_until_expiry(catalog: Catalog) -> None:
    assert catalog.acquire_lease("prune/web", "daemon-1", timedelta(seconds=60))
    assert not catalog.acquire_lease("prune/web", "daemon-2", timedelta(seconds=60))
    assert catalog.acquire_lease("prune/web", "daemon-1", timedelta(seconds=60))  # renew
    catalog.release_lease("prune/web", "daemon-1")
    assert catalog.acquire_lease("prune/web", "daemon-2", timedelta(seconds=-1))  # already expired
    assert catalog.acquire_lease("prune/web", "daemon-3", timedelta(seconds=60))  # stale lease taken over


def test_lease_race_has_one_winner(db_url: str) -> None:
    c = Catalog.open(db_url)
    c.upgrade()
    wins: list[str] = []
    barrier = threading.Barrier(6)

    def contender(i: int) -> None:
        barrier.wait()
        if c.acquire_lease("prune/race", f"daemon-{i}", timedelta(seconds=60)):
            wins.append(f"daemon-{i}")

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.close()
    assert len(wins) == 1


def test_unreachable_database_is_a_retryable_catalog_error() -> None:
    c = Catalog.open("postgresql+psycopg://postgres@127.0.0.1:1/nothing",
                     retry_backoff=Backoff(attempts=2, base_delay=0.01))
    with pytest.raises(CatalogUnavailable) as info:
        c.list_policies()
    assert info.value.retryable
