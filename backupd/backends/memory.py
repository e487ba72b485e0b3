"""In-memory backend: a real implementation of the contract, for tests and dry experiments."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import BinaryIO

from backupd.backends.base import Backend, ObjectInfo, Readable, check_key
from backupd.errors import ObjectExists, StorageNotFound


class MemoryBackend(Backend):
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._objects: dict[str, tuple[bytes, datetime]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, source: Readable) -> ObjectInfo:
        check_key(key)
        with self._lock:
            if key in self._objects:
                raise ObjectExists(f"writing {key!r} to backend {self.name!r}: the object already exists")
        buf = io.BytesIO()
        while chunk := source.read(1024 * 1024):
            buf.write(chunk)
        now = datetime.now(UTC)
        with self._lock:
            if key in self._objects:
                raise ObjectExists(f"writing {key!r} to backend {self.name!r}: the object already exists")
            self._objects[key] = (buf.getvalue(), now)
        return ObjectInfo(key, buf.tell(), now)

    def open(self, key: str) -> BinaryIO:
        with self._lock:
            try:
                data, _ = self._objects[check_key(key)]
            except KeyError:
                raise StorageNotFound(f"reading {key!r} from backend {self.name!r}: not found") from None
        return io.BytesIO(data)

    def stat(self, key: str) -> ObjectInfo | None:
        with self._lock:
            entry = self._objects.get(check_key(key))
        return ObjectInfo(key, len(entry[0]), entry[1]) if entry else None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = [(k, v) for k, v in self._objects.items() if k.startswith(prefix)]
        for key, (data, modified) in items:
            yield ObjectInfo(key, len(data), modified)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)

    def corrupt(self, key: str, data: bytes) -> None:
        """Replace an object's bytes in place (tests of verify and restore use this)."""
        with self._lock:
            self._objects[key] = (data, self._objects[key][1])
