"""The catalog: policies, archives, runs and leases in SQLite or PostgreSQL.

The catalog is the daemon's truth. Archive rows move through the commit protocol
``pending -> committed`` (or ``failed``) and the delete protocol ``committed -> deleting ->
(row removed)``; the backend manifest is what makes an archive exist, so a lost catalog is
rebuilt from manifests (``catalog rebuild``).

The schema belongs to Alembic (``backupd/migrations``). The daemon never creates tables; it
checks the schema is at head and otherwise refuses to start, naming ``backupd db upgrade``.
SQLAlchemy exceptions are translated here, at the edge, into :class:`CatalogUnavailable`
(connection problems, retryable) or :class:`CatalogError`. What leaves this module are plain
values -- the domain types of :mod:`backupd.model` and :class:`~backupd.catalog.cursor.Cursor`
-- never an ORM row (``.importlinter`` forbids importing ``schema`` or SQLAlchemy elsewhere).

One module over 500 lines on purpose: :class:`Catalog` is the facade every other package
uses, and each method is one short transaction; the ORM rows (``schema``), cursors
(``cursor``) and migrations live beside it. Splitting the class would only spread one
repository over files.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import structlog
from sqlalchemy import (
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CursorResult, Engine, Result, make_url
from sqlalchemy.orm import Session, aliased, sessionmaker

from backupd import retry
from backupd.catalog import liveness
from backupd.catalog.cursor import Cursor
from backupd.catalog.schema import (
    MIGRATIONS_DIR,
    ArchivePackRow,
    ArchiveRow,
    ChunkRow,
    LeaseRow,
    PackRow,
    PolicyRow,
    RunRow,
    UTCDateTime,
)
from backupd.errors import (
    CatalogError,
    CatalogUnavailable,
    IntegrityError,
    InvalidInput,
    NotFound,
    SchemaOutdated,
    scrub,
)
from backupd.model import (
    ARCHIVE_STATES,
    COMMITTED,
    RUN_FAILED,
    RUNNING,
    SUCCEEDED,
    Archive,
    ArchiveSummary,
    CatalogTotals,
    GroupStats,
    Run,
    StoredPolicy,
    now_utc,
)

#: pack states (``packs.state``): offered to writers; found unused by garbage collection (no
#: longer offered, taken back by a commit that counted on it); certain to be deleted; found
#: gone from the backend by a writer (never offered again)
PACK_STORED, PACK_UNUSED, PACK_DELETING, PACK_MISSING = "stored", "unused", "deleting", "missing"


@dataclass(frozen=True)
class PackRecord:
    """A pack of the deduplicated format as the catalog holds it (see :class:`PackRow`)."""

    backend: str
    pack_id: str
    key: str
    stored_size: int
    raw_size: int
    chunk_count: int
    state: str
    created_at: datetime
    marked_at: datetime | None = None
    archives: int = 0  # archives whose recipes use it


def _pack(row: PackRow, archives: int = 0) -> PackRecord:
    return PackRecord(row.backend, row.pack_id, row.key, row.stored_size, row.raw_size, row.chunk_count, row.state,
                      row.created_at, row.marked_at, archives)


_ARCHIVE_COLUMNS = [getattr(ArchiveRow, f) for f in Archive.__dataclass_fields__]
_SUMMARY_COLUMNS = [getattr(ArchiveRow, f) for f in ArchiveSummary.__dataclass_fields__]
_GROUP_KEY = ("policy", "namespace", "workload", "replica", "container")


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (its result is a CursorResult; the typing says Result)."""
    return cast("CursorResult[Any]", result).rowcount or 0


def _utc(moment: datetime) -> datetime:
    # aggregates (min, max) bypass the column type on SQLite: naive text comes back
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is UTC:
        return moment
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _epoch_seconds(session: Session, column: Any) -> Any:
    """Seconds since the epoch of a time column, in the session's SQL dialect."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(column) - 2440587.5) * 86400.0
    return func.date_part("epoch", column)  # a double; extract() gives a numeric, slower per row


def _archive(row: ArchiveRow) -> Archive:
    return Archive(**{f: getattr(row, f) for f in Archive.__dataclass_fields__})


def _run(row: RunRow) -> Run:
    return Run(**{f: getattr(row, f) for f in Run.__dataclass_fields__})


P = ParamSpec("P")
T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


_nested = contextvars.ContextVar("backupd_catalog_call", default=False)


def _untried(fn: Callable[P, T]) -> Callable[P, T]:
    """Map SQLAlchemy errors to backupd's catalog errors: the one edge for SQLAlchemy. Not
    retried: for callers that must answer at once (a metrics scrape); see :func:`_translated`."""

    @functools.wraps(fn)
    def attempt(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise CatalogUnavailable(f"catalog unavailable: {_describe(exc)}") from exc
        except sa_exc.DBAPIError as exc:
            raise CatalogError(f"catalog error: {_describe(exc)}") from exc

    return attempt


def _translated(fn: Callable[P, T]) -> Callable[P, T]:
    """:func:`_untried`, and retry the whole call while the database is unreachable (a
    PostgreSQL restart or failover must cost a few seconds, not a lost run record). Nested
    calls leave retrying to the outermost one."""
    attempt = _untried(fn)

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


class Catalog:
    """Repository over the catalog database. Thread-safe: one short session per call."""

    #: how long calls keep retrying while the database is unreachable (about half a minute)
    DEFAULT_RETRY = retry.Backoff(attempts=7, base_delay=0.5, max_delay=10.0)

    def __init__(self, engine: Engine, safe_url: str, *, retry_backoff: retry.Backoff | None = None) -> None:
        self.engine = engine
        self.safe_url = safe_url
        self.retry = retry_backoff or self.DEFAULT_RETRY
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._chunk_stats_checked = False

    @classmethod
    def open(cls, url: str, *, retry_backoff: retry.Backoff | None = None) -> Catalog:
        try:
            parsed = make_url(url)
        except (ValueError, sa_exc.ArgumentError):
            # the URL may hold a password: never repeat it
            raise InvalidInput("database.url: not a database URL (e.g. sqlite:////var/lib/backupd/catalog.db or "
                               "postgresql+psycopg://user@host/db)") from None
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
            raise InvalidInput(
                f"database.url: unsupported database {parsed.get_backend_name()!r} (use sqlite or postgresql)")
        engine = create_engine(parsed, **kwargs)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            event.listen(engine, "connect", _postgres_utc, insert=True)
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
                moved += _rowcount(s.execute(
                    update(ArchiveRow).where(ArchiveRow.id.in_(chunk), ArchiveRow.state == expect).values(state=state)
                ))
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
                prefixed = ArchiveRow.id.startswith(ref, autoescape=True)
                rows = s.scalars(select(ArchiveRow).where(prefixed).limit(2)).all()
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
        after: Cursor | None = None,
        limit: int | None = None,
    ) -> list[Archive]:
        """Archives matching every given filter, oldest first (by checkpoint time, then id).

        ``pod_or_replica`` matches the pod name or the replica identity, so the node name of a
        DaemonSet replica finds its archives across the pod names its rollouts gave it.
        ``after`` and ``limit`` read one page of that order: at most ``limit`` archives that
        come after the cursor (:meth:`archive_pages` reads them all, a page at a time).
        """
        # Plain column tuples, not ORM entities: prune plans read every archive of a policy,
        # and identity-map bookkeeping per row costs more than the query itself.
        q = select(*_ARCHIVE_COLUMNS)
        if states and set(states) != set(ARCHIVE_STATES):
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
        if after is not None:
            # a row comparison, which both databases answer from the (checkpoint_time, id) index
            q = q.where(tuple_(ArchiveRow.checkpoint_time, ArchiveRow.id) > tuple_(
                literal(after.time, UTCDateTime()), literal(after.id, ArchiveRow.id.type)))
        q = q.order_by(ArchiveRow.checkpoint_time, ArchiveRow.id)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return [Archive(*row) for row in s.execute(q)]

    def archive_page(self, *, limit: int, after: Cursor | None = None,
                     **filters: Any) -> tuple[list[Archive], Cursor | None]:
        """One page of :meth:`list_archives`: at most ``limit`` archives after ``after``, and the
        cursor of the next page (None when this is the last one)."""
        rows = self.list_archives(after=after, limit=limit + 1, **filters)
        return rows[:limit], (Cursor.of_archive(rows[limit - 1]) if len(rows) > limit else None)

    def archive_pages(self, *, size: int = 1000, after: Cursor | None = None,
                      **filters: Any) -> Iterator[list[Archive]]:
        """Every archive :meth:`list_archives` would return, a page of ``size`` at a time, so a
        listing of millions of rows needs the memory of one page."""
        while True:
            page, after = self.archive_page(limit=size, after=after, **filters)
            if page:
                yield page
            if after is None:
                return

    @_translated
    def list_archive_summaries(self, policy: str, states: Sequence[str] = (COMMITTED,)) -> list[ArchiveSummary]:
        """The policy's archives as :class:`ArchiveSummary`, oldest first."""
        q = (select(*_SUMMARY_COLUMNS)
             .where(ArchiveRow.policy == policy, ArchiveRow.state.in_(states))
             .order_by(ArchiveRow.checkpoint_time, ArchiveRow.id))
        with self.session() as s:
            return [ArchiveSummary(*row) for row in s.execute(q)]

    # -- aggregates (the report) ---------------------------------------------------------

    @_translated
    def group_stats(self) -> list[GroupStats]:
        """Count, stored bytes, oldest, newest and pinned ones of every retention group's
        committed archives: one aggregate query, whatever the number of archives."""
        size = func.coalesce(ArchiveRow.stored_size, 0)
        pinned = case((ArchiveRow.pinned, 1), else_=0)
        columns = (ArchiveRow.policy, ArchiveRow.namespace, ArchiveRow.workload, ArchiveRow.replica,
                   ArchiveRow.container)
        q = (select(*columns, func.count(), func.sum(size), func.min(ArchiveRow.checkpoint_time),
                    func.max(ArchiveRow.checkpoint_time), func.sum(pinned), func.sum(pinned * size))
             .where(ArchiveRow.state == COMMITTED).group_by(*columns).order_by(*columns))
        with self.session() as s:
            return [GroupStats(row[0], row[1], row[2], row[3], row[4], int(row[5]), int(row[6]), _utc(row[7]),
                               _utc(row[8]), int(row[9]), int(row[10])) for row in s.execute(q)]

    @_translated
    def group_logical_bytes(self) -> dict[tuple[str, str, str, str, str], int]:
        """The tar bytes (before compression and deduplication) of every retention group's
        committed archives: beside :meth:`group_stats`'s stored bytes, the report's dedup ratio."""
        columns = (ArchiveRow.policy, ArchiveRow.namespace, ArchiveRow.workload, ArchiveRow.replica,
                   ArchiveRow.container)
        q = (select(*columns, func.sum(func.coalesce(ArchiveRow.tar_size, 0)))
             .where(ArchiveRow.state == COMMITTED).group_by(*columns))
        with self.session() as s:
            return {tuple(row[:5]): int(row[5]) for row in s.execute(q)}  # type: ignore[misc]

    @_translated
    def has_packs(self) -> bool:
        """Whether any backend holds packs of the deduplicated format."""
        with self.session() as s:
            return s.scalar(select(PackRow.id).limit(1)) is not None

    @_translated
    def group_head(self, group: tuple[str, str, str, str, str],
                   unpinned: int) -> tuple[list[ArchiveSummary], bool]:
        """The newest committed archives of one retention group (``group_stats().group``), oldest
        first: every archive at or after the ``unpinned``-th newest unpinned one's time (ties
        and pinned ones in that time included), or all of them when it has fewer unpinned ones;
        and whether that is all of them."""
        policy, namespace, workload, replica, container = group
        of_group = (ArchiveRow.policy == policy, ArchiveRow.namespace == namespace,
                    ArchiveRow.workload == workload, ArchiveRow.replica == replica, ArchiveRow.container == container,
                    ArchiveRow.state == COMMITTED)
        with self.session() as s:
            since = s.scalar(select(ArchiveRow.checkpoint_time).where(*of_group, ArchiveRow.pinned.is_(False))
                             .order_by(ArchiveRow.checkpoint_time.desc()).offset(unpinned - 1).limit(1))
            q = select(*_SUMMARY_COLUMNS).where(*of_group)
            if since is not None:
                q = q.where(ArchiveRow.checkpoint_time >= since)
            rows = s.execute(q.order_by(ArchiveRow.checkpoint_time, ArchiveRow.id))
            return [ArchiveSummary(*row) for row in rows], since is None

    @_translated
    def group_heads(self, groups: Sequence[tuple[str, str, str, str, str]],
                    unpinned: int) -> dict[tuple[str, str, str, str, str], tuple[list[ArchiveSummary], bool]]:
        """:meth:`group_head` of several groups; on PostgreSQL in one statement per 1,000 groups
        (each group an index range: a lateral join), elsewhere one group at a time."""
        if self.engine.dialect.name != "postgresql":
            return {group: self.group_head(group, unpinned) for group in groups}
        out: dict[tuple[str, str, str, str, str], tuple[list[ArchiveSummary], bool]] = {}
        for chunk in range(0, len(groups), 1000):
            part = list(groups[chunk:chunk + 1000])
            values = ", ".join(f"(:i{n}, :p{n}, :n{n}, :w{n}, :r{n}, :c{n})" for n in range(len(part)))
            params: dict[str, Any] = {"skip": unpinned - 1}
            for n, (policy, namespace, workload, replica, container) in enumerate(part):
                params.update({f"i{n}": n, f"p{n}": policy, f"n{n}": namespace, f"w{n}": workload,
                               f"r{n}": replica, f"c{n}": container})
            same = " AND ".join(f"x.{c} = g.{c}" for c in _GROUP_KEY)
            # MATERIALIZED: each group's cut-off time is looked up once, not once per row joined
            statement = text(
                f"WITH g(i, {', '.join(_GROUP_KEY)}) AS (VALUES {values}), "
                f"c AS MATERIALIZED (SELECT g.*, (SELECT x.checkpoint_time FROM archives x WHERE {same} "
                "AND x.state = 'committed' AND NOT x.pinned ORDER BY x.checkpoint_time DESC "
                "OFFSET :skip LIMIT 1) AS since FROM g) "
                "SELECT c.i, c.since IS NULL AS complete, a.id, a.checkpoint_time, a.stored_size, a.pinned FROM c "
                f"JOIN archives a ON {same.replace('x.', 'a.').replace('g.', 'c.')} AND a.state = 'committed' "
                "AND a.checkpoint_time >= COALESCE(c.since, '-infinity') "
                "ORDER BY c.i, a.checkpoint_time, a.id")
            found: dict[int, tuple[list[ArchiveSummary], bool]] = {}
            with self.session() as s:
                for i, complete, archive_id, moment, stored_size, pinned in s.execute(statement, params).all():
                    rows = found.setdefault(i, ([], bool(complete)))[0]
                    policy, namespace, workload, replica, container = part[i]
                    rows.append(ArchiveSummary(archive_id, COMMITTED, policy, namespace, workload, replica, container,
                                               _utc(moment), stored_size, pinned))
            for n, group in enumerate(part):
                out[group] = found.get(n, ([], True))
        return out

    @_translated
    def storage_series(self, policies: Sequence[tuple[str, int]],
                       steps: int) -> dict[str, list[tuple[datetime, int]]]:
        """Each policy's committed archives as ``(time, stored bytes)`` steps, oldest first.
        ``policies``: (name, archive count). A policy with at most ``steps`` archives gets a
        step per checkpoint time; the others a step per span of a grid of ``10 * steps`` equal
        spans over all their archives' times, at the newest archive in the span (so a running
        sum is exact at every step's time). Two aggregate queries, whatever the catalog holds."""
        out: dict[str, list[tuple[datetime, int]]] = {name: [] for name, _count in policies}
        size = func.coalesce(func.sum(ArchiveRow.stored_size), 0)
        few = [name for name, count in policies if count <= steps]
        many = [name for name, count in policies if count > steps]
        with self.session() as s:
            queries = []
            for chunk in _chunks(few):
                queries.append(select(ArchiveRow.policy, ArchiveRow.checkpoint_time, size)
                               .where(ArchiveRow.state == COMMITTED, ArchiveRow.policy.in_(chunk))
                               .group_by(ArchiveRow.policy, ArchiveRow.checkpoint_time))
            if many:
                committed = (ArchiveRow.state == COMMITTED, ArchiveRow.policy.in_(many))
                first, last = s.execute(select(func.min(ArchiveRow.checkpoint_time),
                                               func.max(ArchiveRow.checkpoint_time)).where(*committed)).one()
                width = max((_utc(last) - _utc(first)).total_seconds() / (10 * steps), 1e-6)
                span = func.floor((_epoch_seconds(s, ArchiveRow.checkpoint_time) - _utc(first).timestamp()) / width)
                queries.append(select(ArchiveRow.policy, func.max(ArchiveRow.checkpoint_time), size)
                               .where(*committed).group_by(ArchiveRow.policy, span))
            for q in queries:
                for name, moment, total in s.execute(q).all():
                    out[name].append((_utc(moment), int(total or 0)))
        for series in out.values():
            series.sort()
        return out

    @_translated
    def latest_runs(self) -> list[Run]:
        """The latest finished (succeeded or failed) checkpoint, prune and verify run of every
        policy, target, pod and outcome: what a report says about runs. One aggregate over the
        runs index, then the chosen runs by their start times."""
        # in the order of ix_runs_policy_kind_outcome_...: PostgreSQL aggregates from the index alone
        keys = (RunRow.policy, RunRow.kind, RunRow.outcome, RunRow.namespace, RunRow.workload, RunRow.container,
                RunRow.pod)
        q = (select(*keys, func.max(RunRow.started_at))
             .where(RunRow.policy.is_not(None), RunRow.kind.in_(("checkpoint", "prune", "verify")),
                    RunRow.outcome.in_((SUCCEEDED, RUN_FAILED)))
             .group_by(*keys))
        chosen: dict[tuple[Any, ...], Run] = {}
        with self.session() as s:
            if s.get_bind().dialect.name == "postgresql":
                # The planner expects a group per few runs and sorts a parallel scan; walking the
                # index in order (a group per target and pod) takes half the time.
                s.execute(text("SET LOCAL enable_sort = off"))
            latest = {tuple(row[:-1]): _utc(row[-1]) for row in s.execute(q).all()}
            for chunk in _chunks(sorted(set(latest.values()))):
                for row in s.scalars(select(RunRow).where(RunRow.started_at.in_(chunk))).all():
                    run = _run(row)
                    key = tuple(getattr(run, k.key) for k in keys)
                    known = chosen.get(key)
                    # several runs started at the same moment: the last id wins
                    if latest.get(key) == run.started_at and (known is None or run.id > known.id):
                        chosen[key] = run
        return list(chosen.values())

    @_untried
    def totals(self) -> CatalogTotals:
        """Committed archives and bytes per policy, and when each container's newest successful
        checkpoint run finished: the state metrics. Not retried: a scrape answers now."""
        with self.session() as s:
            per_policy = s.execute(
                select(ArchiveRow.policy, func.count(), func.coalesce(func.sum(ArchiveRow.stored_size), 0))
                .where(ArchiveRow.state == COMMITTED).group_by(ArchiveRow.policy)
            ).all()
            per_container = s.execute(
                select(RunRow.namespace, RunRow.workload, RunRow.container, func.max(RunRow.finished_at))
                .where(RunRow.kind == "checkpoint", RunRow.outcome == SUCCEEDED)
                .group_by(RunRow.namespace, RunRow.workload, RunRow.container)
            ).all()
        return CatalogTotals(
            retained={policy: (int(count), int(total or 0)) for policy, count, total in per_policy},
            last_success={(namespace or "", workload or "", container or ""): _utc(finished)
                          for namespace, workload, container, finished in per_container if finished is not None},
        )

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

    # -- packs of the deduplicated format -------------------------------------------------

    @_translated
    def record_pack(self, backend: str, pack_id: str, key: str, *, stored_size: int, raw_size: int,
                    chunk_ids: Sequence[bytes], created_at: datetime | None = None) -> str:
        """Record a pack whose put returned, with its chunks (``chunk_ids`` in the pack's index
        order: a chunk's position there is its ``seq``), so that :meth:`known_chunks` offers
        them; returns its state. Idempotent: a pack already recorded (the same name is the same
        bytes) keeps its row, and one found unused is offered again."""
        with self.session() as s:
            existing = s.scalar(select(PackRow).where(PackRow.backend == backend, PackRow.pack_id == pack_id))
            if existing is not None:
                if existing.state == PACK_UNUSED:
                    existing.state, existing.marked_at = PACK_STORED, None
                if not existing.chunk_count and chunk_ids:  # recorded by a rebuild that could not read it
                    _insert_chunk_rows(s.connection(), existing.id, chunk_ids)
                    existing.chunk_count, existing.raw_size = len(chunk_ids), raw_size
                return existing.state
            row = PackRow(backend=backend, pack_id=pack_id, key=key, stored_size=stored_size, raw_size=raw_size,
                          chunk_count=len(chunk_ids), state=PACK_STORED, created_at=created_at or now_utc())
            s.add(row)
            s.flush()
            if chunk_ids:  # none: a pack whose index could not be read (encrypted, no identity)
                _insert_chunk_rows(s.connection(), row.id, chunk_ids)
                if not self._chunk_stats_checked:
                    self._chunk_stats_checked = True
                    _analyze_chunks_once(s.connection())
            return PACK_STORED

    def known_chunks(self, backend: str, chunk_ids: Sequence[bytes]) -> dict[bytes, str]:
        """chunk id -> pack id of those of ``chunk_ids`` that a ``stored`` pack of ``backend``
        holds (:meth:`known_places` without the positions)."""
        return {chunk_id: pack_id for chunk_id, (pack_id, _seq) in self.known_places(backend, chunk_ids).items()}

    @_translated
    def known_places(self, backend: str, chunk_ids: Sequence[bytes]) -> dict[bytes, tuple[str, int | None]]:
        """chunk id -> (pack id, position in that pack) of those of ``chunk_ids`` that a
        ``stored`` pack of ``backend`` holds: what a writer need not store again, and where
        what it reuses is (the commit records that, chunk by chunk: :mod:`backupd.catalog.liveness`;
        the position is None for chunks recorded before revision 0005). Packs still being
        uploaded are not recorded yet and unused or deleting ones are not offered, so an answer
        never names a pack that a writer cannot count on (a commit re-checks:
        :meth:`commit_dedup_archive`)."""
        found: dict[bytes, tuple[str, int | None]] = {}
        with self.engine.connect() as conn:
            for chunk_id, (pack_id, _key, state), seq in self._chunk_places(conn, backend, chunk_ids):
                if state == PACK_STORED:
                    found.setdefault(chunk_id, (pack_id, seq))
        return found

    def _chunk_places(self, conn: Any, backend: str, chunk_ids: Sequence[bytes]) \
            -> Iterator[tuple[bytes, tuple[str, str, str], int | None]]:
        """(chunk id, (pack id, key, state), position) of every place of ``backend`` that holds
        one of ``chunk_ids``. Two index lookups, chunks first: joined in one statement, SQLite
        without statistics walks every pack of the backend and looks each id up in each (a
        writer's lookups then slow down with every pack the repository gains)."""
        for chunk in _chunks(chunk_ids):
            places = _places_of(conn, chunk)
            if not places:
                continue
            packs: dict[int, tuple[str, str, str]] = {}
            for ids in _chunks(sorted({pack for _c, pack, _s in places})):
                for row_id, pack_id, key, state in conn.execute(
                        select(PackRow.id, PackRow.pack_id, PackRow.key, PackRow.state)
                        .where(PackRow.id.in_(ids), PackRow.backend == backend)):
                    packs[row_id] = (pack_id, key, state)
            for chunk_id, pack, seq in places:
                if pack in packs:
                    yield chunk_id, packs[pack], seq

    @_translated
    def locate_chunks(self, backend: str, chunk_ids: Sequence[bytes]) -> dict[bytes, str]:
        """chunk id -> key of a pack of ``backend`` that holds it (any state: a restore reads
        whatever is still there)."""
        found: dict[bytes, str] = {}
        with self.engine.connect() as conn:
            for chunk_id, (_pack_id, key, state), _seq in self._chunk_places(conn, backend, chunk_ids):
                if state == PACK_STORED or chunk_id not in found:
                    found[chunk_id] = key
        return found

    @_translated
    def commit_dedup_archive(self, archive_id: str, backend: str, pack_ids: Sequence[str], *,
                             used: Mapping[str, int] | None = None, expect_state: str | None = None,
                             **fields: Any) -> Archive:
        """Commit a deduplicated archive: in one transaction, check that every pack its recipe
        uses is still recorded and not ``deleting`` (one garbage collection found unused is
        taken back: this archive uses it), record which packs it uses -- and, from ``used``
        (pack id -> mask of positions, :mod:`backupd.catalog.liveness`), which of their chunks;
        a pack not in ``used`` is recorded as "unknown: every chunk" -- then update the row as
        :meth:`update_archive` does. Raises :class:`IntegrityError` naming a pack that is gone
        or going, and changes nothing. Pack rows are locked in pack id order, as
        :meth:`move_repacked` locks them."""
        used = used or {}
        with self.session() as s:
            rows: dict[str, PackRow] = {}
            for chunk in _chunks(sorted(set(pack_ids))):
                for row in s.scalars(select(PackRow).where(PackRow.backend == backend, PackRow.pack_id.in_(chunk))
                                     .order_by(PackRow.pack_id).with_for_update()):
                    rows[row.pack_id] = row
            for pack_id in dict.fromkeys(pack_ids):
                pack = rows.get(pack_id)
                if pack is None or pack.state in (PACK_DELETING, PACK_MISSING):
                    why = {None: "not in the catalog", PACK_DELETING: "being deleted", PACK_MISSING: "gone from the "
                           "backend"}[None if pack is None else pack.state]
                    raise IntegrityError(f"archive {archive_id}: pack {pack_id} of backend {backend!r} it uses is "
                                         f"{why}; the archive is not committed")
                if pack.state == PACK_UNUSED:
                    pack.state, pack.marked_at = PACK_STORED, None
            archive = s.get(ArchiveRow, archive_id, with_for_update=True)
            if archive is None:
                raise NotFound(f"no archive {archive_id!r} in the catalog")
            if expect_state is not None and archive.state != expect_state:
                raise CatalogError(f"archive {archive_id} is {archive.state}, expected {expect_state}")
            have = {r.pack: r for r in s.scalars(select(ArchivePackRow).where(ArchivePackRow.archive_id == archive_id))}
            new = []
            for r in rows.values():
                mask = used.get(r.pack_id)
                if r.id not in have:
                    new.append({"archive_id": archive_id, "pack": r.id,
                                "used": None if mask is None else liveness.encode(mask)})
                elif have[r.id].used is not None:  # committed again: what it used then, and now
                    have[r.id].used = None if mask is None else liveness.encode(
                        mask | liveness.decode(have[r.id].used, r.chunk_count))
            if new:
                s.execute(insert(ArchivePackRow), new)
            for k, v in fields.items():
                setattr(archive, k, v)
            return _archive(archive)

    @_translated
    def archive_pack_ids(self, archive_id: str) -> list[str]:
        """The packs a deduplicated archive's chunks are in now (its manifest names those of
        when it was written; a repack moves chunks to new packs: :meth:`move_repacked`)."""
        with self.session() as s:
            q = (select(PackRow.pack_id).join(ArchivePackRow, ArchivePackRow.pack == PackRow.id)
                 .where(ArchivePackRow.archive_id == archive_id).order_by(PackRow.pack_id))
            return list(s.scalars(q))

    @_translated
    def repack_candidates(self, backend: str, *, created_before: datetime,
                          below: float) -> list[tuple[PackRecord, int]]:
        """``stored`` packs of ``backend`` created before ``created_before`` whose live chunks
        -- those any archive uses: the union of their ``archive_packs`` bitmaps -- are fewer
        than ``below`` of their chunks, with that union (a mask over positions), emptiest
        first. Packs some archive uses "unknown" chunks of (rows from before revision 0005,
        rebuilt or reconciled ones) count as wholly live; packs no archive uses are left to
        the mark phase. One pass over the candidates' rows, streamed a pack at a time."""
        whole = aliased(ArchivePackRow)
        unknown = select(whole.pack).where(whole.pack == PackRow.id, whole.used.is_(None)).exists()
        q = (select(PackRow.id, PackRow.chunk_count, ArchivePackRow.used)
             .join(ArchivePackRow, ArchivePackRow.pack == PackRow.id)
             .where(PackRow.backend == backend, PackRow.state == PACK_STORED, PackRow.created_at < created_before,
                    PackRow.chunk_count > 0, ~unknown)
             .order_by(PackRow.id).execution_options(yield_per=1000))
        live: dict[int, int] = {}
        users: dict[int, int] = {}
        sizes: dict[int, int] = {}
        with self.session() as s:
            for row_id, count, blob in s.execute(q):
                users[row_id] = users.get(row_id, 0) + 1
                sizes[row_id] = count
                mask = live.get(row_id, 0)
                if mask != liveness.full(count):  # the rest of its rows cannot add anything
                    live[row_id] = mask | liveness.decode(blob, count)
            chosen: list[tuple[PackRecord, int]] = []
            for chunk in _chunks([i for i, mask in live.items() if mask.bit_count() < below * sizes[i]]):
                for row in s.scalars(select(PackRow).where(PackRow.id.in_(chunk))):
                    chosen.append((_pack(row, users[row.id]), live[row.id]))
        chosen.sort(key=lambda c: (c[1].bit_count() / c[0].chunk_count, c[0].pack_id))
        return chosen

    @_translated
    def move_repacked(self, backend: str, old_pack_id: str, moves: Mapping[int, tuple[str, int]], *,
                      now: datetime) -> str | None:
        """The swap of a repack, in one transaction: every archive that uses chunks of pack
        ``old_pack_id`` is moved to the packs its chunks were copied into -- ``moves``: old
        position -> (new pack id, new position) -- with its bitmaps remapped, and the old pack
        becomes ``unused`` (marked ``now``: the sweep deletes it a grace period later, and a
        commit that counted on it meanwhile takes it back). Returns None when done, or why
        nothing was changed: the old pack is no longer ``stored``, a new one is not, or a
        chunk that was dead when the pack was read is used now (a concurrent checkpoint
        committed it) or its use is unknown. Locks the pack rows in pack id order, as
        :meth:`commit_dedup_archive` does, so one of the two waits for the other."""
        new_ids = sorted({pack_id for pack_id, _seq in moves.values()})
        if old_pack_id in new_ids:  # repacked into the same bytes: a repack output repacked with nothing new
            return "its live chunks make the same pack again"
        with self.session() as s:
            rows = {r.pack_id: r for r in s.scalars(
                select(PackRow).where(PackRow.backend == backend, PackRow.pack_id.in_([old_pack_id, *new_ids]))
                .order_by(PackRow.pack_id).with_for_update())}
            old = rows.get(old_pack_id)
            if old is None or old.state != PACK_STORED:
                return f"it is {old.state if old else 'gone from the catalog'}"
            for pack_id in new_ids:
                if pack_id not in rows or rows[pack_id].state != PACK_STORED:
                    return f"its new pack {pack_id} is {rows[pack_id].state if pack_id in rows else 'not recorded'}"
            users = list(s.scalars(select(ArchivePackRow.archive_id).where(ArchivePackRow.pack == old.id)))
            # an archive deleted meanwhile waits for this transaction (or is gone before it)
            locked: set[str] = set()
            for chunk in _chunks(users):
                locked.update(s.scalars(select(ArchiveRow.id).where(ArchiveRow.id.in_(chunk))
                                        .with_for_update(key_share=True)))
            uses = [r for r in s.scalars(select(ArchivePackRow).where(ArchivePackRow.pack == old.id)
                                         .with_for_update()) if r.archive_id in locked]
            if not uses:
                return "no archive uses it any more (the mark phase takes it)"
            if any(r.used is None for r in uses):
                return "an archive uses it whole (its chunks' use is unknown)"
            masks = {r.archive_id: liveness.decode(r.used, old.chunk_count) for r in uses}
            revived = sum(1 for n in liveness.positions(functools.reduce(operator.or_, masks.values()))
                          if n not in moves)
            if revived:
                return f"{revived} chunk(s) of it not copied are used now (a checkpoint committed meanwhile)"
            by_row = {rows[pack_id].id: pack_id for pack_id in new_ids}
            have: dict[tuple[str, int], ArchivePackRow] = {}
            for chunk in _chunks(list(masks)):
                for r in s.scalars(select(ArchivePackRow).where(ArchivePackRow.archive_id.in_(chunk),
                                                                ArchivePackRow.pack.in_(list(by_row)))
                                   .with_for_update()):
                    have[(r.archive_id, r.pack)] = r
            new: list[dict[str, Any]] = []
            for archive_id, mask in masks.items():
                bits: dict[int, bytearray] = {}
                for n in liveness.positions(mask):
                    pack_id, seq = moves[n]
                    liveness.add(bits.setdefault(rows[pack_id].id, bytearray()), seq)
                for row_id, b in bits.items():
                    moved = int.from_bytes(b, "little")
                    existing = have.get((archive_id, row_id))
                    if existing is None:
                        new.append({"archive_id": archive_id, "pack": row_id, "used": liveness.encode(moved)})
                    elif existing.used is not None:
                        existing.used = liveness.encode(
                            moved | liveness.decode(existing.used, rows[by_row[row_id]].chunk_count))
            s.execute(delete(ArchivePackRow).where(ArchivePackRow.pack == old.id))
            if new:
                s.execute(insert(ArchivePackRow), new)
            old.state, old.marked_at = PACK_UNUSED, now
            return None

    @_translated
    def list_packs(self, backend: str, *, states: Sequence[str] = ()) -> list[PackRecord]:
        """The packs of ``backend`` (of ``states``, or all), with how many archives use each."""
        uses = (select(ArchivePackRow.pack, func.count().label("n")).group_by(ArchivePackRow.pack).subquery())
        q = (select(PackRow, func.coalesce(uses.c.n, 0)).outerjoin(uses, uses.c.pack == PackRow.id)
             .where(PackRow.backend == backend).order_by(PackRow.id))
        if states:
            q = q.where(PackRow.state.in_(states))
        with self.session() as s:
            return [_pack(row, n) for row, n in s.execute(q)]

    @_translated
    def pack_chunk_ids(self, backend: str, pack_id: str) -> list[bytes]:
        with self.session() as s:
            q = (select(ChunkRow.chunk_id).join(PackRow, PackRow.id == ChunkRow.pack)
                 .where(PackRow.backend == backend, PackRow.pack_id == pack_id))
            return [bytes(c) for c in s.scalars(q)]

    @_translated
    def mark_unused_packs(self, backend: str, *, created_before: datetime, now: datetime) -> list[PackRecord]:
        """Garbage collection, phase one: ``stored`` packs created before ``created_before``
        that no archive uses become ``unused`` (no longer offered to writers), marked ``now``."""
        return self._move_unused_packs(backend, PACK_STORED, PackRow.created_at < created_before,
                                       state=PACK_UNUSED, marked_at=now)

    @_translated
    def doom_unused_packs(self, backend: str, *, marked_before: datetime) -> list[PackRecord]:
        """Garbage collection, phase two: ``unused`` packs marked before ``marked_before`` that
        still no archive uses become ``deleting``, in one transaction with the check (a commit
        that takes one back first wins: :meth:`commit_dedup_archive` locks the same rows)."""
        return self._move_unused_packs(backend, PACK_UNUSED, PackRow.marked_at < marked_before, state=PACK_DELETING)

    def _move_unused_packs(self, backend: str, current: str, condition: Any, *, state: str,
                           **values: Any) -> list[PackRecord]:
        """Packs of ``backend`` in state ``current`` meeting ``condition`` that no archive uses,
        locked, moved to ``state`` (with ``values``) in one transaction."""
        used = select(ArchivePackRow.pack).where(ArchivePackRow.pack == PackRow.id).exists()
        with self.session() as s:
            rows = list(s.scalars(select(PackRow).where(PackRow.backend == backend, PackRow.state == current,
                                                        condition, ~used).with_for_update()))
            for row in rows:
                row.state = state
                for name, value in values.items():
                    setattr(row, name, value)
            return [_pack(r) for r in rows]

    @_translated
    def mark_packs_missing(self, backend: str, pack_ids: Sequence[str]) -> None:
        """Packs found gone from the backend: never offered to writers again (archives that use
        them are reported by verify; garbage collection forgets those no archive uses)."""
        with self.session() as s:
            for chunk in _chunks(pack_ids):
                s.execute(update(PackRow).where(PackRow.backend == backend, PackRow.pack_id.in_(chunk))
                          .values(state=PACK_MISSING))

    @_translated
    def drop_pack_rows(self, backend: str, pack_ids: Sequence[str]) -> None:
        """Forget packs (their chunks too) whose objects were deleted or are gone; only
        ``deleting`` and ``missing`` ones."""
        with self.session() as s:
            for chunk in _chunks(pack_ids):
                ids = list(s.scalars(select(PackRow.id).where(PackRow.backend == backend, PackRow.pack_id.in_(chunk),
                                                              PackRow.state.in_((PACK_DELETING, PACK_MISSING)))))
                if ids:
                    s.execute(delete(ChunkRow).where(ChunkRow.pack.in_(ids)))
                    s.execute(delete(PackRow).where(PackRow.id.in_(ids)))

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
        self, *, policy: str | None = None, kind: str | None = None, limit: int = 100, outcome: str | None = None,
        after: Cursor | None = None,
    ) -> list[Run]:
        """Runs newest first (by start, then id); ``after``: only those after that cursor in this
        order (older ones)."""
        q = select(RunRow)
        if after is not None:
            q = q.where(tuple_(RunRow.started_at, RunRow.id) < tuple_(
                literal(after.time, UTCDateTime()), literal(int(after.id), RunRow.id.type)))
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
            return _rowcount(result)

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
            taken = _rowcount(s.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at <= now))
                .values(holder=holder, expires_at=now + ttl)
            ))
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


# Built once, the ids bound as one expanding parameter: a writer asks ~700 times per GiB, and
# coercing each id into the statement cost more than the lookup.
_IDS = bindparam("ids", expanding=True, type_=ChunkRow.chunk_id.type)
_PLACES = select(ChunkRow.chunk_id, ChunkRow.pack, ChunkRow.seq).where(ChunkRow.chunk_id.in_(_IDS))
_PLACES_SQLITE = select(func.group_concat(func.printf("%s:%d:%d", func.hex(ChunkRow.chunk_id), ChunkRow.pack,
                                                      func.coalesce(ChunkRow.seq, -1)), ",")).where(
    ChunkRow.chunk_id.in_(_IDS))


def _places_of(conn: Any, chunk_ids: Sequence[bytes]) -> list[tuple[bytes, int, int | None]]:
    """(chunk id, pack row, position) of every row of ``chunk_ids`` in the chunk map.

    On SQLite as one text row per statement: Python's sqlite3 releases the GIL at every row it
    steps, and while a writer's hashing and compression threads are busy each re-acquire waits
    (measured: 90,000 lookups take 0.2 s alone and 1.6 s beside two threads hashing pages).
    psycopg receives a whole result at once."""
    if conn.dialect.name != "sqlite":
        return [(bytes(c), p, q) for c, p, q in conn.execute(_PLACES, {"ids": list(chunk_ids)})]
    text = conn.execute(_PLACES_SQLITE, {"ids": list(chunk_ids)}).scalar()
    places: list[tuple[bytes, int, int | None]] = []
    for item in text.split(",") if text else ():
        chunk_hex, pack, seq = item.split(":")
        places.append((bytes.fromhex(chunk_hex), int(pack), None if seq == "-1" else int(seq)))
    return places


def _analyze_chunks_once(conn: Any) -> None:
    """Give PostgreSQL statistics of the chunk map the first time it has rows.

    Until autovacuum first analyzes the table (a minute or more after it grows), the planner
    guesses that each chunk id matches hundreds of rows and answers a writer's lookups of 64 or
    more ids with a sequential scan of the whole map: every lookup then costs more with every
    pack stored (measured: a 348 MiB increment 4.1 s, then 4.9, 5.6, 6.1, 6.7 s). Once analyzed,
    ids are known to be distinct and each lookup is an index scan however the map grows."""
    if conn.dialect.name != "postgresql":
        return
    never = conn.exec_driver_sql(
        "SELECT reltuples < 0 FROM pg_class WHERE oid = to_regclass(%(table)s)",
        {"table": ChunkRow.__tablename__}).scalar()
    if never:
        conn.exec_driver_sql(f"ANALYZE {ChunkRow.__tablename__}")


def _insert_chunk_rows(conn: Any, pack: int, chunk_ids: Sequence[bytes]) -> None:
    """The chunk -> pack map of one pack (each chunk once, at its first position), in the
    transaction of ``conn``.

    A writer records about 5,000 rows per pack as its put returns, beside its hashing and
    compression: through SQLAlchemy's per-row parameter handling that cost more than the
    database's own work (measured on a 348 MiB first checkpoint through the daemon's path:
    PostgreSQL 5.6 s, of which 3.3 s recording). So the rows go straight to the driver: one
    prepared INSERT run for every row on SQLite, COPY on PostgreSQL."""
    seqs: dict[bytes, int] = {}
    for n, chunk_id in enumerate(chunk_ids):
        seqs.setdefault(chunk_id, n)
    table = ChunkRow.__tablename__
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cursor, \
                cursor.copy(f"COPY {table} (chunk_id, pack, seq) FROM STDIN") as copy:
            for chunk_id, n in seqs.items():
                copy.write_row((chunk_id, pack, n))
        return
    conn.exec_driver_sql(f"INSERT INTO {table} (chunk_id, pack, seq) VALUES (?, ?, ?)",
                         [(chunk_id, pack, n) for chunk_id, n in seqs.items()])


def _chunks(values: Sequence[H], size: int = 500) -> Iterator[list[H]]:
    """Bounded IN lists: SQLite limits bound parameters, and huge statements help nobody."""
    items = list(dict.fromkeys(values))
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _postgres_utc(dbapi_conn: Any, _record: Any) -> None:
    # Times come back in the session's zone: in UTC they are datetime.UTC already, and the
    # million conversions a big listing or report would make from the server's zone go away.
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    with dbapi_conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    dbapi_conn.autocommit = autocommit


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()

