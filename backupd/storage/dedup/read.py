"""Reading a deduplicated archive back: its recipe checked against the manifest, its tar
rebuilt from packs and checked chunk by chunk, then whole against the manifest's SHA-256.

:func:`open_recipe` gives the same kind of verified stream as the full format's
:class:`~backupd.storage.transfer.UnpackingReader` (``read``, ``explain``, ``tar_size``), so
restore, OCI images, registry pushes, inspect and verify read both formats alike.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any, BinaryIO

import zstandard

from backupd.backends.base import Backend
from backupd.errors import BackupdError, IntegrityError, InvalidInput, StorageNotFound
from backupd.storage.dedup import moved
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.commit import ROOT, id_key_copy_key
from backupd.storage.dedup.ids import KEY_SIZE, ChunkIds
from backupd.storage.dedup.recipe import (
    MAGIC,
    MAX_JSON,
    MAX_RECIPE_STORED,
    ArchiveReader,
    PackStore,
    read_uvarint,
    spool_file,
)


def fetch_recipe(backend: Backend, key: str, *, sha256: str, size: int | None, what: str) -> BinaryIO:
    """The stored recipe at ``key``, spooled, checked against the manifest's SHA-256 and size."""
    spool = spool_file(None)
    try:
        digest, got, _ = packs.read_hashed(
            backend, key, spool, limit=size if size is not None else MAX_RECIPE_STORED,
            too_long=f"{what}: the recipe is longer than the manifest's {size} bytes")
        if (size is not None and got != size) or digest != sha256:
            raise IntegrityError(f"{what}: the recipe does not match its manifest (size {got} vs {size}, or its "
                                 "SHA-256 differs)")
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def _plain_header(stored: BinaryIO, identities: Sequence[Any], what: str) -> dict[str, Any]:
    """The recipe's header (its id scheme and key check), read from the start of the recipe."""
    head = stored.read(len(packs.AGE_MAGIC))
    stored.seek(0)
    source: Any = stored
    if head == packs.AGE_MAGIC:
        if not identities:
            raise InvalidInput(f"{what} is encrypted with age: pass --identity-file with the key it was encrypted to")
        import pyrage

        try:
            source = io.BytesIO(pyrage.decrypt(stored.read(), list(identities)))
        except Exception as exc:
            raise IntegrityError(f"{what}: age could not decrypt the recipe: {exc}") from None
        finally:
            stored.seek(0)
    try:
        z = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=False)
        if z.read(len(MAGIC)) != MAGIC:
            raise IntegrityError(f"{what}: not a recipe, or a newer recipe version")
        n = read_uvarint(z, what)
        if n > MAX_JSON:
            raise IntegrityError(f"{what}: corrupt recipe header")
        header = json.loads(z.read(n))
    except (zstandard.ZstdError, ValueError) as exc:
        raise IntegrityError(f"{what}: corrupt recipe ({exc})") from None
    finally:
        stored.seek(0)
    if not isinstance(header, dict):
        raise IntegrityError(f"{what}: corrupt recipe header")
    return header


def chunk_ids_for(backend: Backend, header: dict[str, Any], identities: Sequence[Any], what: str) -> ChunkIds:
    """The chunk ids a recipe was written with: plain SHA-256, or HMAC keyed with the backend's
    id key, read from its copy beside the packs (encrypted to the backend's recipients)."""
    if header.get("id_scheme") != "hmac-sha256":
        return ChunkIds()
    check = header.get("id_key_check")
    if not isinstance(check, str) or len(check) != 16:
        raise IntegrityError(f"{what}: corrupt recipe header (id_key_check)")
    if not identities:
        raise InvalidInput(f"{what} uses keyed chunk ids: pass --identity-file to read the id key")
    import pyrage

    key_key = id_key_copy_key(check)
    try:
        stored = backend.read_bytes(key_key, limit=4096)
    except StorageNotFound:
        raise IntegrityError(f"{what}: the id key it was written with ({key_key}) is missing from backend "
                             f"{backend.name!r}") from None
    try:
        text = pyrage.decrypt(stored, list(identities)).decode().strip()
        key = bytes.fromhex(text)
    except Exception:
        raise IntegrityError(f"{what}: the id key copy {key_key} cannot be decrypted with the identity given") \
            from None
    if len(key) != KEY_SIZE:
        raise IntegrityError(f"{what}: the id key copy {key_key} is not a {KEY_SIZE}-byte key")
    ids = ChunkIds.keyed(key)
    if ids.key_check != check:
        raise IntegrityError(f"{what}: the id key copy {key_key} is not the key it is named after")
    return ids


class VerifiedRecipeReader:
    """The tar of a deduplicated archive as a verified stream (the interface of
    :class:`~backupd.storage.transfer.UnpackingReader`)."""

    def __init__(self, reader: ArchiveReader, chunks: PackStore, what: str) -> None:
        self._reader = reader
        self._chunks = chunks
        self.what = what

    @property
    def tar_size(self) -> int:
        return self._reader.size

    def read(self, n: int = -1) -> bytes:
        try:
            return self._reader.read(n)
        except StorageNotFound as exc:
            raise IntegrityError(f"{self.what}: a pack it uses is gone ({exc})") from None

    def explain(self, exc: BackupdError) -> BackupdError:
        """A malformed tar from a corrupt store is reported as the corruption: read the rest."""
        try:
            while self.read(1 << 20):
                pass
        except IntegrityError as stored:
            return stored
        except BackupdError:
            pass
        return exc

    def close(self) -> None:
        self._reader.close()
        self._chunks.close()


def open_recipe(backend: Backend, key: str, *, what: str, tar_sha256: str, tar_size: int, recipe_sha256: str,
                recipe_size: int | None, pack_ids: Sequence[str], identities: Sequence[Any] = ()) \
        -> VerifiedRecipeReader:
    """The verified tar stream of the recipe at ``key`` (close it when done); its chunks are
    looked up in ``pack_ids`` first (the catalog's packs of the archive, or its manifest's:
    :class:`~backupd.storage.dedup.recipe.PackStore` says where else)."""
    stored = fetch_recipe(backend, key, sha256=recipe_sha256, size=recipe_size, what=what)
    try:
        ids = chunk_ids_for(backend, _plain_header(stored, identities, what), identities, what)
        chunks = PackStore(backend, identities=identities, root=ROOT,
                           pack_keys=[packs.pack_key(p, ROOT) for p in pack_ids])
        try:
            reader = ArchiveReader(stored, chunks, ids=ids, identities=identities, what=what, tar_sha256=tar_sha256,
                                   tar_size=tar_size)
        except BaseException:
            chunks.close()
            raise
    finally:
        stored.close()
    return VerifiedRecipeReader(reader, chunks, what)


def verify_stored(backend: Backend, key: str, *, what: str, recipe_sha256: str, recipe_size: int | None,
                  pack_ids: Sequence[str]) -> int:
    """Without an identity: the stored recipe against the manifest, and every pack the archive
    uses (``pack_ids``: the catalog's, or those its manifest names -- a missing one replaced
    by the packs its repack notes name: :mod:`backupd.storage.dedup.moved`) against its name
    (the SHA-256 of its stored bytes). Returns the bytes read."""
    fetch_recipe(backend, key, sha256=recipe_sha256, size=recipe_size, what=what).close()
    total = recipe_size or 0
    current = moved.follow(pack_ids, present=lambda p: backend.stat(packs.pack_key(p, ROOT)) is not None,
                           notes=lambda p: moved.notes_of(backend, p, ROOT))
    for pack_id in current:
        total += check_pack_name(backend, packs.pack_key(pack_id, ROOT), pack_id, what)
    return total


def check_pack_name(backend: Backend, key: str, pack_id: str, what: str) -> int:
    """Read a stored pack whole and check it against its name; returns its size."""
    try:
        digest, size, _ = packs.read_hashed(backend, key, None, limit=packs.MAX_PACK_SIZE,
                                            too_long=f"{what}: pack {key} is larger than any pack")
    except StorageNotFound:
        raise IntegrityError(f"{what}: pack {key} is missing") from None
    if digest != pack_id:
        raise IntegrityError(f"{what}: pack {key} does not match its name (SHA-256 differs)")
    return size
