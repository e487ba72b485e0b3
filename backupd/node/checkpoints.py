"""The node-local checkpoint directory (``/var/lib/kubelet/checkpoints``).

The kubelet writes archives there (root, 0600) and nothing else ever deletes them, so backupd
does, once an archive is committed. Everything here works by name inside one directory opened
once: no path from the kubelet is followed, symlinks are never followed, and only regular
files named ``checkpoint-*.tar`` are read or removed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from backupd.errors import NoSpace, StorageError, UnsafeCheckpointPath


def node_tar_prefix(pod: str, namespace: str, container: str) -> str:
    """The start of the kubelet's ``checkpoint-<pod>_<namespace>-<container>-<RFC3339>.tar``."""
    return f"checkpoint-{pod}_{namespace}-{container}-"


@dataclass(frozen=True)
class NodeTar:
    name: str
    size: int
    modified: datetime


class CheckpointDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _dir_fd(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise StorageError(
                f"cannot open the node checkpoint directory {str(self.path)!r}: {exc.strerror} "
                "(is the hostPath mounted, and does backupd run with CAP_DAC_READ_SEARCH or as root?)"
            ) from None

    @staticmethod
    def _check_name(name: str) -> None:
        if "/" in name or name in (".", "..") or not name.startswith("checkpoint-") or not name.endswith(".tar"):
            raise UnsafeCheckpointPath(f"refusing node file name {name!r}: not a checkpoint-*.tar name")

    def open(self, name: str) -> BinaryIO:
        """Open a checkpoint tar for reading, refusing symlinks and anything but a regular file."""
        self._check_name(name)
        dfd = self._dir_fd()
        try:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeCheckpointPath(f"{name!r} in {str(self.path)!r} is a symlink; refusing it") from None
                raise StorageError(f"cannot open {name!r} in {str(self.path)!r}: {exc.strerror}") from None
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeCheckpointPath(f"{name!r} in {str(self.path)!r} is not a regular file; refusing it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)

    def remove(self, name: str) -> bool:
        """Delete a checkpoint tar; False if it was already gone. Never follows a symlink."""
        self._check_name(name)
        dfd = self._dir_fd()
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeCheckpointPath(f"{name!r} in {str(self.path)!r} is not a regular file; not removing it")
            os.unlink(name, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot remove {name!r} from {str(self.path)!r}: {exc.strerror}") from None
        finally:
            os.close(dfd)

    def list(self) -> list[NodeTar]:
        """Regular ``checkpoint-*.tar`` files, oldest first."""
        dfd = self._dir_fd()
        try:
            out = []
            for name in os.listdir(dfd):
                if not (name.startswith("checkpoint-") and name.endswith(".tar")):
                    continue
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append(NodeTar(name, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
            return sorted(out, key=lambda t: (t.modified, t.name))
        finally:
            os.close(dfd)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def ensure_free(self, floor: int) -> None:
        """Raise :class:`NoSpace` when free space is below ``floor``: a checkpoint of a large
        container could otherwise fill the node's disk (the kubelet does not check)."""
        free = self.free_bytes()
        if free < floor:
            raise NoSpace(
                f"only {free} bytes free in {str(self.path)!r}, below daemon.min_free_space={floor}; "
                "skipping checkpoints until space returns"
            )
