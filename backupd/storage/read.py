"""Reading a committed archive back: its manifest checked against the catalog, its stream
decrypted, decompressed and checked against the catalog's sizes and digests as it is read."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from backupd.archive.inspect import Inspection, inspect_tar_stream
from backupd.archive.tar import DEFAULT_LIMITS, Limits
from backupd.backends.base import Backend, Readable
from backupd.catalog.store import Catalog
from backupd.errors import (
    BackupdError,
    ConfigError,
    IntegrityError,
    InvalidInput,
    NotFound,
    StorageNotFound,
    StorageUnavailable,
)
from backupd.model import COMMITTED, Archive
from backupd.storage import layout
from backupd.storage.transfer import UnpackingReader


def inspect_catalog_archive(archive: Archive, backend: Backend, *, limits: Limits = DEFAULT_LIMITS,
                            identities: Sequence[Any] = (), catalog: Catalog | None = None) -> Inspection:
    """Inspect a committed archive from ``backend``, checking it against its manifest (which
    must agree with its key and the catalog: :func:`backupd.storage.read.verified_manifest`).

    The whole object is read, which is what lets its sizes and digests be checked: a mismatch
    raises :class:`~backupd.storage.transfer.DigestMismatch` -- a size at the moment it is passed, so a
    decompression bomb stops there. When the tar cannot be parsed, the rest is still read, so
    that a stored object that does not match the catalog is reported as that (corruption in
    storage) rather than as a malformed archive.
    """
    what = f"archive {archive.id}"
    if archive.state != COMMITTED:
        raise NotFound(f"{what} is {archive.state}, not committed: there is no stored archive to inspect")
    if archive.encryption == "age" and not identities:
        raise InvalidInput(f"{what} is encrypted with age: pass --identity-file with the key it was encrypted "
                           "to")  # fmt: skip
    if archive.compression != "zstd":
        raise InvalidInput(f"{what} has compression {archive.compression!r}; only zstd is known")

    def unreadable(exc: Exception) -> BackupdError:
        return StorageUnavailable(f"reading {archive.key!r} from backend {backend.name!r} failed "
                                  f"({type(exc).__name__}: {exc})")  # fmt: skip

    manifest = verified_manifest(backend, archive)
    with open_verified(backend, archive, manifest, identities,
                       pack_ids=current_packs(catalog, archive, manifest)) as unpacking:
        try:
            return inspect_tar_stream(unpacking, unreadable, source=what, archive=archive.to_json(), limits=limits)
        except IntegrityError as exc:
            raise unpacking.explain(exc) from None


CHUNK = 1 << 20


class VerifiedTar(Protocol):
    """What :func:`open_verified` yields for either format: the tar, verified as it is read
    (the final ``read`` raises instead of ending when anything differs)."""

    @property
    def tar_size(self) -> int: ...

    def read(self, n: int = -1, /) -> bytes: ...

    def explain(self, exc: BackupdError) -> BackupdError: ...



def verified_manifest(backend: Backend, archive: Archive) -> layout.Manifest:
    """The backend's manifest of ``archive``, checked against its key and the catalog row.

    The manifest is what makes an archive exist; a row whose manifest is missing, fails the
    schema, disagrees with its key (:func:`backupd.storage.layout.read_manifest`) or with the row is not
    read any further (:class:`IntegrityError`, naming the archive and the field).
    """
    key = layout.manifest_key(archive.key)
    where = f"{backend.name}:{key}"
    try:
        manifest = layout.read_manifest(backend, key)
    except StorageNotFound:
        raise IntegrityError(
            f"archive {archive.id}: its manifest {where} is missing, so the object is not a committed archive"
        ) from None
    for name in ("archive_id", "key", "tar_sha256", "stored_sha256", "tar_size", "stored_size", "encryption"):
        catalog_value = getattr(archive, "id" if name == "archive_id" else name)
        if catalog_value is not None and getattr(manifest, name) != catalog_value:
            raise IntegrityError(
                f"archive {archive.id}: the catalog and the manifest {where} disagree on {name} "
                f"({catalog_value!r} vs {getattr(manifest, name)!r}); run `backupd verify`"
            )
    return manifest



def current_packs(catalog: Catalog | None, archive: Archive, manifest: layout.Manifest) -> list[str] | None:
    """The packs a deduplicated archive's chunks are in now, as the catalog knows them (a
    repack moves chunks out of the packs its manifest names); None: the manifest's."""
    if catalog is None or manifest.format != "dedup":
        return None
    return catalog.archive_pack_ids(archive.id) or None


@contextlib.contextmanager
def open_archive(backends: Mapping[str, Backend], archive: Archive, identities: Sequence[Any] = (), *,
                 catalog: Catalog | None = None) -> Iterator[VerifiedTar]:
    """The archive's tar as a verified stream (see :class:`~backupd.storage.transfer.UnpackingReader`).

    Digests and sizes come from the manifest after :func:`verified_manifest` checked it against
    its key and the catalog, so a mismatch on either side, a bit flip or a truncation raises
    :class:`~backupd.errors.IntegrityError` naming the archive from the final ``read`` -- or
    from the ``read`` that passes a size.
    An age-encrypted archive needs ``identities`` (:func:`backupd.storage.transfer.load_identities`).
    With ``catalog``, a deduplicated archive's chunks are looked for in the packs the catalog
    says it uses now (:func:`current_packs`).
    """
    if archive.encryption == "age" and not identities:
        raise InvalidInput(
            f"archive {archive.id} is encrypted with age: pass --identity-file with the key it was encrypted "
            "to (or follow the README's 'restore without backupd' steps with `age -d -i IDENTITY`)"
        )
    backend = backends.get(archive.backend)
    if backend is None:
        known = ", ".join(sorted(backends)) or "none configured"
        raise ConfigError(f"archive {archive.id} is in backend {archive.backend!r}, which is not in the config "
                          f"(configured: {known})")
    manifest = verified_manifest(backend, archive)
    with open_verified(backend, archive, manifest, identities,
                       pack_ids=current_packs(catalog, archive, manifest)) as reader:
        yield reader



@contextlib.contextmanager
def open_verified(backend: Backend, archive: Archive, manifest: layout.Manifest,
                  identities: Sequence[Any] = (), *, stored_only: bool = False,
                  pack_ids: Sequence[str] | None = None) -> Iterator[VerifiedTar]:
    """The object of ``archive`` as a stream checked against ``manifest``, which
    :func:`verified_manifest` returned; :class:`StorageNotFound` when the object is gone.

    This is the one way a committed archive is opened for reading (verify, restore to every
    destination, inspect). With ``stored_only`` (an encrypted archive verified without its
    identity) the stream is the stored bytes, of which only the size and SHA-256 are checked.
    A deduplicated archive's tar is rebuilt from its recipe and packs, verified alike (its
    ``stored_only`` check is :func:`backupd.storage.dedup.read.verify_stored`'s); ``pack_ids``:
    where its chunks are now (:func:`current_packs`), by default the packs its manifest names.
    """
    if manifest.format == "dedup":
        from backupd.storage.dedup.read import open_recipe

        rebuilt = open_recipe(backend, archive.key, what=f"archive {archive.id} ({backend.name}:{archive.key})",
                              tar_sha256=manifest.tar_sha256, tar_size=manifest.tar_size,
                              recipe_sha256=manifest.stored_sha256, recipe_size=manifest.recipe_size,
                              pack_ids=manifest.packs if pack_ids is None else pack_ids, identities=identities)
        try:
            yield rebuilt
        finally:
            rebuilt.close()
        return
    stream = backend.open(archive.key)
    try:
        yield UnpackingReader(
            stream, what=f"archive {archive.id} ({backend.name}:{archive.key})",
            tar_sha256=manifest.tar_sha256, stored_sha256=manifest.stored_sha256,
            tar_size=manifest.tar_size, stored_size=manifest.stored_size,
            encryption=manifest.encryption, identities=identities, stored_only=stored_only,
        )
    finally:
        stream.close()



def drain(source: Readable) -> int:
    """Read ``source`` to its end (which is where verifying readers check); returns the bytes."""
    total = 0
    while data := source.read(CHUNK):
        total += len(data)
    return total

