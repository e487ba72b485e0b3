"""The catalog's tables as SQLAlchemy rows. Only ``backupd.catalog`` reads or writes them;
the rest of backupd sees the domain types of :mod:`backupd.model`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}



MIGRATIONS_DIR = Path(__file__).with_name("migrations")



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
        if value is None or value.tzinfo is UTC:
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)



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
    #: the pod's stable identity within its workload (backupd.model.replica_of); "" for none
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
        # The report's aggregates read only this index on PostgreSQL (an index-only scan: the
        # included columns are what they sum and filter on).
        Index(None, "policy", "namespace", "workload", "replica", "container", "checkpoint_time",
              postgresql_include=["state", "pinned", "stored_size", "id"]),
        Index(None, "state"),
        Index(None, "backend", "key", unique=True),
        Index(None, "checkpoint_time", "id"),  # the listing order: pages are read from it
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
        Index(None, "started_at", "id"),  # the listing order (newest first) and the history purge
        # the report's latest run of each kind, target, pod and outcome, from the index alone
        Index(None, "policy", "kind", "outcome", "namespace", "workload", "container", "pod", "started_at"),
    )



class LeaseRow(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())




class PackRow(Base):
    """A pack of the deduplicated format (``format = "dedup"``) stored in a backend.

    ``state``: ``stored`` (its chunks are offered to writers), ``unused`` (garbage collection
    found no archive using it: no longer offered, but a commit that counted on it takes it
    back), ``deleting`` (certain to go: the object is being deleted, then the row).
    """

    __tablename__ = "packs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backend: Mapped[str] = mapped_column(String(63))
    pack_id: Mapped[str] = mapped_column(String(64))  # SHA-256 (hex) of the stored bytes
    key: Mapped[str] = mapped_column(String(1024))
    stored_size: Mapped[int] = mapped_column(BigInteger)
    raw_size: Mapped[int] = mapped_column(BigInteger)
    chunk_count: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    marked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index(None, "backend", "pack_id", unique=True),
        Index(None, "backend", "state"),
    )


class ChunkRow(Base):
    """The chunk -> pack map: which packs hold a chunk (two writers may each store one)."""

    __tablename__ = "chunks"

    chunk_id: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    pack: Mapped[int] = mapped_column(ForeignKey("packs.id", ondelete="CASCADE"), primary_key=True)
    #: the chunk's position in its pack's index (its first, should the pack hold it twice);
    #: NULL for rows recorded before revision 0005
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index(None, "pack"),)


class ArchivePackRow(Base):
    """The packs a deduplicated archive's recipe uses: what garbage collection marks from."""

    __tablename__ = "archive_packs"

    archive_id: Mapped[str] = mapped_column(ForeignKey("archives.id", ondelete="CASCADE"), primary_key=True)
    pack: Mapped[int] = mapped_column(ForeignKey("packs.id", ondelete="RESTRICT"), primary_key=True)
    #: which of the pack's chunks (by ``chunks.seq``) the archive uses, encoded by
    #: :func:`backupd.catalog.liveness.encode`; NULL: unknown, every chunk counts as used
    used: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    __table_args__ = (Index(None, "pack"),)
