"""``catalog rebuild`` for the deduplicated format: pack rows from the packs themselves.

Packs are self-describing: each one's index (its trailer) lists its chunks, so the chunk ->
pack map is rebuilt by reading them. The bucket is not trusted: a pack's chunks are offered to
writers again only once every one of them matched its id (a planted pack whose index claims
common pages could otherwise make every later checkpoint unrestorable). An encrypted pack
needs the age identity (and the id key, read from its copy in the backend); without them the
pack is still recorded -- restores find it through the manifests that name it, garbage
collection keeps it while an archive uses it -- but its chunks are not offered to writers
until a rebuild with the identity.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from backupd.backends.base import Backend
from backupd.catalog.store import Catalog
from backupd.errors import IntegrityError, InvalidInput
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.check import chunks_match, id_schemes
from backupd.storage.dedup.commit import ROOT

log = structlog.get_logger("backupd.dedup")


@dataclass
class PackRebuild:
    added: list[str] = field(default_factory=list)  # pack ids
    without_index: list[str] = field(default_factory=list)  # encrypted, no identity: chunks not mapped
    corrupt: list[dict[str, str]] = field(default_factory=list)  # key, error


def rebuild_packs(catalog: Catalog, backend: Backend, *, identities: Sequence[Any] = ()) -> PackRebuild:
    """Record every pack of ``backend`` the catalog lacks, with its chunks when its index can
    be read. A pack that does not match its name or whose index is corrupt is reported, not
    recorded."""
    result = PackRebuild()
    known = {p.pack_id for p in catalog.list_packs(backend.name) if p.chunk_count or not identities}
    schemes = id_schemes(backend, identities)
    for info in backend.list(f"{ROOT}{packs.PACKS_DIR}"):
        if not info.key.endswith(".pack"):
            continue
        pack_id = info.key.rsplit("/", 1)[-1].removesuffix(".pack")
        if pack_id in known or info.key != packs.pack_key(pack_id, ROOT):
            continue
        chunk_ids: list[bytes] = []
        raw_size = 0
        try:
            with tempfile.TemporaryDirectory(prefix="backupd-rebuild-") as directory:
                pack = packs.PackFile(backend, info.key, pack_id, directory=directory, identities=identities)
                try:
                    if not chunks_match(pack, schemes):
                        raise IntegrityError(f"pack {info.key!r}: a chunk does not match its id")
                    chunk_ids = pack.index.order
                    raw_size = sum(f.raw_length for f in pack.index.frames)
                finally:
                    pack.close()
        except InvalidInput:
            result.without_index.append(pack_id)
        except IntegrityError as exc:
            result.corrupt.append({"key": info.key, "error": str(exc)})
            continue
        catalog.record_pack(backend.name, pack_id, info.key, stored_size=info.size, raw_size=raw_size,
                            chunk_ids=chunk_ids, created_at=info.modified)
        result.added.append(pack_id)
    if result.added or result.corrupt:
        log.info("packs_rebuilt", backend=backend.name, added=len(result.added),
                 without_index=len(result.without_index), corrupt=len(result.corrupt))
    return result
