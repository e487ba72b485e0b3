"""A deduplicating repository on any backend, and checkpoint tars from the node simulator."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from backupd.backends.base import Backend
from backupd.simulator.archive import write_checkpoint_archive
from backupd.simulator.topology import default_topology, materialize
from backupd.storage.dedup import ArchiveWriter, ChunkIds, PackStore, WriteResult, restore
from backupd.storage.dedup.pack import read_pack_index


class Repo:
    """Archives written through the real writer into ``backend``; the set of stored chunk ids
    stands in for the catalog (phase 2) and is filled from the packs' own indexes."""

    def __init__(self, backend: Backend, *, ids: ChunkIds | None = None, recipients: Sequence[Any] = (),
                 identities: Sequence[Any] = (), **options: Any) -> None:
        self.backend = backend
        self.ids = ids or ChunkIds()
        self.recipients, self.identities = list(recipients), list(identities)
        self.options = options
        self.stored: set[bytes] = set()
        self.count = 0

    def known(self, ids: list[bytes]) -> set[bytes]:
        return {i for i in ids if i in self.stored}

    def write(self, data: bytes, **options: Any) -> tuple[str, WriteResult]:
        writer = ArchiveWriter(self.backend, known=self.known, ids=self.ids, recipients=self.recipients,
                               **{**self.options, **options})
        result = writer.write(io.BytesIO(data), what="test tar", total_size=len(data))
        for pack in result.packs:
            self.stored.update(read_pack_index(self.backend, pack.key, identities=self.identities).order)
        self.count += 1
        key = f"dedup/recipes/archive-{self.count}.recipe"
        self.backend.put(key, result.recipe)
        result.recipe.close()
        return key, result

    def read(self, key: str, *, tar_sha256: str | None = None, **kwargs: Any) -> bytes:
        store = PackStore(self.backend, identities=self.identities)
        out = io.BytesIO()
        try:
            with self.backend.open(key) as recipe:
                restore(recipe, store, out, ids=self.ids, identities=self.identities, tar_sha256=tar_sha256,
                        **kwargs)
        finally:
            store.close()
        return out.getvalue()

    def round_trip(self, data: bytes, **options: Any) -> WriteResult:
        key, result = self.write(data, **options)
        assert result.tar_sha256 == hashlib.sha256(data).hexdigest()
        assert result.tar_size == len(data)
        assert self.read(key, tar_sha256=result.tar_sha256) == data
        return result


CheckpointTar = Callable[..., bytes]


@pytest.fixture(scope="session")
def checkpoint_tar(tmp_path_factory: pytest.TempPathFactory) -> CheckpointTar:
    """Synthetic checkpoint tars (CRI-O layout) of one container; ``sequence`` changes the
    memory content the way successive checkpoints do. Cached per arguments."""
    pod = next(p for p in materialize(default_topology(), seed=3) if p.containers)
    cache: dict[tuple[int, int], bytes] = {}
    directory: Path = tmp_path_factory.mktemp("tars")

    def build(sequence: int = 0, memory_bytes: int = 2 << 20) -> bytes:
        if (sequence, memory_bytes) not in cache:
            path = directory / f"{sequence}-{memory_bytes}.tar"
            with open(path, "wb") as fh:
                write_checkpoint_archive(fh, pod, pod.containers[0], memory_bytes=memory_bytes, seed=3,
                                         sequence=sequence, checkpointed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
            cache[(sequence, memory_bytes)] = path.read_bytes()
        return cache[(sequence, memory_bytes)]

    return build


# -- format = "dedup" wired into backupd: apps on a directory or a moto bucket ------------------


def dedup_app(tmp_path: Path, sim: Any, db_url: str, *, s3: tuple[str, str] | None = None,
              **backend: object) -> Any:
    """An app whose one backend, ``local``, has ``format = "dedup"``: a directory, or with
    ``s3=(moto endpoint, bucket)`` a bucket of the moto server."""
    from backupd.app import App
    from backupd.config import FilesystemBackendConfig, S3BackendConfig
    from tests.conftest import make_config

    config = make_config(tmp_path, sim, db_url)
    if s3 is not None:
        from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, REGION

        config.backends[0] = S3BackendConfig(  # type: ignore[call-arg]
            name="local", type="s3", bucket=s3[1], prefix="prod", endpoint_url=s3[0], region=REGION,
            addressing_style="path", access_key_id=FAKE_ACCESS_KEY, secret_access_key=FAKE_SECRET,
            format="dedup", **backend)  # type: ignore[arg-type]
    else:
        config.backends[0] = FilesystemBackendConfig(name="local", type="filesystem", path=tmp_path / "backend",
                                                     format="dedup", **backend)  # type: ignore[arg-type]
    app = App(config)
    app.catalog.upgrade()
    return app


def encrypted_dedup_app(tmp_path: Path, sim: Any) -> tuple[Any, Any]:
    """:func:`dedup_app` with age recipients and a keyed-id key file (SQLite), and the age
    identity that reads it."""
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "id-key"
    key_file.write_text(secrets.token_hex(32))
    key_file.chmod(0o600)
    app = dedup_app(tmp_path, sim, f"sqlite:///{tmp_path / 'catalog.db'}",
                    encryption_recipients=[str(ident.to_public())], id_key_file=key_file)
    return app, ident


def read_all(app: Any, archive: Any, identities: Sequence[Any] = (), *, catalog: Any = None) -> bytes:
    """An archive's tar as restore reads it (verified as it streams); without ``catalog``
    (restore passes its own), from the packs its manifest names."""
    from backupd.storage.read import open_archive

    out = []
    with open_archive(app.backends, archive, identities, catalog=catalog) as stream:
        while block := stream.read(1 << 20):
            out.append(block)
    return b"".join(out)


@pytest.fixture(params=["filesystem", "s3"])
def kind(request: pytest.FixtureRequest) -> dict[str, object]:
    """The backend kind, as ``dedup_app`` options: a directory, or a bucket on moto."""
    if request.param == "filesystem":
        return {}
    return {"s3": (request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket"))}


@pytest.fixture
def app(tmp_path: Path, sim: Any, db_url: str, kind: dict[str, object]) -> Iterator[Any]:
    a = dedup_app(tmp_path, sim, db_url, **kind)
    yield a
    a.close()


@pytest.fixture
def fs_app(tmp_path: Path, sim: Any, db_url: str) -> Iterator[Any]:
    a = dedup_app(tmp_path, sim, db_url)
    yield a
    a.close()
