"""What is inside a checkpoint archive, read in one streaming pass and never extracted.

:func:`inspect_file` reads a local archive (plain tar, or zstd/gzip/xz/bzip2-compressed,
detected by magic bytes, ``-`` for stdin through :func:`inspect_stream`);
:func:`backupd.storage.read.inspect_catalog_archive` reads a committed archive from its backend
through :func:`~backupd.storage.read.open_verified` (decrypted, decompressed, and checked against
the catalog's sizes and SHA-256 digests), then :func:`inspect_tar_stream`. Both give an
:class:`~backupd.archive.inspection.Inspection`: what ``checkpointctl show`` and ``checkpointctl
inspect --ps-tree --stats --mounts`` show (reference §4), plus the rootfs-diff file list and the
deleted files. Field sources follow checkpointctl exactly (reference §2.3-2.4): the engine from
``spec.dump``'s ``io.container.manager`` annotation (``cri-o`` CRI-O, ``libpod`` Podman, anything
else containerd), the container name, pod, namespace, IP and created time from that engine's
annotations (Podman: ``config.dump`` and ``network.status``), image/ID/runtime/checkpointed time
from ``config.dump``, the statistics from ``stats-dump``, the process tree from
``checkpoint/pstree.img`` and ``checkpoint/core-<pid>.img`` (``tc.comm``, ``tc.task_state``).

**Safety.** Nothing is ever written, created or followed: the archive is read once, through the
tar reader restore and verify use (:class:`~backupd.archive.tar.TarScanner`: one header parser,
one set of limits and messages), only the small metadata files are held in memory (each under
``Limits.max_metadata_bytes``), memory pages are counted from their headers, and
``rootfs-diff.tar`` is listed by a second scanner as its bytes pass. The archive is refused with
:class:`~backupd.errors.UnsafeArchive` (exit code 7), naming the member, by the member rules
(:class:`~backupd.archive.members.MemberRules`: absolute or ``..`` names, symlinks, hardlinks,
devices, FIFOs, sparse files, unknown types, a name twice, absurd declared sizes or headers), or
when a CRIU image is malformed. A truncated or corrupt stream (tar or compression) is an
:class:`~backupd.errors.IntegrityError` (also exit code 7): an archive must end with its
end-of-archive block. Inside ``rootfs-diff.tar`` (the container's changed files) links and
device nodes are legitimate content and are listed, never followed; absolute or ``..`` names and
hardlinks leaving the tree are refused there too (:class:`~backupd.archive.members.ContentRules`).

**JSON** (``Inspection.to_json()``, ``backupd inspect --output json``); field names are stable.
Names shared with ``checkpointctl inspect --format json`` mean the same thing:

* ``source`` — the path, or ``archive <id>``; ``archive`` — the catalog row (``backupd list``
  fields) when read from the catalog, else null; ``compression`` — ``none``, ``zstd``, ``gzip``,
  ``xz`` or ``bzip2``; ``tar_size`` — bytes of uncompressed tar read; ``members`` — tar entries.
* ``container_name``, ``image`` (``rootfsImageName``), ``id``, ``runtime``, ``created``,
  ``checkpointed`` (RFC 3339 as checkpointctl prints them), ``engine`` (``CRI-O``,
  ``containerd`` or ``Podman``), ``ip``, ``mac``, ``pod``, ``namespace``: strings or null.
* ``checkpoint_size``: ``total_size`` (regular files under ``checkpoint/``),
  ``memory_pages_size`` (``checkpoint/pages-*``), ``amd_gpu_memory_pages_size``
  (``checkpoint/amdgpu-pages-*``), ``root_fs_diff_size`` (the ``rootfs-diff.tar`` member): bytes.
* ``statistics``: null without ``stats-dump``, else ``freezing_time``, ``frozen_time``,
  ``memdump_time``, ``memwrite_time`` (microseconds), ``pages_scanned``, ``pages_skipped_parent``,
  ``pages_written``, ``pages_lazy``.
* ``process_tree``: null without ``pstree.img``, else the root ``{pid, command, task_state
  (Alive, Dead, Stopped, Zombie), threads, children: [...]}``, children in pstree order.
* ``rootfs_diff``: null without ``rootfs-diff.tar``, else ``{compression, files: [{path, type
  (file, dir, symlink, hardlink, char, block, fifo), size, link}], truncated}``; ``truncated``
  is true when the listing stopped at ``Limits.max_listed_files``.
* ``deleted_files``: ``deleted.files`` (CRI-O, Podman) plus the OCI whiteouts of a containerd
  rootfs diff. ``mounts``: ``[{destination, type, source}]`` from ``spec.dump``.
* ``warnings``: strings about things that are odd but not unsafe (bytes after the
  end-of-archive block, which tar readers ignore; a truncated listing).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from typing import Any

from backupd.archive.compression import AGE_MAGIC, CHUNK, Decompressor, detect_compression
from backupd.archive.inspection import (
    CheckpointSize,
    DumpStatistics,
    Inspection,
    ProcessNode,
    RootfsDiff,
    RootfsEntry,
    apply_metadata,
    decode_core,
    process_tree,
)
from backupd.archive.members import DEFAULT_LIMITS, ContentRules, Limits, Member, MemberSink
from backupd.archive.tar import TarScanner
from backupd.errors import BackupdError, IntegrityError, InvalidInput, NotFound, StorageError

__all__ = [
    "CheckpointSize",
    "DumpStatistics",
    "Inspection",
    "Limits",
    "ProcessNode",
    "RootfsDiff",
    "RootfsEntry",
    "detect_compression",
    "inspect_tar_stream",
    "inspect_file",
    "inspect_stream",
    "looks_like_archive_id",
]

_TRAILER_SCAN = 1 << 20  # local files: how far past the end-of-archive block we look
_CORE_RE = re.compile(r"^checkpoint/core-(\d{1,10})\.img$")
_METADATA = frozenset({"config.dump", "spec.dump", "stats-dump", "deleted.files", "network.status",
                       "checkpoint/pstree.img"})  # fmt: skip


class _ListingFull(Exception):
    """The rootfs-diff.tar listing reached ``Limits.max_listed_files``: stop reading it."""


class _RootfsLister:
    """The data of ``rootfs-diff.tar`` as it passes: decompressed, scanned with the content
    rules, listed (OCI whiteouts become deleted files) until ``Limits.max_listed_files``."""

    def __init__(self, result: Inspection, what: str, limits: Limits) -> None:
        where = f"{what}: rootfs-diff.tar"
        self.result, self.limits = result, limits
        self.diff = RootfsDiff(compression="none")
        self.scanner = TarScanner(where, rules=ContentRules(where, limits), limits=limits, on_member=self._entry)
        self.unpacking = Decompressor(where, self.scanner.feed)
        self.full = False

    def write(self, data: memoryview) -> None:
        if self.full:
            return
        try:
            self.unpacking.write(data)
        except _ListingFull:
            self.full = True

    def close(self) -> None:
        if not self.full:
            try:
                self.unpacking.close()
                self.scanner.close()
            except _ListingFull:
                self.full = True
        self.diff.compression = self.unpacking.kind or "none"
        self.result.rootfs_diff = self.diff

    def _entry(self, member: Member) -> None:
        name = member.name
        if name == ".":
            return
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".wh."):
            if not base.startswith(".wh..wh."):  # an OCI whiteout: containerd's record of a deletion
                self.result.deleted_files.append(name[: len(name) - len(base)] + base[4:])
            return
        if len(self.diff.files) >= self.limits.max_listed_files:
            self.diff.truncated = True
            self.result.warnings.append(f"the rootfs-diff.tar listing stops at {self.limits.max_listed_files} entries")
            raise _ListingFull
        link = member.linkname if member.kind_name in ("symlink", "hardlink") else None
        self.diff.files.append(RootfsEntry(name, member.kind_name, member.apparent_size if member.is_file else 0, link))


class _Pass:
    """What one pass over an archive gathers as its members go by."""

    def __init__(self, result: Inspection, what: str, limits: Limits, *, after_end: str) -> None:
        self.result, self.what, self.limits = result, what, limits
        self.files: dict[str, bytes] = {}
        self.cores: dict[int, tuple[str, str] | None] = {}
        self.has_checkpoint_dir = False
        self.scanner = TarScanner(what, self.keep, limits=limits, on_kept=self.kept, on_member=self.member,
                                  after_end=after_end)  # fmt: skip

    @staticmethod
    def keep(name: str) -> bool:
        return name in _METADATA or _CORE_RE.match(name) is not None

    def kept(self, name: str, data: bytes) -> None:
        core = _CORE_RE.match(name)
        if core:  # decoded now: only (comm, state) of each task is held
            self.cores[int(core[1])] = decode_core(data, int(core[1]), self.what)
        else:
            self.files[name] = data

    def member(self, member: Member) -> MemberSink | None:
        name, sizes = member.name, self.result.checkpoint_size
        if member.kind_name == "dir":
            self.has_checkpoint_dir |= name == "checkpoint"
            return None
        if name.startswith("checkpoint/"):
            self.has_checkpoint_dir = True
            sizes.total_size += member.size
            leaf = name[len("checkpoint/") :]
            if leaf.startswith("pages-"):
                sizes.memory_pages_size += member.size
            elif leaf.startswith("amdgpu-pages-"):
                sizes.amd_gpu_memory_pages_size += member.size
        elif name == "rootfs-diff.tar":
            sizes.root_fs_diff_size = member.size
            return _RootfsLister(self.result, self.what, self.limits)
        return None

    def finish(self) -> Inspection:
        """The stream ended: what the metadata files and the process tree say."""
        result, what = self.result, self.what
        result.members = self.scanner.members
        result.tar_size = self.scanner.offset
        if not self.has_checkpoint_dir:
            raise IntegrityError(f"{what} is not a container checkpoint archive: it has no checkpoint/ directory")
        apply_metadata(result, self.files, what)
        if "checkpoint/pstree.img" in self.files:
            result.process_tree = process_tree(self.files["checkpoint/pstree.img"], self.cores, what, self.limits)
        return result


def _read(raw: Any, on_error: Callable[[Exception], BackupdError]) -> bytes:
    """One chunk of ``raw``; a failure of foreign code (a backend stream) becomes ``on_error``."""
    try:
        data: bytes = raw.read(CHUNK)
    except BackupdError:
        raise
    except Exception as exc:
        raise on_error(exc) from None
    return data


def _warn_about_trailer(scanner: TarScanner, result: Inspection) -> None:
    if scanner.trailing_nonzero:
        more = "at least " if scanner.trailing_bytes > _TRAILER_SCAN else ""
        result.warnings.append(f"{more}{scanner.trailing_nonzero} non-zero bytes follow the end-of-archive block "
                               "(ignored, as tar readers do: stale data of an overwritten file, or something "
                               "appended)")  # fmt: skip


# -- entry points -----------------------------------------------------------------------------


def inspect_tar_stream(stream: Any, unreadable: Callable[[Exception], BackupdError], *, source: str,
                       archive: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """Inspect the plain tar read from ``stream`` to its very end (a catalog archive, opened with
    :func:`backupd.storage.read.open_verified`, whose digests are checked at the end); read
    errors become ``unreadable(exc)``. Bytes after the end-of-archive block are read, not judged."""
    tar_pass = _Pass(Inspection(source=source, compression="zstd", archive=archive), source, limits,
                     after_end="count")  # fmt: skip
    while data := _read(stream, unreadable):
        tar_pass.scanner.feed(data)
    tar_pass.scanner.close()
    return tar_pass.finish()


def inspect_stream(raw: Any, *, source: str, limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """Inspect an archive read from ``raw`` (anything with ``read(n)``; plain or compressed
    tar), e.g. stdin. ``source`` names it in messages; read errors become StorageError. Up to
    1 MiB after the end-of-archive block is read, and non-zero bytes there are a warning."""

    def unreadable(exc: Exception) -> BackupdError:
        return StorageError(f"cannot read {source}: {exc}")

    head = b""
    while len(head) < len(AGE_MAGIC) and (data := _read(raw, unreadable)):
        head += data
    if head.startswith(AGE_MAGIC):
        raise InvalidInput(f"{source} is encrypted with age: decrypt it first (age -d -i KEYFILE), then inspect "
                           "the result")  # fmt: skip
    result = Inspection(source=source)
    tar_pass = _Pass(result, source, limits, after_end="count")
    scanner = tar_pass.scanner
    unpacking = Decompressor(source, scanner.feed)
    data = head
    while data:
        unpacking.write(data)
        if scanner.trailing_bytes > _TRAILER_SCAN:
            break
        data = _read(raw, unreadable)
    else:
        unpacking.close()
    scanner.close()
    result.compression = unpacking.kind or "none"
    _warn_about_trailer(scanner, result)
    return tar_pass.finish()


def inspect_file(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> Inspection:
    """Inspect a local archive file. A symlink the user names is followed (their choice), but
    the file must be a regular one: a FIFO or a device could hang or flood the reader."""
    shown = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no file {shown!r}") from None
    except OSError as exc:
        raise InvalidInput(f"cannot open {shown!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInput(f"{shown!r} is not a regular file; give a checkpoint archive (.tar, .tar.zst, .tar.gz)")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb", buffering=CHUNK)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        return inspect_stream(fh, source=shown, limits=limits)


def looks_like_archive_id(target: str) -> bool:
    """Whether a CLI argument that is not an existing file can be a catalog id (prefix)."""
    return re.fullmatch(r"[0-9a-f]{4,32}", target) is not None
