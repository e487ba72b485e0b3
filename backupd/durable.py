"""Durable, atomic file writes: a reader sees the whole file or none of it, and a crash after
the write returns does not lose it.

The bytes go to a new 0600 temp file beside the target (same directory, so same filesystem),
are fsynced, then published under the target's name -- by ``link()`` when the name must not
exist yet (``link`` fails if it does, where ``rename`` would silently replace it), by
``rename()`` when replacing is wanted -- and the directory is fsynced so the new name survives
a crash. The temp file is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename, link or unlink in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(dest: Path, prefix: str = ".", suffix: str = ".tmp") -> Path:
    """A fresh name beside ``dest`` for its temp file: ``<prefix><name>.<random><suffix>``."""
    return dest.with_name(f"{prefix}{dest.name}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def new_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a new file at ``path`` (mode 0600, created with ``O_EXCL`` and ``O_NOFOLLOW``: an
    existing name raises ``FileExistsError``), fsynced when the block ends without an error.
    For files in a private directory that is published as a whole; see :func:`atomic_write`
    for one file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike[str], *, replace: bool = False, prefix: str = ".",
                 suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Yield a binary file to write ``dest``'s bytes to; on leaving the block without an error
    they are fsynced and published as ``dest`` (see the module docstring).

    Create-only unless ``replace``: an existing ``dest`` raises ``FileExistsError`` and is left
    as it was. The temp file is ``<prefix><name>.<random><suffix>`` (created with ``O_EXCL``
    and ``O_NOFOLLOW``, mode 0600). ``OSError`` passes to the caller, which names what it
    was writing. An error in the block publishes nothing.
    """
    path = Path(dest)
    tmp = _temp_path(path, prefix, suffix)
    created = False
    try:
        with new_file(tmp) as fh:
            created = True
            yield fh
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync_dir(path.parent)
    finally:
        # after a replace the name is gone already; any other failure to remove it is left to
        # the owner's sweep (the put's or restore's own outcome matters more)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
