"""The storage backend contract.

A backend stores opaque objects under keys. Keys are relative ``/``-separated paths (no leading
``/``, no ``.`` or ``..`` segments, no empty segments). Every backend -- filesystem, S3, the
in-memory one used by tests -- passes the same contract suite (``tests/backends/contract.py``):

* ``put(key, source)`` streams ``source`` (anything with ``read(n) -> bytes``) into ``key``.
  It is **atomic**: readers see the whole object or nothing, never a prefix. It is
  **create-only**: if ``key`` already exists it raises :class:`~backupd.errors.ObjectExists` and
  leaves the existing object untouched. It **streams**: memory use does not depend on the size
  of the source. On failure nothing is visible under ``key`` and no temporary data is listed.
  If ``source`` is seekable, a failed put may be retried by seeking it back (retry wrappers do).
* ``open(key)`` returns a readable binary stream (usable as a context manager); a missing key
  raises :class:`~backupd.errors.StorageNotFound`.
* ``stat(key)`` returns an :class:`ObjectInfo` or ``None``.
* ``list(prefix)`` yields :class:`ObjectInfo` for every committed object whose key starts with
  ``prefix`` (in no particular order); temporary or incomplete uploads are never listed.
* ``delete(key)`` is idempotent: deleting a missing key is not an error.
* ``delete_many(keys)`` deletes several keys; backends with a batch API override it.
* ``abort_incomplete(older_than, key=None)`` removes leftovers of interrupted puts (temp files,
  unfinished multipart uploads) older than ``older_than`` and returns how many it removed;
  with ``key``, only those of that key, whatever their age (a restarted daemon cleaning up
  after its own killed upload, which it knows by its pending catalog row).

Errors raised are always :mod:`backupd.errors` classes; foreign exceptions are translated inside
each backend module. Retrying, dry-run and fault injection are wrappers around a backend
(:mod:`backupd.backends.wrappers`), never flags inside one.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO, Protocol

from backupd.errors import InvalidInput


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime  # aware, UTC


def check_key(key: str) -> str:
    """Refuse keys that could escape a backend's root or alias another key."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidInput(f"invalid storage key {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidInput(f"invalid storage key {key!r}")
    return key


class Backend(abc.ABC):
    """Base class of every backend; see the module docstring for the contract."""

    #: the configured name (``[[backends]] name``); used in the catalog and in messages
    name: str

    @abc.abstractmethod
    def put(self, key: str, source: Readable) -> ObjectInfo: ...

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO: ...

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        return 0

    def describe(self) -> str:
        """Where this backend stores, for messages; never includes credentials."""
        return self.name

    # Convenience built on the primitives: small objects such as manifests.
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self.put(key, io.BytesIO(data))

    def read_bytes(self, key: str, limit: int = 16 * 1024 * 1024) -> bytes:
        with self.open(key) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"object {key!r} in backend {self.name!r} is larger than {limit} bytes")
        return data
