"""S3 backend: one object per key under ``<prefix>/`` in a bucket.

How the contract maps onto S3:

* **atomic** -- small sources (less than one part) are one ``PutObject``; larger ones are a
  multipart upload, and an object only appears on ``CompleteMultipartUpload``. On any failure the
  upload is aborted (``AbortMultipartUpload``), so neither an object nor a listed upload remains.
  If even the abort fails, ``abort_incomplete`` or the bucket lifecycle rule removes it later.
* **create-only** -- conditional writes: ``If-None-Match: *`` on ``PutObject`` and on
  ``CompleteMultipartUpload``; the server answers 412, which becomes :class:`ObjectExists`. The
  server decides, so two nodes racing for one key cannot both win. A multipart put also does one
  ``HeadObject`` first, only to fail fast instead of uploading gigabytes that would be refused.
* **streams** -- the source (size unknown) is read one part at a time and parts are uploaded by
  a small thread pool with at most ``max_concurrency`` parts in flight, so memory is bounded by
  about ``(max_concurrency + 2) * part size`` whatever the size of the source.
* **integrity** -- every part (and every single put) carries its SHA-256 (S3 "flexible
  checksums", ``x-amz-checksum-sha256``); S3 refuses a part whose bytes do not match, and the
  checksum the server reports back is compared with ours. After completion the object's
  composite checksum (SHA-256 of the part digests, ``-N``) and size are checked with a
  ``HeadObject``; a mismatch deletes the object just written and raises :class:`IntegrityError`.
  Reads ask for the checksum (``ChecksumMode=ENABLED``) and botocore verifies whole-object
  checksums as the body is read to its end.

Part size (see :func:`part_size_for`): S3 allows at most 10,000 parts of at most 5 GiB. Parts
1-1000 are ``part_size`` (default 8 MiB), and the size doubles every 1,000 parts (16 MiB from part
1001, 32 MiB from 2001, ...; growth starts from 8 MiB if ``part_size`` is smaller). With the
default that is ~7.8 GiB at 8 MiB parts, ~23 GiB before parts reach 32 MiB, and ~7.8 TiB in
10,000 parts -- beyond S3's 5 TiB object limit, so the part ceiling is never what stops a put,
and memory stays small for the sizes checkpoints really have.

Retries happen in three layers, each bounded, none hidden:

1. botocore, per HTTP request: ``standard`` mode, ``request_attempts`` (default 3) attempts in
   total, for 5xx, throttling and connection errors.
2. here, per part: a part is in memory, so once botocore gives up on a retryable error the part
   (or a single ``PutObject`` body, or the completion) is resent up to ``part_attempts`` times
   with exponential backoff and full jitter. Other operations are not retried here.
3. :class:`backupd.backends.wrappers.RetryingBackend`, around whole operations (a whole put is
   restarted only when its source is seekable).

Every botocore/urllib3/socket exception is translated in :func:`translate_s3_error`, the one
edge of this module. Credentials are never stored on the backend, never in ``describe()`` or
``repr()``, and scrubbed from any server text put into an error message.

One module over 500 lines on purpose: it is the S3 backend's package-sized whole -- the
contract mapped onto S3, the part pipeline and the one translation edge for botocore's
exceptions -- and the contract suite tests it as one backend.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore.exceptions as bex
import urllib3.exceptions
from botocore.config import Config

from backupd.backends.base import Backend, ObjectInfo, Readable, check_key
from backupd.errors import (
    BackupdError,
    BatchDeleteError,
    ConfigError,
    IntegrityError,
    InvalidInput,
    ObjectExists,
    StorageAuthError,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    scrub,
)
from backupd.retry import Backoff

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
PART_GROWTH_EVERY = 1_000
GROWTH_FLOOR = 8 * MiB
DELETE_BATCH = 1_000  # DeleteObjects' limit per request
READ_CHUNK = 1 * MiB
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 120
MAX_PART_RETRY_DELAY = 20.0

T = TypeVar("T")


def part_size_for(part_number: int, base: int) -> int:
    """Size of multipart part ``part_number`` (1-based) for a configured ``base`` size.

    Parts 1..1000 are ``base``; from part 1001 on, ``max(base, 8 MiB)`` doubled once per 1,000
    parts (x2 for 1001..2000, x4 for 2001..3000, ...), capped at 5 GiB. For any legal base
    (>= 5 MiB), 10,000 parts hold more than S3's 5 TiB object limit.
    """
    if part_number < 1:
        raise ValueError("part numbers start at 1")
    tier = (part_number - 1) // PART_GROWTH_EVERY
    if tier == 0:
        return base
    # 1000 parts of 5 MiB doubling would hold only ~4.9 TiB; growing from 8 MiB holds ~7.8 TiB.
    return min(max(base, GROWTH_FLOOR) << tier, MAX_PART_SIZE)


def capacity(base: int, parts: int = MAX_PARTS) -> int:
    """Bytes that ``parts`` parts hold under :func:`part_size_for`."""
    return sum(part_size_for(n, base) for n in range(1, parts + 1))


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _composite_sha256(part_digests: list[str]) -> str:
    joined = b"".join(base64.b64decode(d) for d in part_digests)
    return f"{_sha256_b64(joined)}-{len(part_digests)}"


def _same_checksum(reported: str, expected: str) -> bool:
    # S3 reports composite checksums as "<b64>-<parts>" in some responses and as "<b64>" in
    # others; compare the digest, and the part count when both carry one.
    r_sum, _, r_parts = reported.partition("-")
    e_sum, _, e_parts = expected.partition("-")
    return r_sum == e_sum and (not r_parts or not e_parts or r_parts == e_parts)


# -- the edge: foreign exceptions become backupd errors here and only here ----------------

_THROTTLING = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException",
}
_TRANSIENT = {
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "OperationAborted",  # a conflicting operation on the bucket is in progress
    "ConditionalRequestConflict",  # a concurrent conditional write on the key; retry decides
}
_AUTH_ADVICE = {
    "AccessDenied": "access denied -- grant the backupd IAM policy (README) on the bucket and "
    "its prefix, and check the bucket policy and, with SSE-KMS, the key policy",
    "AllAccessDisabled": "all access to the bucket is disabled",
    "AccountProblem": "the AWS account has a problem that prevents the operation",
    "InvalidAccessKeyId": "the access key id is not known to the endpoint -- check the "
    "credentials of this backend (access_key_id_file, AWS_ACCESS_KEY_ID, profile, IRSA)",
    "SignatureDoesNotMatch": "the request signature does not match -- the secret access key "
    "does not belong to the access key id (or a proxy rewrites requests)",
    "InvalidToken": "the session token is malformed or invalid -- refresh the credentials",
    "ExpiredToken": "the session token has expired -- refresh the credentials (IRSA/STS)",
    "TokenRefreshRequired": "the session token must be refreshed",
    "InvalidSecurity": "the provided security credentials are not valid",
}
_INTEGRITY = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch"}
_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchUpload", "NoSuchVersion"}


def _classify(code: str, status: int | None, message: str, what: str, bucket: str) -> BackupdError:
    detail = f"HTTP {status}" if code == str(status) else f"{code}" + (f", HTTP {status}" if status else "")
    if code == "NoSuchBucket":
        return StorageNotFound(
            f"{what}: bucket {bucket!r} does not exist (NoSuchBucket) -- create it or fix "
            f"[[backends]] bucket"
        )
    if code in ("PreconditionFailed", "412") or status == 412:
        return ObjectExists(f"{what}: the object already exists")
    if code in _AUTH_ADVICE:
        return StorageAuthError(f"{what}: bucket {bucket!r}: {_AUTH_ADVICE[code]} ({code})")
    if code in _INTEGRITY:
        return IntegrityError(f"{what}: the server rejected the data's checksum ({detail}): {message}")
    if code in _REGION or status == 301:
        return StorageError(
            f"{what}: bucket {bucket!r} is in another region or needs another endpoint ({detail})"
            f" -- set [[backends]] region / endpoint_url"
        )
    if code == "RequestTimeTooSkewed":
        return StorageAuthError(f"{what}: this machine's clock is too far off ({code}) -- fix NTP")
    if code in _NOT_FOUND or status == 404:
        return StorageNotFound(f"{what}: not found ({detail})")
    if code in _THROTTLING or code in _TRANSIENT or status == 429 or (status or 0) >= 500:
        return StorageUnavailable(f"{what}: S3 is unavailable or throttling ({detail}): {message}")
    if status == 403:
        # HEAD answers carry no body, hence no error code: most likely AccessDenied.
        advice = (
            f"{_AUTH_ADVICE['AccessDenied']} (without s3:ListBucket, S3 also answers 403 for a "
            f"missing key)"
            if code in ("403", "Forbidden")
            else message
        )
        return StorageAuthError(f"{what}: bucket {bucket!r}: {advice} ({detail})")
    if code.startswith("KMS."):
        return StorageError(f"{what}: the SSE-KMS key cannot be used ({code}): {message}")
    return StorageError(f"{what}: S3 refused the request ({detail}): {message}")


def translate_s3_error(exc: BaseException, *, what: str, bucket: str, redact: Iterable[str] = ()) -> BackupdError:
    """The one place where botocore/boto3/urllib3/socket exceptions become backupd errors.

    ``what`` says what was being done ("writing 'k' to backend 's3' ..."); ``redact`` lists
    strings (credentials) that must never appear in the message, whatever the server said.
    """
    if isinstance(exc, BackupdError):
        return exc
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(error.get("Message") or "")
        err = _classify(code, status, message, what, bucket)
    elif isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        err = StorageAuthError(
            f"{what}: no usable S3 credentials -- set access_key_id_file/secret_access_key_file, "
            f"the AWS_* environment variables, a profile, or IRSA"
        )
    elif isinstance(exc, (bex.CredentialRetrievalError, bex.TokenRetrievalError)):
        err = StorageAuthError(f"{what}: fetching S3 credentials failed ({type(exc).__name__})", retryable=True)
    elif isinstance(exc, bex.ProfileNotFound):
        err = ConfigError(f"{what}: {exc} -- fix [[backends]] profile or AWS_CONFIG_FILE")
    elif isinstance(exc, bex.SSLError):
        err = StorageError(
            f"{what}: TLS verification with the S3 endpoint failed -- check the endpoint's certificate "
            "and backends.ca_bundle"
        )
    elif isinstance(exc, (bex.FlexibleChecksumError, bex.ChecksumError)):
        err = IntegrityError(f"{what}: the data read does not match the checksum S3 stored for it")
    elif isinstance(exc, (bex.ConnectTimeoutError, bex.ReadTimeoutError, urllib3.exceptions.TimeoutError,
                          TimeoutError)):
        err = StorageUnavailable(f"{what}: the S3 request timed out ({type(exc).__name__})")
    elif isinstance(
        exc,
        (
            bex.ConnectionError,
            bex.HTTPClientError,  # ConnectionClosedError, ResponseStreamingError
            bex.IncompleteReadError,
            urllib3.exceptions.HTTPError,
            ConnectionError,
        ),
    ):
        err = StorageUnavailable(f"{what}: the connection to S3 failed ({type(exc).__name__})")
    elif isinstance(exc, OSError):
        err = StorageUnavailable(f"{what}: network error talking to S3 ({type(exc).__name__})")
    elif isinstance(exc, bex.ParamValidationError):
        err = InvalidInput(f"{what}: invalid request parameters: {exc}")
    elif isinstance(exc, bex.BotoCoreError):
        err = StorageError(f"{what}: {type(exc).__name__}: {exc}")
    else:
        err = StorageError(f"{what}: unexpected {type(exc).__name__}: {exc}")
    message = err.message
    for secret in redact:
        # Very short "secrets" (test setups) would mangle every message; real ones are long.
        if len(secret) >= 8:
            message = message.replace(secret, "***")
    message = scrub(message)
    if message != err.message:
        err.message = message
        err.args = (message,)
    return err


_FOREIGN: tuple[type[BaseException], ...] = (
    bex.BotoCoreError,
    bex.ClientError,
    urllib3.exceptions.HTTPError,
    OSError,
)


class _Cancelled(Exception):
    """Another part failed; this one stops without a new request."""


class _AmbiguousCreate(Exception):
    """A conditional write got 412 after a retry: the 412 may be our own earlier attempt."""

    def __init__(self, error: ObjectExists) -> None:
        super().__init__(str(error))
        self.error = error


class _S3Body(io.RawIOBase):
    """A GetObject body whose read errors are translated at the module's edge."""

    def __init__(self, body: Any, edge: Callable[[], Any]) -> None:
        super().__init__()
        self._body = body
        self._edge = edge

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._edge():
            data = self._body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def readall(self) -> bytes:
        with self._edge():
            return self._body.read()

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()


class S3Backend(Backend):
    """A backend storing objects in an S3 (or S3-compatible) bucket; see the module docstring.

    ``prefix`` is prepended (as ``prefix/``) to every key in the bucket; keys given to and
    returned by the backend stay relative. Credentials: ``access_key_id`` + ``secret_access_key``
    (+ ``session_token``) when given, else ``profile``, else boto3's standard chain (environment,
    shared files, IRSA web identity, instance metadata). TLS is always verified: ``ca_bundle``
    names a CA bundle to trust instead of the system's; there is no way to turn verification off.
    ``storage_class``, ``sse`` (``"AES256"`` or ``"aws:kms"``) and ``sse_kms_key_id`` apply to
    every write. ``part_size`` (5 MiB-5 GiB) is the size of the first 1,000 parts;
    ``max_concurrency`` parts are uploaded at once.
    ``request_attempts`` (botocore, per HTTP request) and ``part_attempts`` (per part, with
    backoff from ``retry_base_delay``) bound the retries. A ``client`` passed in is used as it
    is, and the connection and credential arguments are then ignored.
    """

    def __init__(
        self,
        name: str,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        addressing_style: str = "auto",
        storage_class: str | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        part_size: int = 8 * MiB,
        max_concurrency: int = 4,
        ca_bundle: str | os.PathLike[str] | None = None,
        client: Any = None,
        request_attempts: int = 3,
        part_attempts: int = 4,
        retry_base_delay: float = 0.5,
    ) -> None:
        self.name = name
        where = f"backend {name!r}"
        if not bucket or "/" in bucket:
            raise ConfigError(f"{where}: invalid bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except InvalidInput:
                raise ConfigError(f"{where}: invalid prefix {prefix!r}") from None
        if addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError(f"{where}: addressing_style must be auto, path or virtual, not {addressing_style!r}")
        if sse not in (None, "AES256", "aws:kms"):
            raise ConfigError(f"{where}: sse must be 'AES256' or 'aws:kms', not {sse!r}")
        if sse_kms_key_id and sse != "aws:kms":
            raise ConfigError(f"{where}: sse_kms_key_id needs sse = 'aws:kms'")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ConfigError(f"{where}: part_size must be between 5 MiB and 5 GiB, not {part_size}")
        if max_concurrency < 1 or request_attempts < 1 or part_attempts < 1:
            raise ConfigError(f"{where}: max_concurrency, request_attempts and part_attempts must be >= 1")
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError(f"{where}: access_key_id and secret_access_key must be given together")

        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = scrub(endpoint_url) if endpoint_url else endpoint_url  # for describe() and repr()
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.part_attempts = part_attempts
        self.retry_base_delay = retry_base_delay
        self._part_backoff = Backoff(attempts=part_attempts, base_delay=retry_base_delay,
                                     max_delay=MAX_PART_RETRY_DELAY)
        self._key_prefix = f"{prefix}/" if prefix else ""
        # Held in a closure, not an attribute, so that dumping the object's vars shows no secret.
        secrets = tuple(s for s in (access_key_id, secret_access_key, session_token) if s)
        self._secrets: Callable[[], tuple[str, ...]] = lambda: secrets
        self._write_args: dict[str, str] = {}
        if storage_class:
            self._write_args["StorageClass"] = storage_class
        if sse:
            self._write_args["ServerSideEncryption"] = sse
        if sse_kms_key_id:
            self._write_args["SSEKMSKeyId"] = sse_kms_key_id

        if client is None:
            config = Config(
                region_name=region,
                signature_version="s3v4",
                s3={"addressing_style": addressing_style},
                retries={"mode": "standard", "total_max_attempts": request_attempts},
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                max_pool_connections=max(10, 2 * max_concurrency),
                tcp_keepalive=True,
                # We send our own SHA-256; botocore adds one only where S3 requires it.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_supported",
            )
            with self._edge(f"configuring {where}"):
                # A session per backend: boto3's default session is not thread-safe.
                session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
                client = session.client(
                    "s3",
                    endpoint_url=endpoint_url,
                    region_name=region,
                    aws_access_key_id=access_key_id,
                    aws_secret_access_key=secret_access_key,
                    aws_session_token=session_token,
                    verify=os.fspath(ca_bundle) if ca_bundle is not None else True,
                    config=config,
                )
        self._client = client

    @property
    def client(self) -> Any:
        """The boto3 S3 client (tests register botocore event hooks on ``client.meta.events``)."""
        return self._client

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self._key_prefix}"
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        return f"{self.name} ({where})"

    def __repr__(self) -> str:
        return (
            f"S3Backend(name={self.name!r}, bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={self.endpoint_url!r})"
        )

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _edge(self, what: str) -> Iterator[None]:
        try:
            yield
        except BackupdError:
            raise
        except _FOREIGN as exc:
            secrets = self._secrets()
            err = translate_s3_error(exc, what=what, bucket=self.bucket, redact=secrets)
            if any(len(secret) >= 8 and secret in str(exc) for secret in secrets):
                raise err from None  # a traceback would print the foreign text, secret included
            raise err from exc

    def _full(self, key: str) -> str:
        return self._key_prefix + check_key(key)

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        retry: bool = False,
        cancelled: threading.Event | None = None,
        create: bool = False,
    ) -> T:
        """Run one request at the edge; with ``retry``, resend it on retryable errors."""
        attempts = self.part_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            if cancelled is not None and cancelled.is_set():
                raise _Cancelled()
            try:
                with self._edge(what):
                    return fn()
            except ObjectExists as err:
                if create and (attempt > 1 or _botocore_retries(err.__cause__) > 0):
                    raise _AmbiguousCreate(err) from err
                raise
            except BackupdError as err:
                if not err.retryable or attempt == attempts:
                    raise
                delay = self._part_backoff.delay(attempt)
                if cancelled is not None:
                    if cancelled.wait(delay):
                        raise _Cancelled() from err
                else:
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def _head(self, full: str, what: str) -> dict[str, Any] | None:
        try:
            return self._call(
                what,
                lambda: self._client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"),
                retry=True,
            )
        except StorageNotFound:
            return None

    def _remove_bad_object(self, full: str, what: str, err: IntegrityError) -> IntegrityError:
        # We created this object a moment ago under If-None-Match, so it is ours to delete.
        try:
            self._call(what, lambda: self._client.delete_object(Bucket=self.bucket, Key=full), retry=True)
            err.message += "; the object was deleted"
        except BackupdError as exc:
            err.message += f"; deleting it failed too ({exc.kind}) -- delete it by hand"
        err.args = (err.message,)
        return err

    def _is_our_write(self, full: str, what: str, checksum: str, size: int) -> bool:
        head = self._head(full, what)
        reported = head.get("ChecksumSHA256") if head else None
        return bool(head and reported and head.get("ContentLength") == size and _same_checksum(reported, checksum))

    # -- put -----------------------------------------------------------------------------

    def put(self, key: str, source: Readable) -> ObjectInfo:
        full = self._full(key)
        what = f"writing {key!r} to backend {self.describe()}"
        first = _read_part(source, self.part_size)  # the source's own errors propagate as they are
        if len(first) < self.part_size:
            return self._put_single(key, full, first, what)
        # Handed over in a list so that no frame keeps the first part alive during the upload.
        handover = [first]
        del first
        return self._put_multipart(key, full, source, handover, what)

    def _put_single(self, key: str, full: str, data: bytes, what: str) -> ObjectInfo:
        digest = _sha256_b64(data)
        try:
            resp = self._call(
                what,
                lambda: self._client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=data,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=digest,
                    IfNoneMatch="*",
                    **self._write_args,
                ),
                retry=True,
                create=True,
            )
        except _AmbiguousCreate as amb:
            if self._is_our_write(full, what, digest, len(data)):
                return ObjectInfo(key, len(data), datetime.now(UTC))
            raise amb.error from None
        reported = resp.get("ChecksumSHA256")
        if reported is not None and not _same_checksum(reported, digest):
            raise self._remove_bad_object(
                full, what, IntegrityError(f"{what}: S3 stored a different checksum ({reported}) than sent ({digest})")
            )
        return ObjectInfo(key, len(data), datetime.now(UTC))

    def _put_multipart(self, key: str, full: str, source: Readable, handover: list[bytes], what: str) -> ObjectInfo:
        if self._head(full, what) is not None:
            raise ObjectExists(f"{what}: the object already exists")
        upload_id: str = self._call(
            what,
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", **self._write_args
            ),
            retry=True,
        )["UploadId"]
        cancelled = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=f"s3-put-{self.name}")
        in_flight: set[Future[dict[str, Any]]] = set()
        parts: list[dict[str, Any]] = []
        size = 0
        completed = False
        try:
            number = 1
            data = handover.pop()
            while data:
                if number > MAX_PARTS:
                    raise StorageError(f"{what}: the source is larger than {MAX_PARTS} parts can hold")
                while len(in_flight) >= self.max_concurrency:
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    parts.extend(f.result() for f in finished)
                in_flight.add(pool.submit(self._upload_part, what, full, upload_id, number, data, cancelled))
                size += len(data)
                number += 1
                data = b""  # drop our reference before reading the next part
                data = _read_part(source, part_size_for(number, self.part_size))
            finished, in_flight = wait(in_flight)
            parts.extend(f.result() for f in finished)
            parts.sort(key=lambda p: p["PartNumber"])
            expected = _composite_sha256([p["ChecksumSHA256"] for p in parts])
            try:
                resp = self._call(
                    what,
                    lambda: self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        IfNoneMatch="*",
                    ),
                    retry=True,
                    create=True,
                )
            except _AmbiguousCreate as amb:
                if not self._is_our_write(full, what, expected, size):
                    raise amb.error from None
                resp = {}
            completed = True
            head = self._head(full, what)
            if head is None:
                raise StorageError(f"{what}: the completed object is not there")
            reported = resp.get("ChecksumSHA256") or head.get("ChecksumSHA256")
            if reported is not None and not _same_checksum(reported, expected):
                raise self._remove_bad_object(
                    full, what,
                    IntegrityError(f"{what}: S3 reports checksum {reported}, the parts sent give {expected}"),
                )
            if head.get("ContentLength") != size:
                raise self._remove_bad_object(
                    full, what, IntegrityError(f"{what}: S3 stored {head.get('ContentLength')} bytes, {size} were sent")
                )
            modified = head.get("LastModified")
            return ObjectInfo(key, size, modified.astimezone(UTC) if modified else datetime.now(UTC))
        except BaseException as exc:
            cancelled.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if not completed:
                self._abort_upload(full, upload_id, what, exc)
            raise
        finally:
            pool.shutdown(wait=True)

    def _upload_part(
        self, what: str, full: str, upload_id: str, number: int, data: bytes, cancelled: threading.Event
    ) -> dict[str, Any]:
        digest = _sha256_b64(data)
        resp = self._call(
            f"{what} (part {number})",
            lambda: self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=digest,
            ),
            retry=True,
            cancelled=cancelled,
        )
        reported = resp.get("ChecksumSHA256")
        if reported is not None and reported != digest:
            raise IntegrityError(f"{what}: S3 reports checksum {reported} for part {number}, {digest} was sent")
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": digest}

    def _abort_upload(self, full: str, upload_id: str, what: str, cause: BaseException) -> None:
        try:
            self._call(
                f"{what} (aborting the multipart upload)",
                lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id),
                retry=True,
            )
        except StorageNotFound:
            pass
        except BackupdError as exc:
            cause.add_note(
                f"aborting multipart upload {upload_id} failed too ({exc.kind}); abort_incomplete or "
                f"the bucket's lifecycle rule will remove it"
            )

    # -- reads ---------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        full = self._full(key)
        what = f"reading {key!r} from backend {self.describe()}"
        resp = self._call(
            what, lambda: self._client.get_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
        )
        return io.BufferedReader(_S3Body(resp["Body"], lambda: self._edge(what)), READ_CHUNK)

    def stat(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            head = self._call(
                f"stat {key!r} in backend {self.describe()}",
                lambda: self._client.head_object(Bucket=self.bucket, Key=full),
            )
        except StorageNotFound:
            return None
        return ObjectInfo(key, head["ContentLength"], head["LastModified"].astimezone(UTC))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        what = f"listing {prefix!r} in backend {self.describe()}"
        strip = len(self._key_prefix)
        with self._edge(what):
            pages = iter(
                self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self._key_prefix + prefix
                )
            )
        while True:
            with self._edge(what):
                page = next(pages, None)
            if page is None:
                return
            for obj in page.get("Contents", ()):
                key = obj["Key"][strip:]
                if not key or key.endswith("/"):  # folder markers made by consoles
                    continue
                yield ObjectInfo(key, obj["Size"], obj["LastModified"].astimezone(UTC))

    # -- deletes -------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        full = self._full(key)
        try:
            self._call(
                f"deleting {key!r} from backend {self.describe()}",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=full),
            )
        except StorageNotFound as exc:
            # S3 answers 204 for a missing key; some S3-compatible stores answer NoSuchKey.
            if _error_code(exc.__cause__) not in ("NoSuchKey", "404", "NotFound"):
                raise

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete with ``DeleteObjects``, up to 1,000 keys per request.

        Every batch is attempted; keys S3 could not delete are reported together at the end in
        one :class:`BatchDeleteError` (``failures`` maps each key to its error).
        """
        what = f"deleting objects from backend {self.describe()}"
        failures: dict[str, BackupdError] = {}
        iterator = iter(keys)
        while batch := list(itertools.islice(iterator, DELETE_BATCH)):
            full_keys = {self._full(k): k for k in batch}
            request = {"Objects": [{"Key": k} for k in full_keys], "Quiet": True}
            resp = self._call(what, lambda: self._client.delete_objects(Bucket=self.bucket, Delete=request))  # noqa: B023
            for error in resp.get("Errors", ()):
                code = str(error.get("Code") or "Unknown")
                if code == "NoSuchKey":
                    continue
                key = full_keys.get(error.get("Key", ""), error.get("Key", "?"))
                failures[key] = _classify(
                    code, None, str(error.get("Message") or ""), f"deleting {key!r} from backend {self.describe()}",
                    self.bucket,
                )
        if failures:
            sample = ", ".join(f"{k!r} ({e.message})" for k, e in itertools.islice(failures.items(), 3))
            raise BatchDeleteError(f"{what}: {len(failures)} key(s) could not be deleted: {sample}", failures)

    def abort_incomplete(self, older_than: timedelta, key: str | None = None) -> int:
        """Abort multipart uploads under the prefix initiated more than ``older_than`` ago.

        Only call this with an age no in-progress upload can reach (hours, not seconds): another
        node's upload that is still running is indistinguishable from an abandoned one. With
        ``key``, the uploads of exactly that key are aborted whatever their age.
        """
        what = f"aborting incomplete uploads in backend {self.describe()}"
        cutoff = datetime.max.replace(tzinfo=UTC) if key is not None else datetime.now(UTC) - older_than
        prefix = self._full(check_key(key)) if key is not None else self._key_prefix
        removed = 0
        with self._edge(what):
            pages = iter(
                self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            )
        while True:
            with self._edge(what):
                page = next(pages, None)
            if page is None:
                return removed
            for upload in page.get("Uploads", ()):
                if upload["Initiated"] > cutoff or (key is not None and upload["Key"] != prefix):
                    continue
                try:
                    self._call(
                        what,
                        functools.partial(self._client.abort_multipart_upload, Bucket=self.bucket,
                                          Key=upload["Key"], UploadId=upload["UploadId"]),
                        retry=True,
                    )
                except StorageNotFound:
                    continue  # finished or aborted meanwhile
                removed += 1


def _error_code(exc: BaseException | None) -> str | None:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code")


def _botocore_retries(exc: BaseException | None) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)


def _read_part(source: Readable, size: int) -> bytes:
    """Read up to ``size`` bytes, looping over short reads; fewer only at the end of the source."""
    first = source.read(size)
    if not first or len(first) >= size:
        return first
    chunks = [first]
    got = len(first)
    while got < size:
        chunk = source.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
