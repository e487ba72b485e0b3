"""``verify`` of a deduplicated backend's packs, beyond what reading its archives checks.

Reading an archive back checks every pack it uses by its name, its index and every chunk by
its id (:mod:`backupd.storage.dedup.read`). This checks the packs themselves, as the catalog
records them: a random sample of them, or all with ``--read-data`` -- each read whole and
checked against its name (the SHA-256 of its stored bytes) and, when it can be decrypted, its
index against the catalog's chunk map; with ``--read-data`` every frame is decompressed and
every chunk checked against its id too.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backupd.backends.base import Backend
from backupd.catalog.store import PACK_DELETING, Catalog
from backupd.errors import BackupdError, IntegrityError, InvalidInput, StorageNotFound
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.commit import KEYS_DIR
from backupd.storage.dedup.ids import KEY_SIZE, ChunkIds

DEFAULT_SAMPLE = 10


@dataclass
class PackCheck:
    backend: str
    checked: int = 0
    bytes_read: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)  # key, detail

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "bytes_read": self.bytes_read, "problems": self.problems}


def id_schemes(backend: Backend, identities: Sequence[Any]) -> list[ChunkIds]:
    """The id schemes the backend's chunks may use: SHA-256, and each id key whose copy the
    identities decrypt."""
    schemes = [ChunkIds()]
    if not identities:
        return schemes
    import pyrage

    try:
        copies = [o.key for o in backend.list(KEYS_DIR)]
    except StorageNotFound:
        copies = []
    for key in copies:
        try:
            raw = bytes.fromhex(pyrage.decrypt(backend.read_bytes(key, limit=4096), list(identities)).decode().strip())
        except Exception:
            continue
        if len(raw) == KEY_SIZE:
            schemes.append(ChunkIds.keyed(raw))
    return schemes


def check_packs(catalog: Catalog, backend: Backend, *, read_data: bool = False, sample: int = DEFAULT_SAMPLE,
                identities: Sequence[Any] = (), rng: random.Random | None = None) -> PackCheck:
    result = PackCheck(backend.name)
    recorded = [p for p in catalog.list_packs(backend.name) if p.state != PACK_DELETING]
    chosen = recorded if read_data or len(recorded) <= sample else (rng or random.Random()).sample(recorded, sample)
    schemes = id_schemes(backend, identities) if read_data else []
    for p in chosen:
        result.checked += 1
        result.bytes_read += p.stored_size
        try:
            _check_one(catalog, backend, p.key, p.pack_id, identities, schemes)
        except InvalidInput:
            continue  # encrypted without the identity: checked by its name only
        except BackupdError as exc:
            result.problems.append({"key": p.key, "detail": str(exc)})
    return result


def _check_one(catalog: Catalog, backend: Backend, key: str, pack_id: str, identities: Sequence[Any],
               schemes: list[ChunkIds]) -> None:
    what = f"pack {key!r} in backend {backend.name!r}"
    with tempfile.TemporaryDirectory(prefix="backupd-verify-") as directory:
        try:
            pack = packs.PackFile(backend, key, pack_id, directory=directory, identities=identities)
        except StorageNotFound:
            raise IntegrityError(f"{what} is in the catalog but not in the backend") from None
        try:
            if set(pack.index.order) != set(catalog.pack_chunk_ids(backend.name, pack_id)):
                raise IntegrityError(f"{what}: its index and the catalog's chunk map disagree")
            if schemes and not chunks_match(pack, schemes):
                raise IntegrityError(f"{what}: a chunk does not match its id (under every id key known)")
        finally:
            pack.close()


def chunks_match(pack: packs.PackFile, schemes: Sequence[ChunkIds]) -> bool:
    """Whether every chunk of ``pack`` matches its id under one of ``schemes`` (frames are
    decompressed one at a time)."""
    by_frame: dict[int, list[tuple[bytes, packs.Location]]] = {}
    for chunk_id, loc in pack.index.chunks.items():
        by_frame.setdefault(loc.frame, []).append((chunk_id, loc))
    remaining = list(schemes)
    for n, members in sorted(by_frame.items()):
        frame = pack.frame(n)
        remaining = [ids for ids in remaining
                     if all(ids(frame[loc.offset:loc.offset + loc.length]) == cid for cid, loc in members)]
        if not remaining:
            return False
    return True
