"""The restore workflow: choose a committed archive, stream it back verified, and write it to one
destination -- a tar file, an OCI image layout, or a registry (plus, optionally, a pod manifest
that runs the pushed image).

:func:`restore` is the one entry point; what it returns (:class:`FileRestored`,
:class:`LayoutWritten`, :class:`ImagePushed`) is what happened, for the caller to print. Every
destination gets only a tar whose members pass the rules verify and inspect apply, checked
against the catalog and the archive's manifest while it streams: a mismatch or a hostile member
raises (:class:`~backupd.errors.IntegrityError`, :class:`~backupd.errors.UnsafeArchive`) and
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backupd.archive.metadata import CheckpointInfo, checkpoint_info, metadata_scanner
from backupd.archive.tar import ScanningReader
from backupd.backends.base import Backend, Readable
from backupd.catalog.store import Catalog
from backupd.model import Archive
from backupd.restore import oci, podmanifest
from backupd.restore.file import restore_to_file
from backupd.restore.progress import Progress, ProgressReader
from backupd.restore.registry import ImageRef, RegistryClient, push_checkpoint_image
from backupd.restore.select import select_archive
from backupd.storage.read import open_archive, verified_manifest

# -- what to restore ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveQuery:
    """Which archive: ``ref`` (an id or unique prefix), or with ``latest`` the newest committed
    archive of ``namespace`` + ``workload`` + ``container`` (+ ``pod``); see
    :func:`backupd.restore.select.select_archive`, which also states how filters given with a
    ``ref`` must agree with it."""

    ref: str | None = None
    latest: bool = False
    namespace: str | None = None
    workload: str | None = None
    container: str | None = None
    pod: str | None = None

    def select(self, catalog: Catalog) -> Archive:
        return select_archive(catalog, self.ref, latest=self.latest, namespace=self.namespace,
                              workload=self.workload, container=self.container, pod=self.pod)


# -- where to -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToFile:
    """The checkpoint tar as a file, written atomically with mode 0600 (``overwrite``: replace
    an existing one)."""

    path: str
    overwrite: bool = False


@dataclass(frozen=True)
class ToOciLayout:
    """A checkpoint image as an OCI image layout in ``path`` (which must not exist or be empty),
    tagged with the archive id."""

    path: str


@dataclass(frozen=True)
class PodManifest:
    """A Pod (``as_workload``: the archive's controller) that runs the pushed image, written to
    ``path`` like a restored tar. The labels recorded in the archive's manifest come first,
    ``labels`` override them; ``pin_node`` pins it to the node the checkpoint was taken on,
    ``node_name`` to another."""

    path: str
    as_workload: bool = False
    node_name: str | None = None
    pin_node: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    pod_name: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ToRegistry:
    """A checkpoint image pushed to ``ref`` (its tag defaults to the archive id).

    ``insecure`` accepts plain HTTP or an unverified certificate (test registries only);
    ``chunk_size`` > 0 uploads the layer in PATCH chunks; ``mount_from`` lists repositories of
    the same registry that may already hold the layer.
    """

    ref: ImageRef
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False
    ca_file: str | None = None
    chunk_size: int = 0
    mount_from: Sequence[str] = ()
    pod_manifest: PodManifest | None = None


Destination = ToFile | ToOciLayout | ToRegistry


# -- what happened ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRestored:
    archive: Archive
    path: Path  # absolute
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"archive": self.archive.to_json(), "to": str(self.path), "bytes": self.bytes}


@dataclass(frozen=True)
class LayoutWritten:
    archive: Archive
    path: Path  # absolute
    manifest_digest: str

    @property
    def ref_name(self) -> str:
        """The layout's tag: ``oci:PATH:REF_NAME`` names the image for skopeo and friends."""
        return self.archive.id

    def to_json(self) -> dict[str, Any]:
        return {"archive": self.archive.to_json(), "oci_layout": str(self.path),
                "manifest_digest": self.manifest_digest, "ref_name": self.ref_name}


@dataclass(frozen=True)
class ImagePushed:
    archive: Archive
    image: str  # registry/repository:tag
    manifest_digest: str
    pinned: str  # registry/repository@digest: what a pod should run
    layer: str  # uploaded | exists | mounted
    pod_manifest: Path | None = None  # absolute

    def to_json(self) -> dict[str, Any]:
        out = {"archive": self.archive.to_json(), "image": self.image, "manifest_digest": self.manifest_digest,
               "pinned": self.pinned, "layer": self.layer}
        if self.pod_manifest is not None:
            out["pod_manifest"] = str(self.pod_manifest)
        return out


Restored = FileRestored | LayoutWritten | ImagePushed

#: makes the progress of one archive's transfer (its expected size is ``archive.tar_size``)
ProgressFactory = Callable[[Archive], Progress]


def restore(
    catalog: Catalog,
    backends: Mapping[str, Backend],
    query: ArchiveQuery,
    destination: Destination,
    *,
    identities: Sequence[Any] = (),
    progress: ProgressFactory | None = None,
) -> Restored:
    """Restore the archive ``query`` selects to ``destination``.

    The archive is streamed once out of its backend, decrypted with ``identities`` (needed for
    age-encrypted archives), checked against the catalog and its manifest (SHA-256 and size)
    and its tar members scanned while it passes; the checkpoint's own metadata (for image
    annotations and pod manifests) is read from the same pass. ``progress`` is told about every
    byte handed to the destination and finished when the transfer ends, well or not.
    """
    catalog.check_schema()
    archive = query.select(catalog)
    tracker = progress(archive) if progress is not None else None
    with open_archive(backends, archive, identities, catalog=catalog) as verified, \
            tracker or contextlib.nullcontext():
        scanner = metadata_scanner(archive)
        layer: Readable = ScanningReader(verified, scanner, explain=verified.explain)
        if tracker is not None:
            layer = ProgressReader(layer, tracker)
        if isinstance(destination, ToFile):
            written = restore_to_file(layer, destination.path, overwrite=destination.overwrite)
            return FileRestored(archive, Path(destination.path).absolute(), written)

        # finish() runs inside write_layout/push, once the layer has streamed; the pod manifest
        # below needs the same CheckpointInfo, so finish() leaves it here
        read_info: list[CheckpointInfo] = []

        def finish() -> oci.CheckpointImage:
            """The image parts, once the layer has passed (and with it the metadata files)."""
            read_info.append(checkpoint_info(scanner.files, archive))
            return oci.build_image(archive, read_info[0])

        if isinstance(destination, ToOciLayout):
            built = oci.write_layout(destination.path, archive, layer, finish, ref_name=archive.id)
            return LayoutWritten(archive, Path(destination.path).absolute(), built.manifest_descriptor.digest)

        pushed = _push(archive, destination, layer, finish)
        if destination.pod_manifest is None:
            return pushed
        path = _write_pod_manifest(backends[archive.backend], archive, read_info[0], pushed.pinned,
                                   destination.pod_manifest)
        return ImagePushed(archive, pushed.image, pushed.manifest_digest, pushed.pinned, pushed.layer, path)


def _push(archive: Archive, to: ToRegistry, layer: Readable, finish: Callable[[], oci.CheckpointImage]) -> ImagePushed:
    ref = to.ref.with_tag(to.ref.tag or archive.id)
    with RegistryClient(ref.api_host, username=to.username, password=to.password, insecure=to.insecure,
                        ca_file=to.ca_file) as client:
        pushed = push_checkpoint_image(client, ref, archive, layer, finish, mount_from=to.mount_from,
                                       chunk_size=to.chunk_size)
    return ImagePushed(archive, str(pushed.ref), pushed.manifest_digest, pushed.pinned, pushed.layer)


def _write_pod_manifest(backend: Backend, archive: Archive, info: CheckpointInfo, image: str,
                        wanted: PodManifest) -> Path:
    # The pod's own labels: recorded in the manifest from the kubelet's /pods (the archive
    # itself carries only the kubelet's io.kubernetes.* labels).
    recorded = verified_manifest(backend, archive).labels
    text = podmanifest.render(
        archive, info, image, as_workload=wanted.as_workload,
        node_name=archive.node if wanted.pin_node else wanted.node_name,
        extra_labels={**recorded, **wanted.labels}, pod_name=wanted.pod_name,
    )
    restore_to_file(io.BytesIO(text.encode()), wanted.path, overwrite=wanted.overwrite)
    return Path(wanted.path).absolute()
