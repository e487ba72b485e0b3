from __future__ import annotations

import io
import os
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.backends.memory import MemoryBackend
from backupd.backends.wrappers import DryRunBackend, Fault, FaultInjectingBackend, PlannedAction, RetryingBackend
from backupd.errors import (
    BackupdError,
    InvalidInput,
    ObjectExists,
    StorageAuthError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
)

from .contract import BackendContract, CountingReader


class TestRetryingContract(BackendContract):
    @pytest.fixture
    def backend(self) -> RetryingBackend:
        return RetryingBackend(MemoryBackend("mem"), sleep=lambda _: None)


class TestFaultInjectingContract(BackendContract):
    """With no faults planned, the fault injector is exactly the backend it wraps."""

    @pytest.fixture
    def backend(self) -> FaultInjectingBackend:
        return FaultInjectingBackend(MemoryBackend("mem"), [])


class Sleeps(list[float]):
    def __call__(self, delay: float) -> None:
        self.append(delay)


def retrying(inner: Any, **kwargs: Any) -> tuple[RetryingBackend, Sleeps, list[tuple[str, int, str, float]]]:
    sleeps = Sleeps()
    retries: list[tuple[str, int, str, float]] = []
    backend = RetryingBackend(
        inner,
        sleep=sleeps,
        on_retry=lambda op, attempt, err, delay: retries.append((op, attempt, err.kind, delay)),
        **kwargs,
    )
    return backend, sleeps, retries


def unavailable() -> StorageUnavailable:
    return StorageUnavailable("injected: S3 is throttling")


# -- RetryingBackend -------------------------------------------------------------------------


def test_retryable_errors_are_retried_with_bounded_jittered_backoff() -> None:
    faulty = FaultInjectingBackend(MemoryBackend(), [Fault("stat", error=unavailable, times=3)])
    backend, sleeps, retries = retrying(faulty, attempts=5, base_delay=1.0, max_delay=3.0)
    assert backend.stat("a/b") is None
    assert [r[:3] for r in retries] == [("stat", 1, "StorageUnavailable"), ("stat", 2, "StorageUnavailable"),
                                        ("stat", 3, "StorageUnavailable")]
    assert len(sleeps) == 3 and sleeps == [r[3] for r in retries]
    for attempt, delay in enumerate(sleeps, start=1):
        assert 0 <= delay <= min(3.0, 1.0 * 2 ** (attempt - 1))


@settings(max_examples=50, deadline=None)
@given(attempt=st.integers(1, 40), base=st.floats(0.001, 5), cap=st.floats(0.001, 60))
def test_backoff_is_full_jitter_under_the_cap(attempt: int, base: float, cap: float) -> None:
    backend = RetryingBackend(MemoryBackend(), base_delay=base, max_delay=cap)
    assert 0 <= backend.delay(attempt) <= min(cap, base * 2 ** (attempt - 1))


def test_attempts_run_out_with_the_last_error() -> None:
    faulty = FaultInjectingBackend(MemoryBackend(), [Fault("delete", error=unavailable, times=None)])
    backend, sleeps, _ = retrying(faulty, attempts=4)
    with pytest.raises(StorageUnavailable):
        backend.delete("k")
    assert len(sleeps) == 3
    assert len(faulty.fired) == 4


@pytest.mark.parametrize(
    "error", [StorageAuthError("denied"), StorageNotFound("no bucket"), InvalidInput("bad"), ValueError("bug")]
)
def test_non_retryable_errors_pass_through_at_once(error: BaseException) -> None:
    faulty = FaultInjectingBackend(MemoryBackend(), [Fault("open", error=error, times=None)])
    backend, sleeps, _ = retrying(faulty)
    with pytest.raises(type(error)):
        backend.open("k")
    assert sleeps == [] and len(faulty.fired) == 1


def test_put_with_a_seekable_source_is_retried_from_where_it_started() -> None:
    inner = MemoryBackend()
    data = os.urandom(300_000)
    # the source breaks mid-stream twice, as a dying connection would
    faulty = FaultInjectingBackend(inner, [Fault("put", error=unavailable, at_byte=100_000, times=2)])
    backend, sleeps, retries = retrying(faulty)
    source = io.BytesIO(b"header-not-part-of-the-object" + data)
    source.seek(29)
    info = backend.put("ns/a.tar.zst", source)
    assert info.size == len(data)
    assert inner.read_bytes("ns/a.tar.zst") == data
    assert [r[0] for r in retries] == ["put", "put"]


def test_put_with_an_unseekable_source_is_not_retried() -> None:
    faulty = FaultInjectingBackend(MemoryBackend(), [Fault("put", error=unavailable)])
    backend, sleeps, _ = retrying(faulty)
    with pytest.raises(StorageUnavailable):
        backend.put("k", CountingReader(1000, b"x"))
    assert sleeps == []

    class Pipe(io.RawIOBase):  # has seek/tell, but says it cannot seek
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, b: Any) -> int:
            return 0

    faulty.add(Fault("put", error=unavailable))
    with pytest.raises(StorageUnavailable):
        backend.put("k", Pipe())
    assert sleeps == []


def test_put_retried_after_a_lost_reply_says_the_object_may_be_its_own() -> None:
    inner = MemoryBackend()
    faulty = FaultInjectingBackend(inner, [Fault("put", error=unavailable, after=True)])
    backend, _, _ = retrying(faulty)
    with pytest.raises(ObjectExists) as err:
        backend.put("k", io.BytesIO(b"data"))
    assert "may be that attempt's" in "\n".join(getattr(err.value, "__notes__", []))
    assert inner.read_bytes("k") == b"data"


def test_list_is_retried_only_before_the_first_object() -> None:
    inner = MemoryBackend()
    for k in ("a/1", "a/2"):
        inner.put_bytes(k, b"1")
    faulty = FaultInjectingBackend(inner, [Fault("list", error=unavailable)])
    backend, sleeps, _ = retrying(faulty)
    assert sorted(o.key for o in backend.list("a/")) == ["a/1", "a/2"]
    assert len(sleeps) == 1

    faulty.add(Fault("list", error=unavailable, after=True))  # fails after yielding everything
    with pytest.raises(StorageUnavailable):
        list(backend.list("a/"))
    assert len(sleeps) == 1


def test_delete_many_retries_the_whole_batch_even_from_a_generator() -> None:
    inner = MemoryBackend()
    for k in ("d/1", "d/2"):
        inner.put_bytes(k, b"1")
    faulty = FaultInjectingBackend(inner, [Fault("delete_many", key="d/2", error=unavailable)])
    backend, sleeps, _ = retrying(faulty)
    backend.delete_many(k for k in ("d/1", "d/2"))
    assert list(inner.list("")) == [] and len(sleeps) == 1


def test_retrying_keeps_name_and_description() -> None:
    backend = RetryingBackend(MemoryBackend("primary"))
    assert backend.name == "primary" and backend.describe() == "primary"
    with pytest.raises(InvalidInput):
        RetryingBackend(MemoryBackend(), attempts=0)


# -- DryRunBackend --------------------------------------------------------------------------------


def test_dry_run_reads_pass_through_and_writes_are_only_recorded() -> None:
    inner = MemoryBackend("real")
    inner.put_bytes("keep/a", b"aaa")
    dry = DryRunBackend(inner)
    assert dry.read_bytes("keep/a") == b"aaa"
    assert dry.stat("keep/a").size == 3
    assert [o.key for o in dry.list("keep/")] == ["keep/a"]

    source = CountingReader(5_000_000, b"tar")
    assert dry.put("new/b", source).size == 5_000_000
    assert source.remaining == 0  # the source was consumed as a real put would
    dry.delete("keep/a")
    dry.delete_many(["keep/a", "gone/x"])
    assert dry.abort_incomplete(timedelta(0)) == 0
    assert dry.planned == [
        PlannedAction("put", "new/b", 5_000_000),
        PlannedAction("delete", "keep/a"),
        PlannedAction("delete", "keep/a"),
        PlannedAction("delete", "gone/x"),
        PlannedAction("abort_incomplete", None),
    ]
    assert [o.key for o in inner.list("")] == ["keep/a"] and inner.read_bytes("keep/a") == b"aaa"
    assert "dry run" in dry.describe()


def test_dry_run_put_refuses_what_the_real_put_would() -> None:
    inner = MemoryBackend()
    inner.put_bytes("k", b"1")
    dry = DryRunBackend(inner)
    with pytest.raises(ObjectExists):
        dry.put_bytes("k", b"2")
    with pytest.raises(InvalidInput):
        dry.put_bytes("../escape", b"2")
    with pytest.raises(InvalidInput):
        dry.delete("/abs")
    assert dry.planned == []


# -- FaultInjectingBackend -------------------------------------------------------------------------


def test_faults_match_operation_key_pattern_and_count() -> None:
    inner = MemoryBackend()
    inner.put_bytes("ns/a.json", b"{}")
    inner.put_bytes("ns/a.tar.zst", b"tar")
    faulty = FaultInjectingBackend(inner, [Fault("open", key="*.tar.zst", error=StorageError("boom"), times=2)])
    assert faulty.read_bytes("ns/a.json") == b"{}"
    for _ in range(2):
        with pytest.raises(StorageError, match="boom"):
            faulty.open("ns/a.tar.zst")
    assert faulty.read_bytes("ns/a.tar.zst") == b"tar"
    assert [(op, key) for op, key, _ in faulty.fired] == [("open", "ns/a.tar.zst")] * 2


def test_error_before_the_operation_changes_nothing_after_changes_it() -> None:
    inner = MemoryBackend()
    faulty = FaultInjectingBackend(inner)
    faulty.add(Fault("put", error=unavailable))
    with pytest.raises(StorageUnavailable):
        faulty.put_bytes("k", b"1")
    assert inner.stat("k") is None
    faulty.add(Fault("put", error=unavailable, after=True))
    with pytest.raises(StorageUnavailable):
        faulty.put_bytes("k", b"1")
    assert inner.read_bytes("k") == b"1"


def test_truncation_and_bit_flips_on_read() -> None:
    inner = MemoryBackend()
    data = bytes(range(256)) * 4000
    inner.put_bytes("k", data)
    faulty = FaultInjectingBackend(inner, [Fault("open", truncate_at=1000)])
    assert faulty.read_bytes("k") == data[:1000]

    faulty.add(Fault("open", flip_bit=8 * 500_000 + 3))
    read = faulty.read_bytes("k")
    assert len(read) == len(data)
    assert [i for i in range(len(data)) if read[i] != data[i]] == [500_000]
    assert read[500_000] == data[500_000] ^ 0b1000

    faulty.add(Fault("open", error=unavailable, at_byte=300_000))
    with faulty.open("k") as stream:
        assert stream.read(300_000) == data[:300_000]
        with pytest.raises(StorageUnavailable):
            stream.read(1)
    assert faulty.read_bytes("k") == data


def test_truncation_and_bit_flips_on_write() -> None:
    inner = MemoryBackend()
    data = os.urandom(3 * 1024 * 1024)
    faulty = FaultInjectingBackend(inner, [Fault("put", key="cut", truncate_at=10),
                                           Fault("put", key="flip", flip_bit=0)])
    faulty.put("cut", io.BytesIO(data))
    faulty.put("flip", io.BytesIO(data))
    assert inner.read_bytes("cut") == data[:10]
    assert inner.read_bytes("flip") == bytes([data[0] ^ 1]) + data[1:]


def test_mid_stream_put_failure_reaches_the_backend_as_a_source_error(tmp_path: Any) -> None:
    from backupd.backends.filesystem import FilesystemBackend

    inner = FilesystemBackend("fs", tmp_path)
    faulty = FaultInjectingBackend(inner, [Fault("put", error=unavailable, at_byte=2 * 1024 * 1024)])
    with pytest.raises(StorageUnavailable):
        faulty.put("a/b", io.BytesIO(os.urandom(5 * 1024 * 1024)))
    assert list(inner.list("")) == []
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "fault",
    [
        {"operation": "fetch"},
        {"operation": "stat", "flip_bit": 1},
        {"operation": "put", "at_byte": 5},
        {"operation": "put", "after": True},
        {"operation": "put"},
    ],
)
def test_meaningless_faults_are_refused(fault: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        Fault(**fault)


def test_wrappers_stack() -> None:
    inner = MemoryBackend("stack")
    faulty = FaultInjectingBackend(inner, [Fault("*", error=unavailable, times=2)])
    backend, sleeps, _ = retrying(faulty)
    backend.put_bytes("k", b"v")
    assert backend.read_bytes("k") == b"v"
    assert len(sleeps) == 2 and backend.name == "stack"
    assert all(isinstance(f[2].make_error(), BackupdError) for f in faulty.fired)
