"""The backend contract suite (see backupd/backends/base.py).

Each backend's test module subclasses :class:`BackendContract` and provides a ``backend``
fixture returning a fresh, empty backend. Nothing here knows which backend it is testing.
"""

from __future__ import annotations

import io
import os
import threading
from datetime import timedelta

import pytest

from backupd.backends.base import Backend
from backupd.errors import InvalidInput, ObjectExists, StorageNotFound


class FailingReader:
    """A source that yields some bytes and then fails, as a dying kubelet tar read would."""

    def __init__(self, good: bytes) -> None:
        self._good = io.BytesIO(good)

    def read(self, n: int = -1) -> bytes:
        chunk = self._good.read(n)
        if not chunk:
            raise OSError("source broke mid-stream")
        return chunk


class CountingReader:
    """Yields ``total`` bytes of a repeating pattern without ever holding them."""

    def __init__(self, total: int, block: bytes) -> None:
        self.remaining = total
        self.block = block
        self.largest_read = 0

    def read(self, n: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        n = self.remaining if n is None or n < 0 else min(n, self.remaining)
        self.largest_read = max(self.largest_read, n)
        reps = n // len(self.block) + 1
        out = (self.block * reps)[:n]
        self.remaining -= n
        return out


class BackendContract:
    def test_put_then_open_returns_the_same_bytes(self, backend: Backend) -> None:
        data = os.urandom(3 * 1024 * 1024 + 17)
        info = backend.put("ns/wl/ctr/a.tar.zst", io.BytesIO(data))
        assert info.size == len(data)
        with backend.open("ns/wl/ctr/a.tar.zst") as stream:
            assert stream.read() == data

    def test_put_is_create_only(self, backend: Backend) -> None:
        backend.put_bytes("k/one", b"first")
        with pytest.raises(ObjectExists):
            backend.put_bytes("k/one", b"second")
        assert backend.read_bytes("k/one") == b"first"

    def test_failed_put_leaves_nothing_visible(self, backend: Backend) -> None:
        with pytest.raises(OSError, match="source broke"):
            backend.put("k/broken", FailingReader(b"x" * 100_000))
        assert backend.stat("k/broken") is None
        assert [o.key for o in backend.list("")] == []
        # the key is still free for a later, successful put
        backend.put_bytes("k/broken", b"ok")
        assert backend.read_bytes("k/broken") == b"ok"

    def test_stat(self, backend: Backend) -> None:
        assert backend.stat("nothing/here") is None
        backend.put_bytes("a/b", b"12345")
        info = backend.stat("a/b")
        assert info is not None and info.size == 5 and info.key == "a/b"
        assert info.modified.tzinfo is not None

    def test_open_missing_raises_not_found(self, backend: Backend) -> None:
        with pytest.raises(StorageNotFound):
            backend.open("missing/key")

    def test_list_by_prefix(self, backend: Backend) -> None:
        for key in ("p/ns1/a", "p/ns1/b", "p/ns2/c", "q/d"):
            backend.put_bytes(key, key.encode())
        assert sorted(o.key for o in backend.list("p/ns1/")) == ["p/ns1/a", "p/ns1/b"]
        assert sorted(o.key for o in backend.list("p/")) == ["p/ns1/a", "p/ns1/b", "p/ns2/c"]
        assert sorted(o.key for o in backend.list("")) == ["p/ns1/a", "p/ns1/b", "p/ns2/c", "q/d"]
        assert {o.key: o.size for o in backend.list("q")} == {"q/d": 3}

    def test_delete_is_idempotent(self, backend: Backend) -> None:
        backend.put_bytes("d/x", b"1")
        backend.delete("d/x")
        backend.delete("d/x")
        assert backend.stat("d/x") is None
        backend.put_bytes("d/y", b"1")
        backend.put_bytes("d/z", b"1")
        backend.delete_many(["d/y", "d/z", "d/missing"])
        assert list(backend.list("d/")) == []

    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/.", "a\\b"])
    def test_bad_keys_refused(self, backend: Backend, key: str) -> None:
        with pytest.raises(InvalidInput):
            backend.put_bytes(key, b"x")

    def test_put_streams_without_reading_everything_at_once(self, backend: Backend) -> None:
        source = CountingReader(40 * 1024 * 1024, b"memory-like page " * 241)
        info = backend.put("big/object", source)
        assert info.size == 40 * 1024 * 1024
        assert source.largest_read <= 16 * 1024 * 1024
        assert backend.stat("big/object").size == 40 * 1024 * 1024

    def test_concurrent_create_only_puts_one_winner(self, backend: Backend) -> None:
        results: list[str] = []

        def writer(i: int) -> None:
            try:
                backend.put_bytes("race/key", f"writer-{i}".encode() * 1000)
                results.append("ok")
            except ObjectExists:
                results.append("exists")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("ok") == 1
        data = backend.read_bytes("race/key")
        assert data.startswith(b"writer-") and len(set(data.split(b"-")[1:])) >= 1

    def test_abort_incomplete_reports_a_count(self, backend: Backend) -> None:
        assert backend.abort_incomplete(timedelta(0)) >= 0
        backend.put_bytes("keep/me", b"1")
        backend.abort_incomplete(timedelta(0))
        assert backend.read_bytes("keep/me") == b"1"
