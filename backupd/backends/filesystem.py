"""Filesystem backend: one file per object under a root directory.

Atomicity and create-only come from :func:`backupd.durable.atomic_write`: a hidden temp file
(``.tmp.<name>.<random>``) in the target directory, fsynced, then ``link()``-ed to its final name
(``link`` fails if the name exists, which ``rename`` would silently overwrite), then the directory
fsynced. Files are 0600 and directories 0700: archives hold process memory.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from backupd.backends.base import Backend, ObjectInfo, Readable, check_key
from backupd.durable import atomic_write, fsync_dir
from backupd.errors import NoSpace, ObjectExists, StorageAuthError, StorageError, StorageNotFound

TEMP_PREFIX = ".tmp."
CHUNK = 1024 * 1024


def translate_os_error(exc: OSError, what: str) -> StorageError:
    """The one place where OSError becomes a backupd storage error."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return NoSpace(f"{what}: no space left on device")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageAuthError(f"{what}: {reason} (check ownership and mount options)")
    if exc.errno == errno.ENOENT:
        return StorageNotFound(f"{what}: not found")
    return StorageError(f"{what}: {reason}", retryable=exc.errno in (errno.EIO, errno.EAGAIN, errno.EBUSY))


class _SourceError(Exception):
    """Carries an error raised by the source so it is not mistaken for a storage error."""


def _source_error(exc: _SourceError) -> BaseException:
    assert exc.__cause__ is not None  # _read_source always chains it
    return exc.__cause__


def _read_source(source: Readable) -> bytes:
    try:
        return source.read(CHUNK)
    except OSError as exc:
        raise _SourceError() from exc


class FilesystemBackend(Backend):
    def __init__(self, name: str, root: str | os.PathLike[str]) -> None:
        self.name = name
        self.root = Path(root).absolute()

    def describe(self) -> str:
        return f"{self.name} (filesystem {self.root})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _makedirs(self, directory: Path) -> None:
        # Create each missing level 0700 ourselves: os.makedirs applies the umask, and a
        # pre-existing parent (e.g. /var/backups) is not ours to chmod.
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue
            os.chmod(d, 0o700)

    def put(self, key: str, source: Readable) -> ObjectInfo:
        path = self._path(key)
        what = f"writing {key!r} to backend {self.name!r}"
        size = 0
        try:
            self._makedirs(path.parent)
            if path.exists():
                raise ObjectExists(f"{what}: the object already exists")
            with atomic_write(path, prefix=TEMP_PREFIX, suffix="") as out:
                while chunk := _read_source(source):
                    out.write(chunk)
                    size += len(chunk)
        except FileExistsError:
            raise ObjectExists(f"{what}: the object already exists") from None
        except _SourceError as exc:
            raise _source_error(exc) from None  # the source's own error, not the backend's
        except OSError as exc:
            raise translate_os_error(exc, what) from exc
        return ObjectInfo(key=key, size=size, modified=datetime.now(UTC))

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise translate_os_error(exc, f"reading {key!r} from backend {self.name!r}") from exc
        return os.fdopen(fd, "rb", buffering=CHUNK)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise translate_os_error(exc, f"stat {key!r} in backend {self.name!r}") from exc
        if not statmod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the directory the prefix names, then filter by the full prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if not start.is_dir():
            return
        try:
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
                for filename in filenames:
                    if filename.startswith(TEMP_PREFIX):
                        continue
                    full = Path(dirpath, filename)
                    key = full.relative_to(self.root).as_posix()
                    if not key.startswith(prefix):
                        continue
                    st = full.lstat()
                    if statmod.S_ISREG(st.st_mode):
                        yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))
        except OSError as exc:
            raise translate_os_error(exc, f"listing backend {self.name!r}") from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
            fsync_dir(path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, f"deleting {key!r} from backend {self.name!r}") from exc

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        if key is not None:
            path = self._path(key)
            candidates = list(path.parent.glob(f"{TEMP_PREFIX}{path.name}.*")) if path.parent.is_dir() else []
            cutoff = float("inf")
        else:
            if not self.root.is_dir():
                return 0
            candidates = [Path(d, f) for d, _, files in os.walk(self.root) for f in files if f.startswith(TEMP_PREFIX)]
            cutoff = datetime.now(UTC).timestamp() - older_than.total_seconds()
        removed = 0
        for full in candidates:
            try:
                if full.lstat().st_mtime < cutoff:
                    full.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise translate_os_error(exc, f"cleaning temp files in backend {self.name!r}") from exc
        return removed
