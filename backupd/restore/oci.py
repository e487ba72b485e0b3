"""Checkpoint images: the OCI image CRI-O (and containerd 2.1-2.3) restore a container from.

The image is what ``buildah from scratch; buildah add <tar> /; buildah config --annotation
io.kubernetes.cri-o.annotations.checkpoint.name=<container>`` makes (reference §3.1), built
without buildah:

* **one layer, the checkpoint tar itself**, media type ``application/vnd.oci.image.layer.v1.tar``
  (uncompressed). Unpacked at ``/`` it is exactly the archive's entries, as CRI-O expects. Its
  digest -- and the config's ``rootfs.diff_ids[0]`` -- is the SHA-256 of the tar, which the
  catalog already has, so the layer streams out of the backend in one pass with its digest
  known up front, verified as it streams, and byte-identical to the tar the kubelet wrote.

  *Why not gzip (or zstd)?* A compressed layer's digest is only known after compressing, so
  it would need a second pass or a chunked upload finished blind, and it would spend CPU
  re-compressing gigabytes of memory pages at the worst moment. Registries and both runtimes
  take uncompressed layers; the price is registry space for what is a short-lived DR
  artefact. Uncompressed is the only format offered.
* **the annotations of both families** on the manifest (where CRI-O and containerd look), on
  the OCI layout's index descriptor, and as ``config.Labels`` (what ``skopeo inspect`` and
  image tooling show): ``io.kubernetes.cri-o.annotations.checkpoint.name`` -- the key CRI-O
  checks -- and checkpointctl's ``org.criu.checkpoint.*`` keys, ``container.name`` being the key
  containerd 2.1-2.3 checks.

JSON is serialised canonically (sorted keys, no spaces) and ``created`` is the checkpoint time,
so the same archive always gives the same manifest digest: a second push is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from backupd.archive.metadata import CheckpointInfo
from backupd.backends.base import Readable
from backupd.backends.filesystem import translate_os_error
from backupd.durable import new_file
from backupd.errors import IntegrityError, InvalidInput
from backupd.model import Archive

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

CRIO_CHECKPOINT_NAME = "io.kubernetes.cri-o.annotations.checkpoint.name"
CRIU_PREFIX = "org.criu.checkpoint."
REF_NAME = "org.opencontainers.image.ref.name"

CHUNK = 1 << 20
_HOST_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @property
    def hex(self) -> str:
        return self.digest.partition(":")[2]


@dataclass(frozen=True)
class CheckpointImage:
    """The three JSON/blob parts of a checkpoint image besides its layer."""

    layer: Descriptor
    config: bytes
    config_descriptor: Descriptor
    manifest: bytes
    manifest_descriptor: Descriptor
    annotations: dict[str, str]


def layer_descriptor(archive: Archive) -> Descriptor:
    """The layer: the archive's tar, digest and size straight from the catalog."""
    if not archive.tar_sha256 or archive.tar_size is None:
        raise IntegrityError(f"archive {archive.id} has no tar digest or size in the catalog; run `backupd verify`")
    return Descriptor(MEDIA_LAYER, f"sha256:{archive.tar_sha256}", archive.tar_size)


def checkpoint_annotations(archive: Archive, info: CheckpointInfo) -> dict[str, str]:
    """Both annotation families (reference §3.1, §3.2), plus where the image came from."""
    criu = {
        "container.name": info.container,
        "engine.name": info.engine if info.engine != "unknown" else "",
        "pod.name": info.pod,
        "pod.namespace": info.namespace,
        "pod.uid": info.pod_uid,
        "rootfsImageName": info.rootfs_image_name,
        "rootfsImageUserRequested": info.rootfs_image,
        "rootfsImageID": info.rootfs_image_ref,
        "rootfsImageSha": info.rootfs_image_digest,
        "runtime.name": info.runtime,
    }
    out = {CRIO_CHECKPOINT_NAME: info.container}
    crio_informational = {
        "io.kubernetes.cri-o.annotations.checkpoint.rootfsImageName": info.rootfs_image_name,
        "io.kubernetes.cri-o.annotations.checkpoint.rootfsImageID": info.rootfs_image_ref,
    }
    out.update({k: v for k, v in crio_informational.items() if v})
    out.update({CRIU_PREFIX + k: v for k, v in criu.items() if v})
    out["org.opencontainers.image.created"] = _rfc3339(archive)
    out["org.opencontainers.image.description"] = (
        f"checkpoint of container {info.container} of pod {info.namespace}/{info.pod}"
    )
    out["io.backupd.archive.id"] = archive.id
    out["io.backupd.archive.workload"] = archive.workload
    out["io.backupd.archive.node"] = archive.node
    return out


def _rfc3339(archive: Archive) -> str:
    return archive.checkpoint_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_arch() -> str:
    machine = platform.machine().lower()
    return _HOST_GOARCH.get(machine, machine)


def build_image(archive: Archive, info: CheckpointInfo) -> CheckpointImage:
    """Config and manifest of the checkpoint image of ``archive`` (pure; deterministic)."""
    layer = layer_descriptor(archive)
    annotations = checkpoint_annotations(archive, info)
    created = _rfc3339(archive)
    config = canonical_json({
        "created": created,
        "architecture": info.arch or host_arch(),
        "os": "linux",
        "config": {"Labels": annotations},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "history": [{
            "created": created,
            "created_by": f"backupd restore {archive.id} (checkpoint archive added at /)",
            "comment": annotations["org.opencontainers.image.description"],
        }],
    })  # fmt: skip
    config_descriptor = Descriptor(MEDIA_CONFIG, sha256_digest(config), len(config))
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_descriptor.to_json(),
        "layers": [layer.to_json()],
        "annotations": annotations,
    })  # fmt: skip
    manifest_descriptor = Descriptor(MEDIA_MANIFEST, sha256_digest(manifest), len(manifest))
    return CheckpointImage(layer, config, config_descriptor, manifest, manifest_descriptor, annotations)


def write_layout(
    directory: str | os.PathLike[str],
    archive: Archive,
    layer_source: Readable,
    finish: Callable[[], CheckpointImage],
    *,
    ref_name: str,
) -> CheckpointImage:
    """Write an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``) at ``directory``.

    The layer streams from ``layer_source`` (a verifying reader: a digest mismatch raises from its
    last read); ``finish()`` is called once the layer is complete and returns the image parts --
    the archive's metadata is read from the same pass. Everything is written into a hidden
    temp directory beside ``directory`` and renamed into place at the end (directories 0700,
    files 0600); on any failure nothing is left. ``directory`` must not exist or be empty.
    """
    target = Path(directory)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInput(f"--oci-layout {str(target)!r}: the directory {str(parent)!r} does not exist")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInput(f"--oci-layout {str(target)!r} exists and is not an empty directory")
    layer = layer_descriptor(archive)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise translate_os_error(exc, f"creating a directory in {str(parent)!r}") from None
    try:
        try:
            blobs = tmp / "blobs" / "sha256"
            blobs.mkdir(mode=0o700, parents=True)
            for d in (tmp / "blobs", blobs):
                d.chmod(0o700)
            written = _stream_to(blobs / layer.hex, layer_source)
            if written != layer.size:  # the verifying reader catches this first; belt and braces
                raise IntegrityError(f"archive {archive.id}: layer is {written} bytes, the catalog says {layer.size}")
            image = finish()
            _write(blobs / image.config_descriptor.hex, image.config)
            _write(blobs / image.manifest_descriptor.hex, image.manifest)
            index_entry = Descriptor(MEDIA_MANIFEST, image.manifest_descriptor.digest, image.manifest_descriptor.size,
                                     {**image.annotations, REF_NAME: ref_name})
            index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [index_entry.to_json()]}
            _write(tmp / "index.json", canonical_json(index))
            _write(tmp / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
            if target.exists():
                target.rmdir()
            os.rename(tmp, target)
        except OSError as exc:
            raise translate_os_error(exc, f"writing the OCI layout {str(target)!r}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return image


def _stream_to(path: Path, source: Readable) -> int:
    written = 0
    with new_file(path) as fh:
        while data := source.read(CHUNK):
            fh.write(data)
            written += len(data)
    return written


def _write(path: Path, data: bytes) -> None:
    with new_file(path) as fh:
        fh.write(data)
