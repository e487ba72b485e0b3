"""The catalog: policies, archives, runs and leases in SQLite or PostgreSQL.

The catalog is the daemon's truth. Archive rows move through the commit protocol
``pending -> committed`` (or ``failed``) and the delete protocol ``committed -> deleting ->
(row removed)``; the backend manifest is what makes an archive exist, so a lost catalog is
rebuilt from manifests (``catalog rebuild``).

The schema belongs to Alembic (``backupd/migrations``). The daemon never creates tables; it
checks the schema is at head and otherwise refuses to start, naming ``backupd db upgrade``.
SQLAlchemy exceptions are translated here, at the edge, into :class:`CatalogUnavailable`
(connection problems, retryable) or :class:`CatalogError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import structlog
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from backupd import retry
from backupd.errors import CatalogError, CatalogUnavailable, InvalidInput, NotFound, SchemaOutdated, scrub

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

PENDING, COMMITTED, DELETING, FAILED = "pending", "committed", "deleting", "failed"
ARCHIVE_STATES = (PENDING, COMMITTED, DELETING, FAILED)
RUNNING, SUCCEEDED, RUN_FAILED, SKIPPED = "running", "succeeded", "failed", "skipped"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases (SQLite stores naive text; we restore the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class PolicyRow(Base):
    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    spec: Mapped[str] = mapped_column(Text)  # canonical JSON of the spec
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ArchiveRow(Base):
    __tablename__ = "archives"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(63))
    backend: Mapped[str] = mapped_column(String(63))
    key: Mapped[str] = mapped_column(String(1024))
    node: Mapped[str] = mapped_column(String(253))
    namespace: Mapped[str] = mapped_column(String(63))
    pod: Mapped[str] = mapped_column(String(253))
    workload: Mapped[str] = mapped_column(String(300))
    #: the pod's stable identity within its workload (backupd.workload.replica_of); "" for none
    replica: Mapped[str] = mapped_column(String(253), default="", server_default="")
    container: Mapped[str] = mapped_column(String(63))
    image: Mapped[str] = mapped_column(String(1024), default="")
    checkpoint_time: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    tar_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    stored_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tar_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stored_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    compression: Mapped[str] = mapped_column(String(16), default="zstd")
    encryption: Mapped[str] = mapped_column(String(16), default="none")
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    node_path: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    node_tar_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index(None, "policy", "namespace", "workload", "replica", "container", "checkpoint_time"),
        Index(None, "state"),
        Index(None, "backend", "key", unique=True),
    )


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # checkpoint | prune | delete | verify | reconcile
    policy: Mapped[str | None] = mapped_column(String(63), nullable=True)
    node: Mapped[str] = mapped_column(String(253), default="")
    namespace: Mapped[str | None] = mapped_column(String(63), nullable=True)
    pod: Mapped[str | None] = mapped_column(String(253), nullable=True)
    workload: Mapped[str | None] = mapped_column(String(300), nullable=True)
    container: Mapped[str | None] = mapped_column(String(63), nullable=True)
    archive_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    error_kind: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index(None, "policy", "kind", "started_at"),
        Index(None, "namespace", "workload", "container", "started_at"),
    )


class LeaseRow(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


# ---------------------------------------------------------------------------------------
# Plain values handed to the rest of backupd (no ORM objects escape this module).


def _json_fields(value: Any) -> dict[str, Any]:
    """A catalog dataclass as JSON-ready fields, times in RFC 3339 UTC."""
    d = {f: getattr(value, f) for f in value.__dataclass_fields__}
    for k, v in d.items():
        if isinstance(v, datetime):
            d[k] = v.isoformat().replace("+00:00", "Z")
    return d


@dataclass(frozen=True)
class Archive:
    id: str
    state: str
    policy: str
    backend: str
    key: str
    node: str
    namespace: str
    pod: str
    workload: str
    container: str
    image: str
    checkpoint_time: datetime
    created_at: datetime
    committed_at: datetime | None = None
    tar_size: int | None = None
    stored_size: int | None = None
    tar_sha256: str | None = None
    stored_sha256: str | None = None
    compression: str = "zstd"
    encryption: str = "none"
    pinned: bool = False
    node_path: str | None = None
    node_tar_deleted: bool = False
    error: str | None = None
    replica: str = ""  # defaulted, hence last; see backupd.workload.replica_of

    @property
    def group(self) -> tuple[str, str, str, str, str]:
        """What retention groups by: policy, namespace, workload, replica, container."""
        return (self.policy, self.namespace, self.workload, self.replica, self.container)

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    """What retention needs of an archive; a tenth of a row, for planning over millions."""

    id: str
    state: str
    policy: str
    namespace: str
    workload: str
    replica: str
    container: str
    checkpoint_time: datetime
    stored_size: int | None
    pinned: bool


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    policy: str | None
    node: str
    namespace: str | None
    pod: str | None
    workload: str | None
    container: str | None
    archive_id: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    error_kind: str | None
    error: str | None
    bytes_in: int
    bytes_out: int
    duration_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass(frozen=True)
class StoredPolicy:
    name: str
    spec_json: str
    generation: int
    created_at: datetime
    updated_at: datetime


_ARCHIVE_COLUMNS = [getattr(ArchiveRow, f) for f in Archive.__dataclass_fields__]


def _archive(row: ArchiveRow) -> Archive:
    return Archive(**{f: getattr(row, f) for f in Archive.__dataclass_fields__})


def _run(row: RunRow) -> Run:
    return Run(**{f: getattr(row, f) for f in Run.__dataclass_fields__})


P = ParamSpec("P")
T = TypeVar("T")


_nested = contextvars.ContextVar("backupd_catalog_call", default=False)


def _translated(fn: Callable[P, T]) -> Callable[P, T]:
    """Map SQLAlchemy errors to backupd's catalog errors (the one edge for SQLAlchemy), and
    retry the whole call while the database is unreachable (a PostgreSQL restart or failover
    must cost a few seconds, not a lost run record). Nested calls leave retrying to the
    outermost one."""

    def attempt(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise CatalogUnavailable(f"catalog unavailable: {_describe(exc)}") from exc
        except sa_exc.DBAPIError as exc:
            raise CatalogError(f"catalog error: {_describe(exc)}") from exc

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if _nested.get():
            return attempt(*args, **kwargs)
        token = _nested.set(True)
        try:
            catalog = args[0]
            backoff = catalog.retry if isinstance(catalog, Catalog) else retry.Backoff(attempts=1)
            return retry.call(lambda: attempt(*args, **kwargs), backoff, on_retry=_log_retry)
        finally:
            _nested.reset(token)

    return wrapper


def _log_retry(exc: BaseException, attempt: int, pause: float) -> None:
    structlog.get_logger("backupd.catalog").warning("catalog_retry", error=str(exc), attempt=attempt,
                                                     pause_seconds=round(pause, 2))


def _describe(exc: sa_exc.DBAPIError) -> str:
    # The driver's message only: SQLAlchemy appends the SQL and parameters, which may hold
    # paths or names but are noise for an operator; never the connection URL.
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__


def now_utc() -> datetime:
    return datetime.now(UTC)


class Catalog:
    """Repository over the catalog database. Thread-safe: one short session per call."""

    #: how long calls keep retrying while the database is unreachable (about half a minute)
    DEFAULT_RETRY = retry.Backoff(attempts=7, base_delay=0.5, max_delay=10.0)

    def __init__(self, engine: Engine, safe_url: str, *, retry_backoff: retry.Backoff | None = None) -> None:
        self.engine = engine
        self.safe_url = safe_url
        self.retry = retry_backoff or self.DEFAULT_RETRY
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, retry_backoff: retry.Backoff | None = None) -> Catalog:
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                db_path = Path(parsed.database)
                db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                if not db_path.exists():
                    db_path.touch(mode=0o600)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        elif parsed.get_backend_name() == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            # a server restart leaves dead pooled connections: test each one before use
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": 10}
        else:
            raise InvalidInput(f"database.url: unsupported database {parsed.get_backend_name()!r} (use sqlite or postgresql)")
        engine = create_engine(parsed, **kwargs)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        return cls(engine, parsed.render_as_string(hide_password=True), retry_backoff=retry_backoff)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # -- schema -------------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        return cfg

    @_translated
    def upgrade(self) -> tuple[str | None, str]:
        """Apply migrations up to head; returns (revision before, revision after)."""
        from alembic import command

        before = self.current_revision()
        cfg = self._alembic_config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return before, self.head_revision()

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        assert head is not None
        return head

    @_translated
    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def check_schema(self) -> None:
        """Raise :class:`SchemaOutdated` unless the schema is exactly at head."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            state = "has no backupd schema" if current is None else f"is at revision {current}"
            raise SchemaOutdated(
                f"the catalog {self.safe_url} {state}, this backupd needs {head}: run `backupd db upgrade`"
            )

    # -- policies -----------------------------------------------------------------------

    @_translated
    def apply_policies(self, policies: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Create or update ``(name, canonical spec json)`` pairs in one transaction.

        Returns ``(name, "created" | "updated" | "unchanged")`` for each.
        """
        results = []
        now = now_utc()
        with self.session() as s:
            for name, spec in policies:
                row = s.get(PolicyRow, name)
                if row is None:
                    s.add(PolicyRow(name=name, spec=spec, generation=1, created_at=now, updated_at=now))
                    results.append((name, "created"))
                elif row.spec != spec:
                    row.spec, row.generation, row.updated_at = spec, row.generation + 1, now
                    results.append((name, "updated"))
                else:
                    results.append((name, "unchanged"))
        return results

    @_translated
    def list_policies(self) -> list[StoredPolicy]:
        with self.session() as s:
            rows = s.scalars(select(PolicyRow).order_by(PolicyRow.name)).all()
            return [StoredPolicy(r.name, r.spec, r.generation, r.created_at, r.updated_at) for r in rows]

    @_translated
    def policies_fingerprint(self) -> tuple[tuple[str, int], ...]:
        """Cheap change detection for the daemon: (name, generation) of every policy."""
        with self.session() as s:
            rows = s.execute(select(PolicyRow.name, PolicyRow.generation).order_by(PolicyRow.name)).all()
            return tuple((name, generation) for name, generation in rows)

    @_translated
    def delete_policy(self, name: str) -> None:
        with self.session() as s:
            if s.get(PolicyRow, name) is None:
                raise NotFound(f"no policy named {name!r}")
            s.execute(delete(PolicyRow).where(PolicyRow.name == name))

    # -- archives -----------------------------------------------------------------------

    @_translated
    def add_archive(self, archive: Archive) -> None:
        with self.session() as s:
            s.add(ArchiveRow(**{f: getattr(archive, f) for f in Archive.__dataclass_fields__}))

    @_translated
    def update_archive(self, archive_id: str, *, expect_state: str | None = None, **fields: Any) -> Archive:
        """Update fields of one archive row; with ``expect_state`` only from that state."""
        with self.session() as s:
            row = s.get(ArchiveRow, archive_id, with_for_update=expect_state is not None)
            if row is None:
                raise NotFound(f"no archive {archive_id!r} in the catalog")
            if expect_state is not None and row.state != expect_state:
                raise CatalogError(f"archive {archive_id} is {row.state}, expected {expect_state}")
            for k, v in fields.items():
                setattr(row, k, v)
            return _archive(row)

    @_translated
    def delete_archive_row(self, archive_id: str) -> None:
        self.delete_archive_rows([archive_id])

    @_translated
    def delete_archive_rows(self, archive_ids: Sequence[str]) -> None:
        with self.session() as s:
            for chunk in _chunks(archive_ids):
                s.execute(delete(ArchiveRow).where(ArchiveRow.id.in_(chunk)))

    @_translated
    def set_state(self, archive_ids: Sequence[str], state: str, *, expect: str) -> None:
        """Move archives from ``expect`` to ``state`` in one transaction; all or nothing."""
        with self.session() as s:
            moved = 0
            for chunk in _chunks(archive_ids):
                moved += s.execute(
                    update(ArchiveRow).where(ArchiveRow.id.in_(chunk), ArchiveRow.state == expect).values(state=state)
                ).rowcount or 0
            if moved != len(set(archive_ids)):
                raise CatalogError(
                    f"{len(set(archive_ids)) - moved} archive(s) were no longer {expect}; nothing was changed"
                )

    @_translated
    def set_pinned(self, ref: str, pinned: bool) -> Archive:
        archive = self.get_archive(ref)
        if archive.state != COMMITTED:
            raise InvalidInput(f"archive {archive.id} is {archive.state}; only committed archives can be pinned")
        return self.update_archive(archive.id, pinned=pinned)

    @_translated
    def get_archive(self, ref: str) -> Archive:
        """By full id or a unique id prefix (at least 4 characters)."""
        with self.session() as s:
            row = s.get(ArchiveRow, ref)
            if row is not None:
                return _archive(row)
            if len(ref) >= 4:
                rows = s.scalars(select(ArchiveRow).where(ArchiveRow.id.startswith(ref, autoescape=True)).limit(2)).all()
                if len(rows) == 1:
                    return _archive(rows[0])
                if len(rows) > 1:
                    raise InvalidInput(f"archive id prefix {ref!r} is ambiguous; give more characters")
        raise NotFound(f"no archive {ref!r} in the catalog")

    @_translated
    def list_archives(
        self,
        *,
        policy: str | None = None,
        namespace: str | None = None,
        pod: str | None = None,
        workload: str | None = None,
        container: str | None = None,
        states: Sequence[str] = (COMMITTED,),
        backend: str | None = None,
        node: str | None = None,
        replica: str | None = None,
        pod_or_replica: str | None = None,
    ) -> list[Archive]:
        """Archives matching every given filter, oldest first.

        ``pod_or_replica`` matches the pod name or the replica identity, so the node name of a
        DaemonSet replica finds its archives across the pod names its rollouts gave it.
        """
        # Plain column tuples, not ORM entities: prune plans read every archive of a policy,
        # and identity-map bookkeeping per row costs more than the query itself.
        q = select(*_ARCHIVE_COLUMNS)
        if states:
            q = q.where(ArchiveRow.state.in_(states))
        for column, value in (
            (ArchiveRow.policy, policy),
            (ArchiveRow.namespace, namespace),
            (ArchiveRow.pod, pod),
            (ArchiveRow.workload, workload),
            (ArchiveRow.container, container),
            (ArchiveRow.backend, backend),
            (ArchiveRow.node, node),
            (ArchiveRow.replica, replica),
        ):
            if value is not None:
                q = q.where(column == value)
        if pod_or_replica is not None:
            q = q.where((ArchiveRow.pod == pod_or_replica) | (ArchiveRow.replica == pod_or_replica))
        q = q.order_by(ArchiveRow.checkpoint_time, ArchiveRow.id)
        with self.session() as s:
            return [Archive(*row) for row in s.execute(q)]

    @_translated
    def list_archive_summaries(self, policy: str, states: Sequence[str] = (COMMITTED,)) -> list[ArchiveSummary]:
        """The policy's archives as :class:`ArchiveSummary`, oldest first."""
        q = (select(*[getattr(ArchiveRow, f) for f in ArchiveSummary.__dataclass_fields__])
             .where(ArchiveRow.policy == policy, ArchiveRow.state.in_(states))
             .order_by(ArchiveRow.checkpoint_time, ArchiveRow.id))
        with self.session() as s:
            return [ArchiveSummary(*row) for row in s.execute(q)]

    @_translated
    def get_archives(self, archive_ids: Sequence[str]) -> list[Archive]:
        """Full rows of the given ids that still exist, in the order given."""
        found: dict[str, Archive] = {}
        with self.session() as s:
            for chunk in _chunks(archive_ids):
                for row in s.execute(select(*_ARCHIVE_COLUMNS).where(ArchiveRow.id.in_(chunk))):
                    found[row[0]] = Archive(*row)
        return [found[i] for i in archive_ids if i in found]

    @_translated
    def archive_keys(self, backend: str) -> dict[str, str]:
        """key -> state of every archive row of one backend (for rebuild and orphan checks)."""
        with self.session() as s:
            rows = s.execute(select(ArchiveRow.key, ArchiveRow.state).where(ArchiveRow.backend == backend)).all()
            return {key: state for key, state in rows}

    # -- runs ---------------------------------------------------------------------------

    @_translated
    def start_run(self, kind: str, *, policy: str | None = None, node: str = "", **target: Any) -> int:
        with self.session() as s:
            row = RunRow(kind=kind, policy=policy, node=node, started_at=now_utc(), outcome=RUNNING, **target)
            s.add(row)
            s.flush()
            return row.id

    @_translated
    def finish_run(
        self,
        run_id: int,
        outcome: str,
        *,
        error: BaseException | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        archive_id: str | None = None,
    ) -> Run:
        with self.session() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"no run {run_id}")
            row.finished_at = now_utc()
            row.outcome = outcome
            row.duration_seconds = (row.finished_at - row.started_at).total_seconds()
            row.bytes_in, row.bytes_out = bytes_in, bytes_out
            if archive_id is not None:
                row.archive_id = archive_id
            if error is not None:
                row.error_kind = getattr(error, "kind", type(error).__name__)
                row.error = scrub(str(error))
            return _run(row)

    @_translated
    def list_runs(
        self, *, policy: str | None = None, kind: str | None = None, limit: int = 100, outcome: str | None = None
    ) -> list[Run]:
        q = select(RunRow)
        if policy is not None:
            q = q.where(RunRow.policy == policy)
        if kind is not None:
            q = q.where(RunRow.kind == kind)
        if outcome is not None:
            q = q.where(RunRow.outcome == outcome)
        q = q.order_by(RunRow.started_at.desc(), RunRow.id.desc()).limit(limit)
        with self.session() as s:
            return [_run(r) for r in s.scalars(q)]

    @_translated
    def last_run_started(self, policy: str, kind: str = "checkpoint") -> datetime | None:
        """When the policy last ran; runs a crash interrupted do not count (so they are run
        again, once, when the daemon comes back)."""
        with self.session() as s:
            return s.scalar(
                select(func.max(RunRow.started_at)).where(
                    RunRow.policy == policy, RunRow.kind == kind,
                    (RunRow.error_kind.is_(None)) | (RunRow.error_kind != "Interrupted"),
                )
            )

    @_translated
    def purge_runs(self, older_than: datetime) -> int:
        """Forget finished runs that started before ``older_than`` (run history retention)."""
        with self.session() as s:
            result = s.execute(delete(RunRow).where(RunRow.started_at < older_than, RunRow.outcome != RUNNING))
            return result.rowcount or 0

    @_translated
    def fail_interrupted_runs(self, *, node: str | None = None, kind: str | None = None,
                              policy: str | None = None) -> list[Run]:
        """Runs left ``running`` by a crash are recorded as failed (``Interrupted``); returns
        them as they now are.

        Only call this while holding the lease that the interrupted runs' owner would hold (the
        node lease for checkpoint runs, the policy's prune lease for prune runs).
        """
        conditions = [RunRow.outcome == RUNNING]
        if node is not None:
            conditions.append(RunRow.node == node)
        if kind is not None:
            conditions.append(RunRow.kind == kind)
        if policy is not None:
            conditions.append(RunRow.policy == policy)
        with self.session() as s:
            rows = list(s.scalars(select(RunRow).where(*conditions).order_by(RunRow.id)))
            for row in rows:
                row.outcome, row.error_kind = RUN_FAILED, "Interrupted"
                row.error, row.finished_at = "the daemon stopped during this run", now_utc()
            s.flush()
            return [_run(r) for r in rows]

    # -- leases -------------------------------------------------------------------------

    @_translated
    def acquire_lease(self, name: str, holder: str, ttl: timedelta) -> bool:
        """Take or renew a named lease; False if someone else holds an unexpired one.

        A create-only INSERT (the usual case: leases are released when done), else one
        conditional UPDATE decides, so two daemons racing on either database cannot both win.
        """
        now = now_utc()
        try:
            with self.session() as s:
                s.add(LeaseRow(name=name, holder=holder, expires_at=now + ttl))
            return True
        except sa_exc.IntegrityError:
            pass  # it exists: ours to renew, expired, or someone else's
        with self.session() as s:
            taken = s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at <= now))
                .values(holder=holder, expires_at=now + ttl)
            ).rowcount
        return bool(taken)

    @_translated
    def lease_holders(self) -> dict[str, str]:
        """name -> holder of every lease, expired or not."""
        with self.session() as s:
            return {name: holder for name, holder in s.execute(select(LeaseRow.name, LeaseRow.holder)).all()}

    @_translated
    def release_lease(self, name: str, holder: str) -> None:
        with self.session() as s:
            s.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder))


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    """Bounded IN lists: SQLite limits bound parameters, and huge statements help nobody."""
    items = list(dict.fromkeys(values))
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()

