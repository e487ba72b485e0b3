"""S3 faults through the daemon's path, against moto over real HTTP with real boto3: errors and
throttling on random parts, connections reset mid-part (by a real TCP proxy), a completed
upload whose checksum does not match, a refused manifest, the bucket gone. Each ends with the
catalog and the bucket consistent (no half-written object, no dangling multipart upload, no
committed archive lost) and a clean run succeeding afterwards.

Faults are botocore event hooks on the backend's own client (``before-send`` answers instead of
the server, ``after-call`` alters what it said), as in tests/backends/test_s3.py.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ConnectionClosedError

from backupd.backends.s3 import S3Backend
from backupd.errors import StorageNotFound
from backupd.model import FAILED, RUN_FAILED
from backupd.simulator.server import NodeSimulator
from backupd.storage.verify import verify
from tests.backends.test_s3 import FOREVER, PartFaults, s3_error
from tests.policies import apply as apply_policy
from tests.reliability.consistency import FAST, assert_consistent, daemon_cycle, fast_retries, innermost
from tests.reliability.reset_proxy import ResetProxy

MiB = 1 << 20

POLICY = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: db}
spec:
  selector: {namespaces: [shop], matchLabels: {app: db}, containers: [postgres]}
  schedule: "@every 1h"
  backend: s3
  retention: {keepLast: 50}
"""


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[NodeSimulator]:
    """Overrides the shared simulator: 64 MiB of memory per container gives archives of about
    13 MiB stored, three 5 MiB parts -- a real multipart upload."""
    with NodeSimulator(tmp_path / "node", memory_bytes=64 * MiB) as s:
        yield s


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[ResetProxy]:
    parts = urlsplit(moto_endpoint)
    p = ResetProxy((parts.hostname or "127.0.0.1", parts.port or 80))
    yield p
    p.close()


def s3_app(s3_app_factory, proxy: ResetProxy, fmt: str = "full"):  # type: ignore[no-untyped-def]
    app = s3_app_factory()
    s3 = app.config.backends[-1]
    s3.format = fmt  # before the pipeline is built
    s3.part_size = 5 * MiB
    s3.endpoint_url = proxy.url  # every S3 request passes the resetting proxy
    fast_retries(app)
    innermost(app.backends["s3"]).retry_base_delay = 0.01  # per-part backoff; the retries still happen
    return app


@pytest.fixture
def app(s3_app_factory, proxy: ResetProxy):  # type: ignore[no-untyped-def]
    return s3_app(s3_app_factory, proxy)


@pytest.fixture(params=["full", "dedup"])
def any_format_app(s3_app_factory, proxy: ResetProxy, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Faults that are not about multipart uploads, on both storage formats (a deduplicated
    archive is 4 MiB packs, each one PUT, then its recipe and manifest)."""
    return s3_app(s3_app_factory, proxy, request.param)


def client(app) -> Any:  # type: ignore[no-untyped-def]
    backend = innermost(app.backends["s3"])
    assert isinstance(backend, S3Backend)
    return backend.client


def baseline(app) -> set[str]:  # type: ignore[no-untyped-def]
    policy = apply_policy(app, POLICY)
    assert not daemon_cycle(app, policy).failed
    state = assert_consistent(app)
    assert len(state.ids) == 1
    if app.config.backends[-1].format == "dedup":  # 4 MiB packs, a PUT each
        assert len(app.catalog.list_packs("s3")) >= 2, "not several packs"
    else:
        assert state.archives[0].stored_size > 2 * 5 * MiB, "not a multipart upload"
    return state.ids


def failed_once(app, kind: str) -> None:  # type: ignore[no-untyped-def]
    result = daemon_cycle(app, app.runner.load_policy("db"))
    assert [o.run.error_kind for o in result.outcomes] == [kind], [o.run.error for o in result.outcomes]
    assert result.outcomes[0].run.outcome == RUN_FAILED


def recovers(app, before: set[str]) -> None:  # type: ignore[no-untyped-def]
    result = daemon_cycle(app, app.runner.load_policy("db"))
    assert not result.failed, result
    state = assert_consistent(app)
    assert before < state.ids and len(state.ids) == len(before) + 1


TRANSIENT = [(500, "InternalError"), (503, "ServiceUnavailable"), (503, "SlowDown"), "reset"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_errors_and_throttling_on_random_parts_are_survived(app, seed: int) -> None:  # type: ignore[no-untyped-def]
    before = baseline(app)
    rng = random.Random(seed)
    plan: dict[int, list[Any]] = {}
    for part in range(1, 5):
        faults = [rng.choice(TRANSIENT) for _ in range(rng.randint(0, 3))]
        plan[part] = [ConnectionClosedError(endpoint_url="s3") if f == "reset" else f for f in faults]
    plan[rng.randint(1, 3)].insert(0, (503, "SlowDown"))  # at least one fault, always on a real part
    hook = PartFaults(plan)
    client(app).meta.events.register("before-send.s3.UploadPart", hook)
    recovers(app, before)
    assert sum(hook.attempts.values()) > len(hook.attempts) >= 3, hook.attempts


def test_connection_reset_mid_part_is_survived(any_format_app, proxy: ResetProxy) -> None:  # type: ignore[no-untyped-def]
    app = any_format_app
    before = baseline(app)
    # inside the body of a 5 MiB part; of a deduplicated increment's pack (what changed: smaller)
    dedup = app.config.backends[-1].format == "dedup"
    proxy.reset_next(after_bytes=64 << 10 if dedup else 2 * MiB, times=2)
    recovers(app, before)
    assert proxy.resets == 2


def test_a_part_failing_every_attempt_fails_the_run_and_aborts_the_upload(app) -> None:  # type: ignore[no-untyped-def]
    before = baseline(app)
    # Three layers retry: the whole put (RetryingBackend: the packing stream rewinds), each part
    # (the backend), each request (botocore, with its own pauses). Two attempts in the outer two
    # layers keep the test short; every layer still retries.
    app.backends["s3"].backoff = FAST
    innermost(app.backends["s3"]).part_attempts = 2
    hook = PartFaults({2: [FOREVER]})
    client(app).meta.events.register("before-send.s3.UploadPart", hook, unique_id="forever")
    failed_once(app, "StorageUnavailable")
    assert hook.attempts[2] == 2 * 2 * 3, "retryable part errors are retried in every layer, then given up"
    assert assert_consistent(app).ids == before  # includes: no multipart upload left behind
    client(app).meta.events.unregister("before-send.s3.UploadPart", unique_id="forever")
    recovers(app, before)


def test_completed_upload_whose_checksum_mismatches_is_removed(app) -> None:  # type: ignore[no-untyped-def]
    before = baseline(app)

    def lie(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ChecksumSHA256"] = base64.b64encode(b"\1" * 32).decode() + "-3"

    client(app).meta.events.register("after-call.s3.CompleteMultipartUpload", lie, unique_id="lie")
    failed_once(app, "IntegrityError")
    (bad,) = app.catalog.list_archives(states=(FAILED,))
    assert "deleted" in (bad.error or "")
    assert assert_consistent(app).ids == before
    client(app).meta.events.unregister("after-call.s3.CompleteMultipartUpload", unique_id="lie")
    recovers(app, before)


def test_bytes_corrupted_in_transit_never_become_an_archive(app) -> None:  # type: ignore[no-untyped-def]
    """A bit flips in part 2 after its checksum was computed (moto stores it; real S3 would
    answer BadDigest): the composite checksum at completion gives it away."""
    before = baseline(app)

    def flip(request: Any, **_: Any) -> None:
        if "partNumber=2" in request.url:
            body = request.body if isinstance(request.body, bytes) else request.body.read()
            request.body = bytes([body[0] ^ 1]) + body[1:]

    client(app).meta.events.register("before-send.s3.UploadPart", flip, unique_id="flip")
    failed_once(app, "IntegrityError")
    assert assert_consistent(app).ids == before
    client(app).meta.events.unregister("before-send.s3.UploadPart", unique_id="flip")
    recovers(app, before)


def test_a_refused_manifest_takes_its_object_with_it(any_format_app) -> None:  # type: ignore[no-untyped-def]
    app = any_format_app
    before = baseline(app)

    def deny_manifests(request: Any, **_: Any) -> Any:
        if urlsplit(request.url).path.endswith(".json"):
            return s3_error(request, 403, "AccessDenied")
        return None

    client(app).meta.events.register("before-send.s3.PutObject", deny_manifests, unique_id="deny")
    failed_once(app, "StorageAuthError")
    assert assert_consistent(app).ids == before  # the archive object was deleted again: no orphan
    client(app).meta.events.unregister("before-send.s3.PutObject", unique_id="deny")
    recovers(app, before)


def test_bucket_gone(any_format_app, s3_admin, s3_bucket: str, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    """Someone deletes the bucket: runs fail naming it, nothing is half-written, the node's
    disk does not fill up, and `verify` reports every archive that went with it. (Deduplicated:
    the first run after the bucket is back finds the packs it would reuse gone and fails, so
    that no later archive names them.)"""
    app = any_format_app
    before = baseline(app)
    for obj in s3_admin.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
        s3_admin.delete_object(Bucket=s3_bucket, Key=obj["Key"])
    s3_admin.delete_bucket(Bucket=s3_bucket)
    failed_once(app, "StorageNotFound")
    (run,) = [r for r in app.catalog.list_runs(policy="db") if r.outcome == RUN_FAILED]
    assert s3_bucket in (run.error or "") and "does not exist" in (run.error or "")
    assert app.catalog.list_archives(states=("pending",)) == []
    assert list(sim.checkpoint_dir.glob("checkpoint-*.tar")) == [], "node tars pile up while the bucket is gone"
    with pytest.raises(StorageNotFound, match="does not exist"):  # `backupd verify` exits 6 naming the bucket
        verify(app.catalog, app.backends, app.catalog.list_archives())
    s3_admin.create_bucket(Bucket=s3_bucket)
    if app.config.backends[-1].format == "dedup":
        failed_once(app, "IntegrityError")
        assert {p.state for p in app.catalog.list_packs("s3")} >= {"missing"}
    result = daemon_cycle(app, app.runner.load_policy("db"))
    assert not result.failed, result
    new = {a.id for a in app.catalog.list_archives()} - before
    assert len(new) == 1
