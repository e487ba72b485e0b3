"""Restoring an archive's tar to a local file, atomically and 0600."""

from __future__ import annotations

import os
from pathlib import Path

from backupd.backends.base import Readable
from backupd.backends.filesystem import translate_os_error
from backupd.durable import atomic_write
from backupd.errors import InvalidInput
from backupd.storage.read import CHUNK


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
    written = 0
    try:
        with atomic_write(path, replace=overwrite, suffix=".partial") as fh:
            while data := source.read(CHUNK):
                fh.write(data)
                written += len(data)
    except FileExistsError:
        raise InvalidInput(f"{str(path)!r} appeared while restoring; nothing was replaced") from None
    except OSError as exc:
        raise translate_os_error(exc, f"writing {str(path)!r}") from None
    return written

