"""Disaster-recovery restore: pick an archive, stream it back verified, read its metadata safely.

* :func:`select_archive` -- an archive by id (or unique prefix), or the newest committed one of
  a workload's container (``--latest``), of one replica (``--pod``) where the workload has several.
* :func:`open_archive` -- the archive's tar as a stream out of its backend, decompressed and
  checked against the catalog *and* the backend's manifest while it streams
  (:class:`~backupd.transfer.UnpackingReader`): the final ``read`` raises before a consumer can
  treat bad bytes as complete.
* :func:`restore_to_file` -- that stream into a file, atomically (temp file, fsync, link or
  rename), 0600; on any failure no file is left behind.
* :func:`metadata_scanner` -- a :class:`~backupd.tarscan.TarScanner` (re-exported here) fed the
  bytes of the stream *as they pass by* on their way to a file, a registry or an OCI layout:
  it refuses hostile members (the rules every reader applies, :mod:`backupd.tarscan`) and keeps
  a few small metadata files (``config.dump``, ``spec.dump``, ``status.dump``, one CRIU
  ``core-*.img``). Nothing is ever extracted to disk, and the archive is read once: the layer
  upload and the metadata come from the same pass.
* :func:`checkpoint_info` -- what those files say (engine, base image, pod labels, bind mounts,
  architecture), with fallbacks to the catalog.

Foreign exceptions (OSError, JSON, tar headers) are translated here into backupd errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from backupd import criu_images, layout
from backupd.backends.base import Backend, Readable
from backupd.backends.filesystem import fsync_dir, translate_os_error
from backupd.catalog import COMMITTED, Archive, Catalog
from backupd.errors import ConfigError, IntegrityError, InvalidInput, NotFound, StorageNotFound
from backupd.tarscan import ScanningReader as ScanningReader  # re-exported: it moved to backupd.tarscan
from backupd.tarscan import TarScanner
from backupd.transfer import UnpackingReader
from backupd.workload import KINDS, Workload

log = structlog.get_logger("backupd.restore")

CHUNK = 1 << 20

# -- selecting an archive ----------------------------------------------------------------------


def select_archive(
    catalog: Catalog,
    ref: str | None = None,
    *,
    latest: bool = False,
    namespace: str | None = None,
    workload: str | None = None,
    container: str | None = None,
    pod: str | None = None,
) -> Archive:
    """The committed archive to restore: ``ref`` (an id or unique prefix), or with ``latest`` the
    newest committed archive of ``namespace`` + ``workload`` + ``container`` (+ ``pod``).

    ``workload`` is ``kind/name`` (``deployment/web``), the layout segment (``deployment-web``)
    or a bare name when only one kind of workload has it. ``pod`` is a pod name or a replica
    (a StatefulSet pod, a DaemonSet pod's node). With ``latest``, archives of more than one
    replica (``db-0`` and ``db-1`` of a StatefulSet) are refused without ``pod``: each replica
    holds its own state, so "the newest" of them is not a recovery point of either. With
    ``ref``, any filter given must agree with the archive (a guard against restoring the wrong
    thing at 3 a.m.).
    """
    if ref and latest:
        raise InvalidInput("give an archive ID or --latest, not both")
    if not ref and not latest:
        raise InvalidInput(
            "which archive? give an archive ID (see `backupd list`) or --latest with --namespace, --workload "
            "and --container"
        )
    if ref:
        archive = catalog.get_archive(ref)
        if archive.state != COMMITTED:
            raise InvalidInput(f"archive {archive.id} is {archive.state}, not committed: only committed archives "
                               "can be restored (see `backupd list --all-states`)")
        for flag, wanted, actual in (("--namespace", namespace, archive.namespace),
                                     ("--container", container, archive.container)):
            if wanted is not None and wanted != actual:
                raise InvalidInput(f"archive {archive.id} is of {flag[2:]} {actual!r}, not {wanted!r}")
        if workload is not None and not _workload_matches(workload, archive.workload):
            raise InvalidInput(f"archive {archive.id} is of workload {archive.workload!r}, not {workload!r}")
        if pod is not None and pod not in (archive.pod, archive.replica):
            raise InvalidInput(f"archive {archive.id} is of pod {archive.pod!r}"
                               + (f" (replica {archive.replica!r})" if archive.replica else "") + f", not {pod!r}")
        return archive

    missing = [flag for flag, v in (("--namespace", namespace), ("--workload", workload),
                                    ("--container", container)) if not v]  # fmt: skip
    if missing:
        raise InvalidInput(f"--latest needs {', '.join(missing)} (the archive's namespace, workload and container)")
    assert workload is not None
    exact = _parse_workload(workload)
    archives = catalog.list_archives(namespace=namespace, container=container, pod_or_replica=pod,
                                     workload=str(exact) if exact else None)
    if exact is None:
        archives = [a for a in archives if a.workload.partition("/")[2] == workload]
        kinds = sorted({a.workload for a in archives})
        if len(kinds) > 1:
            raise InvalidInput(f"--workload {workload!r} is ambiguous in namespace {namespace!r}: "
                               f"{', '.join(kinds)}; give one of these")
    if not archives:
        of_pod = f" of pod {pod!r}" if pod is not None else ""
        raise NotFound(f"no committed archive of container {container!r}{of_pod} of workload {workload!r} in "
                       f"namespace {namespace!r} (see `backupd list --namespace {namespace}`)")
    replicas = sorted({a.replica for a in archives})
    if len(replicas) > 1 and pod is None:
        raise InvalidInput(f"--latest matches {len(replicas)} replicas of {archives[0].workload}: "
                           f"{', '.join(r or '(the whole workload)' for r in replicas)}; give --pod")
    return archives[-1]  # list_archives is oldest first


def _parse_workload(text: str) -> Workload | None:
    try:
        return Workload.parse(text)
    except ValueError:
        if "/" in text or text.partition("-")[0] in KINDS and "-" in text:
            raise InvalidInput(f"--workload {text!r}: expected kind/name such as deployment/web") from None
        return None


def _workload_matches(text: str, actual: str) -> bool:
    exact = _parse_workload(text)
    return str(exact) == actual if exact else actual.partition("/")[2] == text


# -- streaming an archive back, verified -------------------------------------------------------


def verified_manifest(backend: Backend, archive: Archive) -> layout.Manifest:
    """The backend's manifest of ``archive``, checked against its key and the catalog row.

    The manifest is what makes an archive exist; a row whose manifest is missing, fails the
    schema, disagrees with its key (:func:`backupd.layout.read_manifest`) or with the row is not
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


@contextlib.contextmanager
def open_archive(backends: Mapping[str, Backend], archive: Archive,
                 identities: Sequence[Any] = ()) -> Iterator[UnpackingReader]:
    """The archive's tar as a verified stream (see :class:`~backupd.transfer.UnpackingReader`).

    Digests and sizes come from the manifest after :func:`verified_manifest` checked it against
    its key and the catalog, so a mismatch on either side, a bit flip or a truncation raises
    :class:`~backupd.errors.IntegrityError` naming the archive from the final ``read`` -- or
    from the ``read`` that passes a size.
    An age-encrypted archive needs ``identities`` (:func:`backupd.transfer.load_identities`).
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
    with open_verified(backend, archive, manifest, identities) as reader:
        yield reader


@contextlib.contextmanager
def open_verified(backend: Backend, archive: Archive, manifest: layout.Manifest,
                  identities: Sequence[Any] = ()) -> Iterator[UnpackingReader]:
    """The object of ``archive`` as a stream checked against ``manifest``, which
    :func:`verified_manifest` returned; :class:`StorageNotFound` when the object is gone."""
    stream = backend.open(archive.key)
    try:
        yield UnpackingReader(
            stream, what=f"archive {archive.id} ({backend.name}:{archive.key})",
            tar_sha256=manifest.tar_sha256, stored_sha256=manifest.stored_sha256,
            tar_size=manifest.tar_size, stored_size=manifest.stored_size,
            encryption=manifest.encryption, identities=identities,
        )
    finally:
        stream.close()


def drain(source: Readable) -> int:
    """Read ``source`` to its end (which is where verifying readers check); returns the bytes."""
    total = 0
    while data := source.read(CHUNK):
        total += len(data)
    return total


def restore_to_file(source: Readable, dest: str | os.PathLike[str], *, overwrite: bool = False) -> int:
    """Write ``source`` to ``dest`` atomically with mode 0600; returns the bytes written.

    The bytes go to a hidden temp file beside ``dest``, are fsynced, then linked to ``dest``
    (create-only: an existing file is refused unless ``overwrite``, which renames over it) and
    the directory is fsynced. Any error -- including a digest mismatch raised by the source's
    final read -- removes the temp file: nothing is left behind.
    """
    path = Path(dest)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInput(f"{str(path)!r}: the directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise InvalidInput(f"{str(path)!r} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise InvalidInput(f"{str(path)!r} already exists; choose another path or pass --force to replace it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as exc:
        raise translate_os_error(exc, f"creating a file in {str(parent)!r}") from None
    written = 0
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                while data := source.read(CHUNK):
                    fh.write(data)
                    written += len(data)
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise InvalidInput(f"{str(path)!r} appeared while restoring; nothing was replaced") from None
                os.unlink(tmp)
            fsync_dir(parent)
        except OSError as exc:
            raise translate_os_error(exc, f"writing {str(path)!r}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return written


# -- reading the checkpoint tar as it streams ----------------------------------------------------

METADATA_FILES = ("config.dump", "spec.dump", "status.dump")
_CORE_IMAGE = re.compile(r"^checkpoint/core-\d+\.img$")


def metadata_scanner(archive: Archive) -> TarScanner:
    """A scanner keeping what :func:`checkpoint_info` reads: the dumps and the first CRIU core image."""
    scanner: TarScanner

    def keep(name: str) -> bool:
        if name in METADATA_FILES:
            return True
        return bool(_CORE_IMAGE.match(name)) and not any(_CORE_IMAGE.match(k) for k in scanner.files)

    scanner = TarScanner(f"archive {archive.id}", keep)
    return scanner


# -- what the archive says about itself ----------------------------------------------------------

# Mounts CRI-O does not require a restored container to redeclare (server/container_restore.go),
# plus those the kubelet adds to every container by itself.
_IMPLICIT_MOUNTS = frozenset({
    "/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm", "/etc/resolv.conf",
    "/etc/hostname", "/etc/passwd", "/etc/group", "/run/secrets", "/run/.containerenv",
    "/etc/hosts", "/dev/termination-log", "/var/run/secrets/kubernetes.io/serviceaccount",
})  # fmt: skip
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
           "mips": "mips64le", "loongarch64": "loong64", "riscv64": "riscv64"}  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint archive says about the container it holds (catalog values as fallbacks)."""

    container: str
    pod: str
    namespace: str
    pod_uid: str = ""
    engine: str = "unknown"  # cri-o | containerd | podman | unknown
    runtime: str = ""
    rootfs_image: str = ""  # as the user requested it (config.dump rootfsImage)
    rootfs_image_name: str = ""  # e.g. docker.io/library/nginx:1.27
    rootfs_image_ref: str = ""  # the runtime's image ID
    checkpointed_time: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # pod labels recorded in the archive
    bind_mounts: tuple[tuple[str, str], ...] = ()  # (destination, source) a restore must redeclare
    has_status_dump: bool = False  # containerd 2.1-2.3 restore needs it
    arch: str | None = None  # GOARCH of the checkpointed process (CRIU core image)

    @property
    def rootfs_image_digest(self) -> str:
        for candidate in (self.rootfs_image, self.rootfs_image_name):
            _, at, digest = candidate.partition("@")
            if at and digest.startswith("sha256:"):
                return digest
        return ""


def _json_object(files: Mapping[str, bytes], name: str, what: str) -> dict[str, Any]:
    data = files.get(name)
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("checkpoint_metadata_unreadable", archive=what, file=name, error=str(exc)[:200])
        return {}
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _labels_from_json(text: Any) -> dict[str, str]:
    if not isinstance(text, str):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return _pod_labels(value)


def _pod_labels(value: Any) -> dict[str, str]:
    # The kubelet puts its own io.kubernetes.* labels on every container; they identify the old
    # pod (uid, name) and must never be copied onto a new one.
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items()
            if isinstance(k, str) and isinstance(v, str) and not k.startswith("io.kubernetes.")}  # fmt: skip


def checkpoint_info(files: Mapping[str, bytes], archive: Archive) -> CheckpointInfo:
    """Read ``config.dump``/``spec.dump``/``status.dump``/a core image kept by a scanner.

    Unreadable or missing files degrade to the catalog's values (logged), never to an error: an
    operator restoring at 3 a.m. gets the image with fewer annotations rather than nothing.
    """
    what = archive.id
    config = _json_object(files, "config.dump", what)
    spec = _json_object(files, "spec.dump", what)
    status = _json_object(files, "status.dump", what)
    ann = spec.get("annotations")
    ann = {k: v for k, v in ann.items() if isinstance(v, str)} if isinstance(ann, dict) else {}

    manager = ann.get("io.container.manager", "")
    if manager == "cri-o":
        engine = "cri-o"
    elif manager == "libpod":
        engine = "podman"
    elif "io.kubernetes.cri.container-name" in ann or status:
        engine = "containerd"
    else:
        engine = "unknown"

    container = pod = namespace = ""
    if engine == "cri-o":
        try:
            meta = json.loads(ann.get("io.kubernetes.cri-o.Metadata", "{}"))
            container = _str(meta.get("name")) if isinstance(meta, dict) else ""
        except ValueError:
            container = ""
        pod, namespace = ann.get("io.kubernetes.pod.name", ""), ann.get("io.kubernetes.pod.namespace", "")
        labels = _labels_from_json(ann.get("io.kubernetes.cri-o.Labels"))
    else:
        container = ann.get("io.kubernetes.cri.container-name", "")
        pod = ann.get("io.kubernetes.cri.sandbox-name", "")
        namespace = ann.get("io.kubernetes.cri.sandbox-namespace", "")
        labels = _pod_labels(status.get("labels"))

    mounts: list[tuple[str, str]] = []
    raw_mounts = spec.get("mounts")
    for m in raw_mounts if isinstance(raw_mounts, list) else ():
        if not isinstance(m, dict):
            continue
        dest, source = _str(m.get("destination")), _str(m.get("source"))
        options = m.get("options") if isinstance(m.get("options"), list) else []
        is_bind = m.get("type") == "bind" or "bind" in options or "rbind" in options
        if is_bind and dest and dest.rstrip("/") not in _IMPLICIT_MOUNTS:
            mounts.append((dest, source))

    arch = None
    for name, data in files.items():
        if _CORE_IMAGE.match(name):
            try:
                core = criu_images.decode_image(data, expect="CORE").entries[0]
                machine = {v: k for k, v in criu_images.CoreEntry.MTYPES.items()}.get(core.mtype)
                arch = _GOARCH.get(machine or "")
            except (criu_images.CriuImageError, IndexError) as exc:
                log.warning("checkpoint_metadata_unreadable", archive=what, file=name, error=str(exc)[:200])

    if config == {} or spec == {}:
        log.warning("checkpoint_metadata_missing", archive=what,
                    missing=[n for n, v in (("config.dump", config), ("spec.dump", spec)) if not v])
    return CheckpointInfo(
        container=container or archive.container,
        pod=pod or archive.pod,
        namespace=namespace or archive.namespace,
        pod_uid=ann.get("io.kubernetes.pod.uid", "") or ann.get("io.kubernetes.cri.sandbox-uid", ""),
        engine=engine,
        runtime=_str(config.get("runtime")),
        rootfs_image=_str(config.get("rootfsImage")),
        rootfs_image_name=_str(config.get("rootfsImageName")) or archive.image,
        rootfs_image_ref=_str(config.get("rootfsImageRef")),
        checkpointed_time=_str(config.get("checkpointedTime")),
        labels=labels,
        bind_mounts=tuple(mounts),
        has_status_dump="status.dump" in files,
        arch=arch,
    )
