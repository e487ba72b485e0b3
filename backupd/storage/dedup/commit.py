"""The commit protocol of the deduplicated format: packs, then the recipe, then (the caller)
the manifest and the catalog row.

:func:`ship` streams a node-local tar through :class:`~backupd.storage.dedup.ArchiveWriter`:
chunks the catalog says a ``stored`` pack holds are referenced, the others are packed and put
(create-only; a pack's name is its SHA-256); each pack is recorded in the catalog the moment
its put returns, so concurrent writers may count on it. Then the recipe is put under the
archive's key. The caller writes the manifest (which names the recipe's SHA-256 and the packs
it uses) and commits the row with :meth:`~backupd.catalog.store.Catalog.commit_dedup_archive`,
which refuses a pack that garbage collection is deleting, and records which chunks of each
pack the recipe uses (:attr:`Shipped.used`: what lets garbage collection repack mostly-dead
packs). Every chunk id a recipe names -- pages, lists, other chunks -- is either asked of
``known()`` (which answers its pack and its position there) or new in this archive (in one
of its new packs, all of whose chunks it uses).

A crash before the manifest leaves packs no archive uses: garbage collection removes them
once they are older than its grace period (:mod:`backupd.storage.dedup.gc`), like the objects
of interrupted full-format commits.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from backupd.backends.base import Backend, Readable
from backupd.catalog import liveness
from backupd.catalog.store import Catalog
from backupd.errors import IntegrityError, ObjectExists
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.ids import ChunkIds
from backupd.storage.dedup.recipe import ArchiveWriter, PackInfo

log = structlog.get_logger("backupd.dedup")

ROOT = "dedup/"
KEYS_DIR = f"{ROOT}keys/"


def id_key_copy_key(key_check: str) -> str:
    """Where the id key is kept, encrypted to the backend's recipients, for restores."""
    return f"{KEYS_DIR}{key_check}.age"


@dataclass(frozen=True)
class Shipped:
    """What :func:`ship` stored: the manifest's figures of a deduplicated archive."""

    tar_size: int
    tar_sha256: str
    recipe_sha256: str
    recipe_size: int
    new_bytes: int  # the new packs and the recipe: what this archive added to the backend
    packs: list[str]  # ids of every pack the recipe uses
    new_packs: int
    #: pack id -> which of its chunks the recipe uses (a mask of positions:
    #: :mod:`backupd.catalog.liveness`); packs whose positions the catalog did not know are absent
    used: dict[str, int]


def store_id_key(backend: Backend, ids: ChunkIds, recipients: Sequence[Any]) -> None:
    """Put the id key, encrypted to ``recipients``, beside the packs (once; create-only), so
    that whoever holds an age identity can check keyed chunk ids without the daemon's secret."""
    if ids.key is None or ids.key_check is None:
        return
    import pyrage

    key = id_key_copy_key(ids.key_check)
    if backend.stat(key) is not None:
        return
    try:
        backend.put_bytes(key, pyrage.encrypt(ids.key.hex().encode() + b"\n", list(recipients)))
    except ObjectExists:
        pass


def _check_reused_packs(backend: Backend, catalog: Catalog, pack_ids: set[str], what: str) -> None:
    """The catalog's packs this archive counts on must still be in the backend: a bucket
    emptied or a pack deleted behind backupd's back would otherwise be referenced by every
    later checkpoint. A missing one is never offered again and this archive fails (the next
    checkpoint stores those chunks anew). One HEAD request per pack, eight at a time."""
    keys = {pack_id: packs.pack_key(pack_id, ROOT) for pack_id in pack_ids}
    with ThreadPoolExecutor(8, thread_name_prefix="dedup-stat") as pool:
        found = dict(zip(keys, pool.map(backend.stat, keys.values()), strict=True))
    missing = sorted(pack_id for pack_id, info in found.items() if info is None)
    if missing:
        catalog.mark_packs_missing(backend.name, missing)
        log.error("dedup_packs_missing", backend=backend.name, packs=missing[:20], count=len(missing))
        raise IntegrityError(f"{what}: {len(missing)} pack(s) the catalog holds are gone from backend "
                             f"{backend.name!r} (e.g. {keys[missing[0]]}); they are no longer used: the next "
                             "checkpoint stores their chunks again (`backupd verify` finds the archives that "
                             "used them)")


def ship(backend: Backend, catalog: Catalog, raw: Readable, key: str, *, ids: ChunkIds,
         recipients: Sequence[Any] = (), what: str, level: int | None = None) -> Shipped:
    """Store the tar read from ``raw`` as new packs and the recipe at ``key``. Raises a
    BackupdError with nothing under ``key`` (packs already put stay, for garbage collection)."""
    store_id_key(backend, ids, recipients)
    used: set[str] = set()
    bits: dict[str, bytearray] = {}  # pack id -> a bit per chunk of it the recipe reuses
    unplaced: set[str] = set()  # packs with a chunk whose position the catalog does not know

    lock = threading.Lock()  # the writer asks from its worker threads

    def known(chunk_ids: list[bytes]) -> set[bytes]:
        found = catalog.known_places(backend.name, chunk_ids)
        with lock:
            for pack_id, seq in found.values():
                used.add(pack_id)
                if seq is None:
                    unplaced.add(pack_id)
                else:
                    liveness.add(bits.setdefault(pack_id, bytearray()), seq)
        return set(found)

    def stored(info: PackInfo, chunk_ids: list[bytes]) -> None:
        catalog.record_pack(backend.name, info.pack_id, info.key, stored_size=info.stored_size,
                            raw_size=info.raw_size, chunk_ids=chunk_ids)

    options: dict[str, Any] = {} if level is None else {"level": level}
    writer = ArchiveWriter(backend, known=known, ids=ids, recipients=recipients, root=ROOT, on_stored=stored,
                           **options)
    result = writer.write(raw, what=what)
    try:
        _check_reused_packs(backend, catalog, used - {p.pack_id for p in result.packs}, what)
        digest = hashlib.sha256()
        while block := result.recipe.read(1 << 20):
            digest.update(block)
        result.recipe.seek(0)  # a seekable source: the retry wrapper can rewind it
        backend.put(key, result.recipe)
    finally:
        result.recipe.close()
    used.update(p.pack_id for p in result.packs)
    masks = {pack_id: int.from_bytes(b, "little") for pack_id, b in bits.items() if pack_id not in unplaced}
    # every chunk of a new pack is one this recipe uses (it was new in this archive)
    masks.update({p.pack_id: liveness.full(p.chunks) for p in result.packs})
    log.info("dedup_archive_stored", key=key, tar_size=result.tar_size, new_packs=len(result.packs),
             new_chunks=result.new_chunks, chunk_refs=result.chunk_refs, uploaded=result.uploaded_bytes)
    return Shipped(tar_size=result.tar_size, tar_sha256=result.tar_sha256, recipe_sha256=digest.hexdigest(),
                   recipe_size=result.recipe_size, new_bytes=result.uploaded_bytes, packs=sorted(used),
                   new_packs=len(result.packs), used=masks)
