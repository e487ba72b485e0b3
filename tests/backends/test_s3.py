"""S3Backend against moto's server over real HTTP with real boto3 (see conftest.py).

Faults are injected with botocore event hooks on the backend's own client -- ``before-send``
handlers that answer instead of the server or raise a connection error, ``after-call`` handlers
that alter what the server said -- never by patching backupd.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import urllib3.exceptions
from botocore.awsrequest import AWSResponse, HeadersDict
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from botocore.response import StreamingBody
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.backends.s3 import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3Backend,
    capacity,
    part_size_for,
    translate_s3_error,
)
from backupd.errors import (
    BackupdError,
    BatchDeleteError,
    ConfigError,
    IntegrityError,
    ObjectExists,
    StorageAuthError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
)
from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET, FAKE_TOKEN, REGION, set_moto_auth

from .contract import BackendContract, CountingReader, FailingReader

MiB = 1024 * 1024
TiB = 1024 * 1024 * MiB


class TestS3Contract(BackendContract):
    @pytest.fixture
    def backend(self, make_s3: Callable[..., S3Backend]) -> S3Backend:
        return make_s3()


# -- helpers -------------------------------------------------------------------------------


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


def s3_response(request: Any, status: int, body: bytes = b"") -> AWSResponse:
    headers = HeadersDict({"Content-Type": "application/xml", "Content-Length": str(len(body))})
    return AWSResponse(request.url, status, headers, _Raw(body))


def s3_error(request: Any, status: int, code: str, message: str = "injected by the test") -> AWSResponse:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return s3_response(request, status, body.encode())


def part_number(request: Any) -> int:
    return int(parse_qs(urlsplit(request.url).query)["partNumber"][0])


FOREVER = (503, "ServiceUnavailable", "forever")


class PartFaults:
    """A ``before-send`` hook on UploadPart: per part number, a list of faults to play in order.

    A fault is ``(status, code)`` for an error answer, an exception to raise as the network
    layer would, or ``FOREVER`` (503 on every attempt). Every attempt is counted per part.
    """

    def __init__(self, plan: dict[int, list[Any]]) -> None:
        self.plan = {n: list(faults) for n, faults in plan.items()}
        self.attempts: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        n = part_number(request)
        with self.lock:
            self.attempts[n] = self.attempts.get(n, 0) + 1
            faults = self.plan.get(n) or []
            fault = faults[0] if faults else None
            if faults and fault is not FOREVER:
                faults.pop(0)
        if fault is None:
            return None
        if isinstance(fault, BaseException):
            raise fault
        return s3_error(request, fault[0], fault[1])


def uploads(admin: Any, bucket: str) -> list[dict[str, Any]]:
    return admin.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def keys_in(admin: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in admin.list_objects_v2(Bucket=bucket).get("Contents", [])]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- layout, config, describe --------------------------------------------------------------


def test_keys_are_stored_under_the_prefix(make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str) -> None:
    backend = make_s3(prefix="/prod/cluster-a/")
    backend.put_bytes("ns/wl/ctr/a.tar.zst", b"x")
    s3_admin.put_object(Bucket=s3_bucket, Key="other/b", Body=b"not ours")
    s3_admin.put_object(Bucket=s3_bucket, Key="prod/cluster-a/ns/", Body=b"")  # console folder
    assert keys_in(s3_admin, s3_bucket) == ["other/b", "prod/cluster-a/ns/", "prod/cluster-a/ns/wl/ctr/a.tar.zst"]
    assert [o.key for o in backend.list("")] == ["ns/wl/ctr/a.tar.zst"]
    assert backend.stat("ns/wl/ctr/a.tar.zst").size == 1
    assert make_s3(prefix="").stat("other/b").size == 8


@pytest.mark.parametrize(
    "overrides",
    [
        {"sse": "aws:kms-ish"},
        {"sse_kms_key_id": "k"},  # without sse = aws:kms
        {"part_size": 4 * MiB},
        {"part_size": 6 * 1024 * MiB},
        {"max_concurrency": 0},
        {"addressing_style": "sideways"},
        {"secret_access_key": None},
        {"prefix": "a/../b"},
        {"bucket": ""},
    ],
)
def test_invalid_configuration_is_refused(make_s3: Callable[..., S3Backend], overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        make_s3(**overrides)
    assert FAKE_SECRET not in str(err.value)


def test_describe_and_repr_hold_no_credentials(make_s3: Callable[..., S3Backend], moto_endpoint: str) -> None:
    host = moto_endpoint.removeprefix("http://")
    backend = make_s3(endpoint_url=f"http://{FAKE_ACCESS_KEY}:{FAKE_SECRET}@{host}")
    for text in (backend.describe(), repr(backend), str(vars(backend))):
        assert FAKE_SECRET not in text and FAKE_TOKEN not in text and FAKE_ACCESS_KEY not in text
    assert backend.bucket in backend.describe() and host in backend.describe()


def test_credentials_from_the_environment_chain(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    backend = S3Backend("s3", s3_bucket, endpoint_url=moto_endpoint, region=REGION)
    backend.put_bytes("env/k", b"1")
    assert backend.read_bytes("env/k") == b"1"

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "credentials").write_text("[backup]\naws_access_key_id = p\naws_secret_access_key = ps\n")
    (tmp_path / "config").write_text("[profile backup]\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    backend = S3Backend("s3", s3_bucket, endpoint_url=moto_endpoint, profile="backup")
    assert backend.read_bytes("env/k") == b"1"
    with pytest.raises(ConfigError, match="no-such-profile"):
        S3Backend("s3", s3_bucket, endpoint_url=moto_endpoint, profile="no-such-profile")


def test_storage_class_and_encryption_are_sent(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    kms = make_s3(storage_class="STANDARD_IA", sse="aws:kms", sse_kms_key_id="alias/backupd")
    kms.put_bytes("small", b"x")
    kms.put("big", io.BytesIO(os.urandom(6 * MiB)))
    aes = make_s3(sse="AES256")
    aes.put_bytes("aes", b"y")
    for key in ("prod/small", "prod/big"):
        head = s3_admin.head_object(Bucket=s3_bucket, Key=key)
        assert head["StorageClass"] == "STANDARD_IA"
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"].endswith("alias/backupd")
    assert s3_admin.head_object(Bucket=s3_bucket, Key="prod/aes")["ServerSideEncryption"] == "AES256"


# -- put: multipart, streaming, memory --------------------------------------------------


def test_part_size_grows_so_the_part_ceiling_is_never_hit() -> None:
    assert part_size_for(1, 8 * MiB) == 8 * MiB
    assert part_size_for(1000, 8 * MiB) == 8 * MiB
    assert part_size_for(1000, 5 * MiB) == 5 * MiB
    assert part_size_for(1001, 5 * MiB) == 16 * MiB
    assert part_size_for(1001, 8 * MiB) == 16 * MiB
    assert part_size_for(2001, 8 * MiB) == 32 * MiB
    assert part_size_for(MAX_PARTS, 8 * MiB) == 4096 * MiB
    assert part_size_for(1001, MAX_PART_SIZE) == MAX_PART_SIZE
    assert capacity(8 * MiB) > 7 * TiB
    assert capacity(MIN_PART_SIZE) > 5 * TiB  # S3's object limit, with the smallest legal base
    with pytest.raises(ValueError):
        part_size_for(0, 8 * MiB)


@settings(max_examples=40, deadline=None)
@given(base=st.integers(MIN_PART_SIZE, MAX_PART_SIZE), n=st.integers(1, MAX_PARTS - 1))
def test_part_sizes_are_legal_and_never_shrink(base: int, n: int) -> None:
    assert MIN_PART_SIZE <= part_size_for(n, base) <= part_size_for(n + 1, base) <= MAX_PART_SIZE


@settings(max_examples=10, deadline=None)
@given(base=st.integers(MIN_PART_SIZE, MAX_PART_SIZE))
def test_ten_thousand_parts_always_hold_the_largest_s3_object(base: int) -> None:
    assert capacity(base) >= 5 * TiB


def test_parts_follow_the_part_size_and_stay_bounded_in_flight(
    make_s3: Callable[..., S3Backend], s3_bucket: str
) -> None:
    backend = make_s3(max_concurrency=2)
    sizes: list[int] = []
    state = {"in_flight": 0, "max_in_flight": 0, "acked": 0, "max_ahead": 0}
    lock = threading.Lock()

    class Source(CountingReader):
        def read(self, n: int = -1) -> bytes:
            data = super().read(n)
            with lock:
                ahead = (40 * MiB - self.remaining) - state["acked"]
                state["max_ahead"] = max(state["max_ahead"], ahead)
            return data

    def before(request: Any, **_: Any) -> None:
        with lock:
            sizes.append(int(request.headers["Content-Length"]))
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        time.sleep(0.05)  # widen the window in which parts overlap

    def after(http_response: Any, parsed: Any, model: Any, **_: Any) -> None:
        with lock:
            state["in_flight"] -= 1
            state["acked"] += 5 * MiB

    backend.client.meta.events.register("before-send.s3.UploadPart", before)
    backend.client.meta.events.register("after-call.s3.UploadPart", after)
    source = Source(40 * MiB + 123, b"page " * 100)
    backend.put("k", source)
    assert sorted(sizes) == [123] + [5 * MiB] * 8
    assert state["max_in_flight"] == 2
    # the reader never runs ahead of the uploads by more than the in-flight parts + the next one
    assert state["max_ahead"] <= (2 + 1) * 5 * MiB
    assert source.largest_read <= 5 * MiB


BIG_PUT_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys, time, tracemalloc
    from backupd.backends.s3 import S3Backend
    from tests.backends.contract import CountingReader

    endpoint, bucket, total = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Hashing(CountingReader):
        def __init__(self, *a):
            super().__init__(*a)
            self.sha = hashlib.sha256()
        def read(self, n=-1):
            data = super().read(n)
            self.sha.update(data)
            return data

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def reset_peak_rss():
        # getrusage's ru_maxrss is useless here: after fork+exec it still holds the parent's
        # peak (this test's parent holds moto's copy of the object). VmHWM is this process's own
        # peak, and writing 5 to clear_refs resets it.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    backend = S3Backend("s3", bucket, endpoint_url=endpoint, region="us-east-1",
                        access_key_id="k", secret_access_key="s")
    source = Hashing(total, bytes(range(256)) * 64 + b"checkpoint")
    tracemalloc.start()
    base = reset_peak_rss()
    t0 = time.monotonic()
    info = backend.put("big/1gib.tar.zst", source)
    put_s = time.monotonic() - t0
    put_rss = status("VmHWM") - base
    put_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    base = reset_peak_rss()
    sha = hashlib.sha256()
    t1 = time.monotonic()
    with backend.open("big/1gib.tar.zst") as stream:
        while chunk := stream.read(8 * 1024 * 1024):
            sha.update(chunk)
    t2 = time.monotonic()
    get_rss = status("VmHWM") - base
    get_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    etag = backend.client.head_object(Bucket=bucket, Key="big/1gib.tar.zst")["ETag"]
    print(json.dumps({
        "size": info.size, "stat_size": backend.stat("big/1gib.tar.zst").size,
        "source_sha": source.sha.hexdigest(), "read_sha": sha.hexdigest(),
        "parts": int(etag.strip('"').rpartition("-")[2] or 1),
        "put_s": put_s, "get_s": t2 - t1,
        "put_tracemalloc_peak": put_peak, "get_tracemalloc_peak": get_peak,
        "put_rss_growth": put_rss, "get_rss_growth": get_rss,
        "largest_read": source.largest_read,
    }))
    """
)


def test_one_gib_stream_put_and_get_with_bounded_memory(moto_endpoint: str, s3_bucket: str) -> None:
    """The client runs in its own process so that moto's memory (it holds the whole object, in
    this process) is not counted; the default part size (8 MiB) and concurrency (4) are used."""
    total = 1024 * MiB
    proc = subprocess.run(
        [sys.executable, "-c", BIG_PUT_SCRIPT, moto_endpoint, s3_bucket, str(total)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"\n1 GiB put: {result['put_s']:.1f}s ({total / MiB / result['put_s']:.0f} MiB/s), "
        f"get: {result['get_s']:.1f}s ({total / MiB / result['get_s']:.0f} MiB/s), "
        f"parts: {result['parts']}, tracemalloc peak put/get: {result['put_tracemalloc_peak'] / MiB:.1f}/"
        f"{result['get_tracemalloc_peak'] / MiB:.1f} MiB, peak RSS growth put/get: "
        f"{result['put_rss_growth'] / MiB:.1f}/{result['get_rss_growth'] / MiB:.1f} MiB"
    )
    assert result["size"] == result["stat_size"] == total
    assert result["read_sha"] == result["source_sha"]
    assert result["parts"] == total // (8 * MiB)
    assert result["largest_read"] <= 8 * MiB
    assert result["put_tracemalloc_peak"] < 200 * MiB
    assert result["get_tracemalloc_peak"] < 200 * MiB
    assert result["put_rss_growth"] < 200 * MiB
    assert result["get_rss_growth"] < 200 * MiB


# -- failure leaves nothing -------------------------------------------------------------


def test_source_failing_mid_multipart_aborts_the_upload(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()
    with pytest.raises(OSError, match="source broke"):
        backend.put("k/partial", FailingReader(os.urandom(12 * MiB)))  # two parts sent, then the break
    assert keys_in(s3_admin, s3_bucket) == []
    assert uploads(s3_admin, s3_bucket) == []


def test_permanent_error_on_a_part_fails_at_once_and_aborts(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()
    faults = PartFaults({2: [(403, "AccessDenied")] * 10})
    backend.client.meta.events.register("before-send.s3.UploadPart", faults)
    with pytest.raises(StorageAuthError) as err:
        backend.put("k", io.BytesIO(os.urandom(16 * MiB)))
    assert faults.attempts[2] == 1
    assert s3_bucket in str(err.value) and "AccessDenied" in str(err.value)
    assert not err.value.retryable
    assert keys_in(s3_admin, s3_bucket) == [] and uploads(s3_admin, s3_bucket) == []


@pytest.mark.parametrize("request_attempts", [1, 3])
def test_transient_part_failures_are_recovered(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str, request_attempts: int
) -> None:
    """request_attempts=1: botocore does not retry, the part-level loop does; 3: botocore does."""
    backend = make_s3(request_attempts=request_attempts, part_attempts=4, max_concurrency=3)
    faults = PartFaults(
        {
            1: [(500, "InternalError")],
            2: [(503, "SlowDown"), (503, "ServiceUnavailable")],
            3: [ConnectionClosedError(endpoint_url="http://injected")],
            4: [ConnectionResetError(104, "Connection reset by peer")],
            5: [ReadTimeoutError(endpoint_url="http://injected"), (429, "TooManyRequests")],
        }
    )
    backend.client.meta.events.register("before-send.s3.UploadPart", faults)
    data = os.urandom(25 * MiB + 7)
    info = backend.put("ns/wl/ctr/x.tar.zst", io.BytesIO(data))
    assert info.size == len(data)
    assert faults.attempts == {1: 2, 2: 3, 3: 2, 4: 2, 5: 3, 6: 1}
    assert sha256(backend.read_bytes("ns/wl/ctr/x.tar.zst", limit=64 * MiB)) == sha256(data)
    assert uploads(s3_admin, s3_bucket) == []


def test_part_retries_are_bounded_then_the_upload_is_aborted(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3(request_attempts=2, part_attempts=3)
    faults = PartFaults({2: [FOREVER]})
    backend.client.meta.events.register("before-send.s3.UploadPart", faults)
    with pytest.raises(StorageUnavailable) as err:
        backend.put("k", io.BytesIO(os.urandom(12 * MiB)))
    assert err.value.retryable
    assert faults.attempts[2] == 2 * 3  # botocore attempts x part attempts
    assert keys_in(s3_admin, s3_bucket) == [] and uploads(s3_admin, s3_bucket) == []


def test_transient_failure_on_a_single_put_is_recovered(make_s3: Callable[..., S3Backend]) -> None:
    backend = make_s3(request_attempts=1)
    calls = []

    def flaky(request: Any, **_: Any) -> AWSResponse | None:
        calls.append(1)
        return s3_error(request, 503, "SlowDown") if len(calls) == 1 else None

    backend.client.meta.events.register("before-send.s3.PutObject", flaky)
    backend.put_bytes("m.json", b"{}")
    assert len(calls) == 2 and backend.read_bytes("m.json") == b"{}"


# -- create-only ---------------------------------------------------------------------------


def test_multipart_put_on_an_existing_key_fails_before_uploading(make_s3: Callable[..., S3Backend]) -> None:
    backend = make_s3()
    backend.put_bytes("k", b"first")
    faults = PartFaults({})
    backend.client.meta.events.register("before-send.s3.UploadPart", faults)
    with pytest.raises(ObjectExists):
        backend.put("k", io.BytesIO(os.urandom(11 * MiB)))
    assert faults.attempts == {}
    assert backend.read_bytes("k") == b"first"


def test_conditional_complete_loses_a_race_cleanly(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    """Another node writes the key while our parts upload: the server refuses our completion."""
    backend = make_s3()

    def rival_writes_first(request: Any, **_: Any) -> None:
        s3_admin.put_object(Bucket=s3_bucket, Key="prod/k", Body=b"rival")

    backend.client.meta.events.register("before-send.s3.CompleteMultipartUpload", rival_writes_first)
    with pytest.raises(ObjectExists):
        backend.put("k", io.BytesIO(os.urandom(11 * MiB)))
    assert backend.read_bytes("k") == b"rival"
    assert uploads(s3_admin, s3_bucket) == []


def test_retried_conditional_put_whose_first_attempt_landed_succeeds(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    """The first PutObject reaches S3 but its answer is lost; botocore's retry then gets 412."""
    backend = make_s3(request_attempts=3)

    def lands_then_drops(data: bytes) -> Callable[..., None]:
        sent = []

        def hook(request: Any, **_: Any) -> None:
            if not sent:
                sent.append(1)
                digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
                s3_admin.put_object(
                    Bucket=s3_bucket, Key=urlsplit(request.url).path.split("/", 2)[2], Body=data,
                    ChecksumAlgorithm="SHA256", ChecksumSHA256=digest,
                )
                raise ConnectionClosedError(endpoint_url=request.url)

        return hook

    backend.client.meta.events.register("before-send.s3.PutObject", lands_then_drops(b"mine"), unique_id="a")
    assert backend.put_bytes("ours", b"mine").size == 4
    assert backend.read_bytes("ours") == b"mine"
    backend.client.meta.events.unregister("before-send.s3.PutObject", unique_id="a")
    # same story, but what landed is someone else's bytes: that is a real conflict
    backend.client.meta.events.register("before-send.s3.PutObject", lands_then_drops(b"theirs"), unique_id="b")
    with pytest.raises(ObjectExists):
        backend.put_bytes("theirs", b"mine")


# -- integrity -------------------------------------------------------------------------------


def test_part_checksum_mismatch_reported_by_the_server_aborts(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()

    def lie(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ChecksumSHA256"] = base64.b64encode(b"\0" * 32).decode()

    backend.client.meta.events.register("after-call.s3.UploadPart", lie)
    with pytest.raises(IntegrityError) as err:
        backend.put("k", io.BytesIO(os.urandom(11 * MiB)))
    assert not err.value.retryable
    assert keys_in(s3_admin, s3_bucket) == [] and uploads(s3_admin, s3_bucket) == []


def test_bytes_corrupted_in_transit_are_caught_at_completion(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    """A bit flips in part 2's body after its checksum was computed. Real S3 refuses such a part
    (BadDigest); moto stores it, so the composite checksum of the completed object gives it away
    -- and the object is removed again."""
    backend = make_s3()

    def flip(request: Any, **_: Any) -> None:
        if part_number(request) == 2:
            body = request.body if isinstance(request.body, bytes) else request.body.read()
            request.body = bytes([body[0] ^ 0x01]) + body[1:]

    backend.client.meta.events.register("before-send.s3.UploadPart", flip)
    with pytest.raises(IntegrityError, match="checksum"):
        backend.put("k", io.BytesIO(os.urandom(11 * MiB)))
    assert keys_in(s3_admin, s3_bucket) == [] and uploads(s3_admin, s3_bucket) == []


def test_completion_checksum_mismatch_removes_the_object(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()

    def lie(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ChecksumSHA256"] = base64.b64encode(b"\1" * 32).decode() + "-3"

    backend.client.meta.events.register("after-call.s3.CompleteMultipartUpload", lie)
    with pytest.raises(IntegrityError, match="deleted"):
        backend.put("k", io.BytesIO(os.urandom(11 * MiB)))
    assert keys_in(s3_admin, s3_bucket) == [] and uploads(s3_admin, s3_bucket) == []


def test_single_put_checksum_mismatch_removes_the_object(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()

    def lie(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ChecksumSHA256"] = base64.b64encode(b"\2" * 32).decode()

    backend.client.meta.events.register("after-call.s3.PutObject", lie)
    with pytest.raises(IntegrityError):
        backend.put_bytes("m.json", b"{}")
    assert keys_in(s3_admin, s3_bucket) == []


def test_reading_an_object_that_does_not_match_its_checksum_fails(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    s3_admin.put_object(
        Bucket=s3_bucket, Key="prod/rotten", Body=b"stored bytes", ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong
    )
    with pytest.raises(IntegrityError):
        make_s3().read_bytes("rotten")


def test_connection_dropped_while_reading_is_translated(make_s3: Callable[..., S3Backend]) -> None:
    backend = make_s3()
    backend.put_bytes("k", b"x" * 100_000)

    class Dropping(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def read(self, n: int = -1) -> bytes:
            if self.sent:
                raise urllib3.exceptions.ProtocolError("Connection broken: connection reset")
            self.sent = 1000
            return b"x" * 1000

    def drop(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Body"] = StreamingBody(Dropping(), 100_000)

    backend.client.meta.events.register("after-call.s3.GetObject", drop)
    with backend.open("k") as stream:
        with pytest.raises(StorageUnavailable):
            stream.read()


# -- errors: auth, missing bucket, unreachable, no secrets in messages -------------------


@pytest.fixture
def moto_user(moto_endpoint: str, s3_bucket: str) -> Any:
    """An IAM user allowed only to list the bucket, with moto's IAM authentication switched on
    for the duration of the test (server-wide; pytest runs tests one at a time)."""
    iam = boto3.session.Session().client(
        "iam", endpoint_url=moto_endpoint, region_name=REGION, aws_access_key_id="a", aws_secret_access_key="a"
    )
    name = f"backupd-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    iam.put_user_policy(
        UserName=name,
        PolicyName="list-only",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{s3_bucket}"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=name)["AccessKey"]
    set_moto_auth(moto_endpoint, True)
    try:
        yield key
    finally:
        set_moto_auth(moto_endpoint, False)


def test_access_denied_fails_clearly_without_retries(
    make_s3: Callable[..., S3Backend], s3_bucket: str, moto_user: Any
) -> None:
    backend = make_s3(access_key_id=moto_user["AccessKeyId"], secret_access_key=moto_user["SecretAccessKey"],
                      session_token=None)
    assert list(backend.list("")) == []  # allowed
    sent = []
    backend.client.meta.events.register("before-send.s3.*", lambda request, **_: sent.append(request.method))
    for op in (lambda: backend.put_bytes("k", b"x"), lambda: backend.put("big", io.BytesIO(b"x" * 6 * MiB)),
               lambda: backend.open("k")):
        sent.clear()
        with pytest.raises(StorageAuthError) as err:
            op()
        assert len(sent) == 1, sent  # no retry of a permanent error
        assert f"bucket {s3_bucket!r}" in str(err.value) and "access denied" in str(err.value)
        assert not err.value.retryable


def test_wrong_credentials_fail_clearly_and_never_leak(
    make_s3: Callable[..., S3Backend], s3_bucket: str, moto_user: Any
) -> None:
    wrong_secret = make_s3(access_key_id=moto_user["AccessKeyId"], session_token=None)  # with FAKE_SECRET
    with pytest.raises(StorageAuthError, match="SignatureDoesNotMatch") as err1:
        wrong_secret.put_bytes("k", b"x")
    unknown_key = make_s3(session_token=None)
    with pytest.raises(StorageAuthError, match="InvalidAccessKeyId") as err2:
        unknown_key.put_bytes("k", b"x")
    assert_no_secrets(err1.value, err2.value)


def test_missing_bucket_message(make_s3: Callable[..., S3Backend]) -> None:
    backend = make_s3(bucket="no-such-bucket-here")
    expected = "bucket 'no-such-bucket-here' does not exist (NoSuchBucket) -- create it or fix [[backends]] bucket"
    for op in (lambda: backend.put_bytes("k", b"x"), lambda: list(backend.list("")), lambda: backend.open("k"),
               lambda: backend.delete("k")):
        with pytest.raises(StorageNotFound) as err:
            op()
        assert expected in str(err.value)


def test_unreachable_endpoint_is_retryable_and_secret_free() -> None:
    backend = S3Backend(
        "s3", "b", endpoint_url="http://127.0.0.1:9", region=REGION, access_key_id=FAKE_ACCESS_KEY,
        secret_access_key=FAKE_SECRET, session_token=FAKE_TOKEN, request_attempts=1, part_attempts=1,
    )
    with pytest.raises(StorageUnavailable) as err:
        backend.put_bytes("k", b"x")
    assert err.value.retryable
    assert_no_secrets(err.value)


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_verification_failure_is_permanent_and_names_the_fix(tmp_path: Path) -> None:
    import socket
    import ssl

    server_cert, server_key = _self_signed(tmp_path, "server")
    other_ca, _ = _self_signed(tmp_path, "other-ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        backend = S3Backend("s3", "b", endpoint_url=f"https://127.0.0.1:{port}", region=REGION,
                            access_key_id="k", secret_access_key="s", ca_bundle=other_ca, part_attempts=1)
        with pytest.raises(StorageError, match="ca_bundle") as err:
            backend.stat("k")
        assert not err.value.retryable and not isinstance(err.value, StorageUnavailable)
    finally:
        listener.close()


def test_credentials_never_appear_in_errors(make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str) -> None:
    backend = make_s3()
    errors: list[BaseException] = []
    backend.client.meta.events.register(
        "before-send.s3.UploadPart",
        lambda request, **_: s3_error(request, 500, "InternalError", f"echo {FAKE_SECRET} {FAKE_TOKEN}"),
    )
    for op in (
        lambda: backend.put("big", io.BytesIO(b"x" * 6 * MiB)),
        lambda: backend.open("missing"),
        lambda: make_s3(bucket="missing-bucket").put_bytes("k", b"x"),
        lambda: make_s3(sse="bogus"),
    ):
        with pytest.raises(BackupdError) as err:
            op()
        errors.append(err.value)
    assert_no_secrets(*errors)
    assert "***" in str(errors[0])  # the server's echo was scrubbed


def assert_no_secrets(*errors: BaseException) -> None:
    for error in errors:
        texts = [str(error), repr(error), "".join(traceback.format_exception(error))]
        for text in texts:
            for secret in (FAKE_SECRET, FAKE_TOKEN):
                assert secret not in text, text


@pytest.mark.parametrize(
    ("code", "status", "expected", "retryable"),
    [
        ("InternalError", 500, StorageUnavailable, True),
        ("ServiceUnavailable", 503, StorageUnavailable, True),
        ("SlowDown", 503, StorageUnavailable, True),
        ("RequestTimeout", 400, StorageUnavailable, True),
        ("AccessDenied", 403, StorageAuthError, False),
        ("InvalidAccessKeyId", 403, StorageAuthError, False),
        ("SignatureDoesNotMatch", 403, StorageAuthError, False),
        ("ExpiredToken", 400, StorageAuthError, False),
        ("NoSuchBucket", 404, StorageNotFound, False),
        ("NoSuchKey", 404, StorageNotFound, False),
        ("404", 404, StorageNotFound, False),
        ("PreconditionFailed", 412, ObjectExists, False),
        ("BadDigest", 400, IntegrityError, False),
        ("InvalidArgument", 400, StorageError, False),
    ],
)
def test_translation_table(code: str, status: int, expected: type, retryable: bool) -> None:
    exc = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")
    err = translate_s3_error(exc, what="doing", bucket="b")
    assert type(err) is expected and err.retryable is retryable
    for foreign in (EndpointConnectionError(endpoint_url="x"), ConnectionResetError(), TimeoutError()):
        assert isinstance(translate_s3_error(foreign, what="doing", bucket="b"), StorageUnavailable)


# -- delete_many, abort_incomplete ----------------------------------------------------------


def test_delete_many_batches_a_thousand_keys_per_request(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()
    existing = [f"k/{i:04d}" for i in range(0, 2001, 7)]
    threads = [
        threading.Thread(target=lambda ks=existing[i::8]: [backend.put_bytes(k, b"1") for k in ks]) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches: list[int] = []
    backend.client.meta.events.register(
        "before-send.s3.DeleteObjects", lambda request, **_: batches.append(request.body.count(b"<Object>"))
    )
    backend.delete_many(f"k/{i:04d}" for i in range(2001))  # a generator: length unknown
    assert batches == [1000, 1000, 1]
    assert keys_in(s3_admin, s3_bucket) == []


def test_delete_many_reports_per_key_errors(make_s3: Callable[..., S3Backend]) -> None:
    backend = make_s3()
    for k in ("a", "b", "c"):
        backend.put_bytes(k, b"1")

    def partial(request: Any, **_: Any) -> AWSResponse:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><DeleteResult>'
            "<Error><Key>prod/b</Key><Code>InternalError</Code><Message>try again</Message></Error>"
            "<Error><Key>prod/c</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            "</DeleteResult>"
        )
        return s3_response(request, 200, body.encode())

    backend.client.meta.events.register("before-send.s3.DeleteObjects", partial)
    with pytest.raises(BatchDeleteError) as err:
        backend.delete_many(["a", "b", "c"])
    assert set(err.value.failures) == {"b", "c"}
    assert isinstance(err.value.failures["b"], StorageUnavailable)
    assert isinstance(err.value.failures["c"], StorageAuthError)
    assert not err.value.retryable  # one failure is permanent


def test_abort_incomplete_aborts_old_uploads_under_the_prefix_only(
    make_s3: Callable[..., S3Backend], s3_admin: Any, s3_bucket: str
) -> None:
    backend = make_s3()
    s3_admin.create_multipart_upload(Bucket=s3_bucket, Key="prod/ns/crashed.tar.zst")
    s3_admin.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/x")
    # moto reports every upload as initiated on 2010-11-10, so "younger than a century" keeps it
    assert backend.abort_incomplete(timedelta(days=36500)) == 0
    assert backend.abort_incomplete(timedelta(days=1)) == 1
    assert [u["Key"] for u in uploads(s3_admin, s3_bucket)] == ["elsewhere/x"]


# -- restore without backupd -------------------------------------------------------------------


def test_aws_cli_reads_what_backupd_wrote(
    make_s3: Callable[..., S3Backend], moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    aws = shutil.which("aws")
    if aws is None:
        pytest.skip("the AWS CLI (aws) is not on PATH")
    backend = make_s3(sse="AES256")
    data = os.urandom(11 * MiB + 5)  # multipart: 3 parts
    backend.put("ns/wl/ctr/20250101T000000Z-a.tar.zst", io.BytesIO(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    proc = subprocess.run(
        [aws, "--endpoint-url", moto_endpoint, "s3", "cp",
         f"s3://{s3_bucket}/prod/ns/wl/ctr/20250101T000000Z-a.tar.zst", "-"],
        capture_output=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert sha256(proc.stdout) == sha256(data)
