"""Shared fixtures: catalogs on SQLite and on a real PostgreSQL, and the CLI runner.

PostgreSQL tests use ``BACKUPD_TEST_DATABASE_URL`` (``.ci/run`` sets it); each test gets its
own schema, dropped afterwards. Without the variable they are skipped with a visible reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from backupd.catalog.store import Catalog

PG_URL = os.environ.get("BACKUPD_TEST_DATABASE_URL")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (load tests)")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Hundreds of tests run `python -m backupd` in a subprocess; where PYTHONDONTWRITEBYTECODE
    # is set, each of them would compile the package from source again (0.15 s a run).
    import compileall

    import backupd

    compileall.compile_dir(os.path.dirname(backupd.__file__), quiet=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow load test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema of this test."""
    if not PG_URL:
        if os.environ.get("BACKUPD_REQUIRE_POSTGRES"):
            pytest.fail("BACKUPD_REQUIRE_POSTGRES is set but BACKUPD_TEST_DATABASE_URL is not")
        pytest.skip("PostgreSQL tests need BACKUPD_TEST_DATABASE_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    with postgres_schema("t_") as url:
        yield url


@contextlib.contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """``PG_URL`` with its search_path on a fresh schema, dropped afterwards."""
    assert PG_URL
    schema = prefix + secrets.token_hex(6)
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def catalog(db_url: str) -> Iterator[Catalog]:
    c = Catalog.open(db_url)
    c.upgrade()
    yield c
    c.close()


# -- the core loop rig: node simulator + catalog + filesystem backend ------------------------

pytest_plugins = ["tests.s3_rig"]

from backupd.app import App  # noqa: E402
from backupd.config import Config, DaemonConfig, DatabaseConfig, FilesystemBackendConfig, KubeletConfig  # noqa: E402
from backupd.simulator.server import NodeSimulator  # noqa: E402


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[NodeSimulator]:
    """The project's kubelet stand-in on a loopback port, speaking mTLS, default topology."""
    with NodeSimulator(tmp_path / "node", memory_bytes=2 << 20) as s:
        yield s


def make_config(tmp_path: Path, sim: NodeSimulator, db_url: str, **kubelet: object) -> Config:
    return Config(
        database=DatabaseConfig(url=db_url),
        kubelet=KubeletConfig(
            url=sim.url, ca_file=sim.ca_file, cert_file=sim.client_cert, key_file=sim.client_key,
            checkpoint_dir=sim.checkpoint_dir, node_name="sim-node", **kubelet,  # type: ignore[arg-type]
        ),
        daemon=DaemonConfig(max_concurrent_checkpoints=2, min_free_space=0, shutdown_grace_seconds=10),
        backends=[FilesystemBackendConfig(name="local", type="filesystem", path=tmp_path / "backend")],
    )


@pytest.fixture
def app_factory(tmp_path: Path, sim: NodeSimulator) -> Iterator:
    """Builds Apps on the simulator with a migrated SQLite catalog (or a given URL)."""
    apps: list[App] = []

    def build(db_url: str | None = None, **kubelet: object) -> App:
        app = App(make_config(tmp_path, sim, db_url or f"sqlite:///{tmp_path / 'catalog.db'}", **kubelet))
        app.catalog.upgrade()
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.close()


@pytest.fixture
def s3_app_factory(tmp_path: Path, sim: NodeSimulator, moto_endpoint: str, s3_bucket: str) -> Iterator:
    """Apps whose config has the filesystem backend "local" and an S3 backend "s3" on moto."""
    from backupd.config import S3BackendConfig
    from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION

    apps: list[App] = []

    def build(db_url: str | None = None) -> App:
        config = make_config(tmp_path, sim, db_url or f"sqlite:///{tmp_path / 'catalog.db'}")
        config.backends.append(S3BackendConfig(
            name="s3", type="s3", bucket=s3_bucket, prefix="prod", endpoint_url=moto_endpoint, region=REGION,
            addressing_style="path", access_key_id=FAKE_ACCESS_KEY, secret_access_key=FAKE_SECRET,
        ))
        app = App(config)
        app.catalog.upgrade()
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.close()
