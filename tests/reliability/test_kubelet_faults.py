"""Kubelet faults through the daemon's own path (cycle, retention, node sweep), each ending in a
consistent catalog, backend and node directory, with every archive committed before the fault
still intact -- and a clean run succeeding once the kubelet recovers.

tests/test_core_loop.py proves the run-level outcome (a failed run with a clear reason); this
suite proves what is left behind.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupd.model import RUN_FAILED, SUCCEEDED
from backupd.retry import Backoff
from backupd.simulator.server import NodeSimulator
from tests.policies import apply as apply_policy
from tests.policies import web_policy
from tests.reliability.consistency import assert_consistent, daemon_cycle, fast_retries

POLICY = web_policy(retention="{keepLast: 50}")

CHECKPOINT = "/checkpoint/*"

# (fault as the simulator takes it, the error kind every run of the cycle must record)
CHECKPOINT_FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "401 unauthorized": ({"action": "respond", "status": 401, "body": "Unauthorized"}, "KubeletUnauthorized"),
    "403 forbidden": ({"action": "respond", "status": 403, "body":
                       "Forbidden (user=backupd, verb=create, resource=nodes, subresource(s)=[checkpoint])\n"},
                      "KubeletForbidden"),
    "404 checkpoint API off": ({"action": "respond", "status": 404, "body": "404 page not found\n"},
                               "CheckpointApiDisabled"),
    "404 pod gone": ({"action": "respond", "status": 404, "body": "pod does not exist"}, "TargetGone"),
    "500 criu failed": ({"action": "checkpoint_error", "message": "running criu failed: exit status 1"},
                        "CheckpointFailed"),
    "500 runtime cannot checkpoint": ({"action": "unsupported", "variant": "containerd"}, "CheckpointUnsupported"),
    "500 without a kubelet body": ({"action": "respond", "status": 500, "body": "upstream went away"}, "KubeletError"),
    "503 from a proxy": ({"action": "respond", "status": 503, "body": "service unavailable"}, "KubeletError"),
    "200 that is not JSON": ({"action": "respond", "status": 200, "body": "<html>login</html>",
                              "content_type": "text/html"}, "KubeletProtocolError"),
    "200 with two paths": ({"action": "respond", "status": 200, "body": '{"items":["/a","/b"]}',
                            "content_type": "application/json"}, "KubeletProtocolError"),
    "reset mid-response": ({"action": "reset", "variant": "partial"}, "KubeletUnreachable"),
    "reset after the headers": ({"action": "reset", "variant": "headers"}, "KubeletUnreachable"),
    "reset before answering": ({"action": "reset", "variant": "immediate"}, "KubeletUnreachable"),
    "path outside the checkpoint dir": ({"action": "hostile_path", "variant": "outside"}, "UnsafeCheckpointPath"),
    "path with ..": ({"action": "hostile_path", "variant": "traversal"}, "UnsafeCheckpointPath"),
    "symlinked tar": ({"action": "hostile_path", "variant": "symlink"}, "UnsafeCheckpointPath"),
}

DISCOVERY_FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "401 on /pods": ({"action": "respond", "status": 401, "body": "Unauthorized"}, "KubeletUnauthorized"),
    "403 on /pods": ({"action": "respond", "status": 403, "body":
                      "Forbidden (user=backupd, verb=get, resource=nodes, subresource(s)=[pods proxy])\n"},
                     "KubeletForbidden"),
    "500 on /pods": ({"action": "respond", "status": 500, "body": "internal error"}, "KubeletError"),
    "reset on /pods": ({"action": "reset", "variant": "partial"}, "KubeletUnreachable"),
    "/pods is not a PodList": ({"action": "respond", "status": 200, "body": "[]",
                                "content_type": "application/json"}, "KubeletProtocolError"),
}


@pytest.fixture
def app(app_factory):  # type: ignore[no-untyped-def]
    return fast_retries(app_factory(request_timeout_seconds=1.5))


def baseline(app) -> set[str]:  # type: ignore[no-untyped-def]
    """Two committed archives taken before any fault: none of them may be lost."""
    policy = apply_policy(app, POLICY)
    assert not daemon_cycle(app, policy).failed
    return assert_consistent(app).ids


def recovers(app, sim: NodeSimulator, before: set[str]) -> None:  # type: ignore[no-untyped-def]
    """The kubelet is healthy again: the next run succeeds and nothing earlier was lost."""
    sim.clear_faults()
    result = daemon_cycle(app, app.runner.load_policy("web"))
    assert not result.failed, result
    state = assert_consistent(app)
    assert before < state.ids and len(state.ids) == len(before) + 2


@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_checkpoint_fault_leaves_everything_consistent(app, sim: NodeSimulator, case: str) -> None:  # type: ignore[no-untyped-def]
    before = baseline(app)
    fault, kind = CHECKPOINT_FAULTS[case]
    sim.add_fault(fault.pop("action"), method="POST", path=CHECKPOINT, **fault)
    result = daemon_cycle(app, app.runner.load_policy("web"))
    assert result.error is None and len(result.outcomes) == 2
    assert {o.run.outcome for o in result.outcomes} == {RUN_FAILED}
    assert {o.run.error_kind for o in result.outcomes} == {kind}, [o.run.error for o in result.outcomes]
    assert assert_consistent(app).ids == before
    recovers(app, sim, before)


@pytest.mark.parametrize("case", list(DISCOVERY_FAULTS))
def test_discovery_fault_leaves_everything_consistent(app, sim: NodeSimulator, case: str) -> None:  # type: ignore[no-untyped-def]
    before = baseline(app)
    fault, kind = DISCOVERY_FAULTS[case]
    sim.add_fault(fault.pop("action"), method="GET", path="/pods", **fault)
    posts_before = sum(r.method == "POST" for r in sim.requests)
    result = daemon_cycle(app, app.runner.load_policy("web"))
    assert result.error is not None and result.error.kind == kind, result.error
    (failed,) = [r for r in app.catalog.list_runs(policy="web") if r.outcome == RUN_FAILED]
    assert failed.error_kind == kind
    assert counted(app, "backupd_runs_total", kind="checkpoint", outcome="failed") == 1
    assert counted(app, "backupd_errors_total", kind=kind) == 1
    assert sum(r.method == "POST" for r in sim.requests) == posts_before, "checkpoints without discovery"
    assert assert_consistent(app).ids == before
    recovers(app, sim, before)


def counted(app, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    """A sample of the app's own Prometheus exposition, as a scraper reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(app.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_kubelet_down_is_a_failed_run_in_the_metrics(app, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    """The kubelet is gone: the cycle fails before any per-container run, and it is still one
    failed checkpoint run and one error of its class in /metrics, as the run row says."""
    before = baseline(app)
    failed_before = counted(app, "backupd_runs_total", kind="checkpoint", outcome="failed")
    sim.stop()
    result = daemon_cycle(app, app.runner.load_policy("web"))
    assert result.error is not None and result.error.kind == "KubeletUnreachable", result.error
    (failed,) = [r for r in app.catalog.list_runs(policy="web") if r.outcome == RUN_FAILED]
    assert failed.error_kind == "KubeletUnreachable"
    assert counted(app, "backupd_runs_total", kind="checkpoint", outcome="failed") == failed_before + 1
    assert counted(app, "backupd_errors_total", kind="KubeletUnreachable") == 1
    assert assert_consistent(app).ids == before
    sim.start()
    recovers(app, sim, before)
    assert counted(app, "backupd_runs_total", kind="checkpoint", outcome="failed") == failed_before + 1


def test_untrusted_client_certificate(app, app_factory, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    before = baseline(app)
    stranger = sim.pki.issue_untrusted_client_cert("stranger", cn="backupd")
    other = app_factory()
    other.config.kubelet.cert_file, other.config.kubelet.key_file = stranger.cert_file, stranger.key_file
    fast_retries(other)  # builds the kubelet client: after the certificate is swapped
    result = daemon_cycle(other, other.runner.load_policy("web"))
    assert result.error is not None and result.error.kind == "KubeletTLSError"
    assert sim.tls_failures, "the handshake was not refused by the kubelet"
    assert assert_consistent(app).ids == before
    recovers(app, sim, before)


def test_kubelet_hanging_past_the_timeout(app, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    """The kubelet answers after backupd gave up (1.5 s): its late tar is nobody's archive. It is
    never committed, and the node sweep removes it once it is ``stale_tar_hours`` old."""
    before = baseline(app)
    sim.add_fault("delay", method="POST", path=CHECKPOINT, seconds=3.0)
    result = daemon_cycle(app, app.runner.load_policy("web"))
    assert {o.run.error_kind for o in result.outcomes} == {"KubeletTimeout"}
    deadline = time.monotonic() + 20
    while len([r for r in sim.requests if r.fault == "delay" and r.status == 200]) < 2:
        assert time.monotonic() < deadline, "the simulator never finished the delayed checkpoints"
        time.sleep(0.1)
    posts = [r for r in sim.requests if r.method == "POST" and r.fault == "delay"]
    assert len(posts) == 2, "a timed-out checkpoint must not be retried at once (it may still be running)"
    late = sorted(sim.checkpoint_dir.glob("checkpoint-*.tar"))
    assert len(late) == 2
    assert assert_consistent(app, node_dir=Path("/nonexistent")).ids == before
    # a day later: the node sweep (after each cycle) removes the late tars
    day_ago = (datetime.now(UTC) - timedelta(hours=app.config.daemon.stale_tar_hours + 1)).timestamp()
    for tar in late:
        os.utime(tar, (day_ago, day_ago))
    recovers(app, sim, before)
    assert not any(t.exists() for t in late)


def test_slow_kubelet_within_the_timeout_succeeds(app_factory, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    app = fast_retries(app_factory(request_timeout_seconds=5))
    policy = apply_policy(app, POLICY)
    sim.add_fault("delay", method="GET", path="/pods", seconds=0.5)
    sim.add_fault("delay", method="POST", path=CHECKPOINT, seconds=1.0)
    sim.checkpoint_latency = 0.5
    result = daemon_cycle(app, policy)
    assert not result.failed, result
    assert {o.run.outcome for o in result.outcomes} == {SUCCEEDED}
    assert len(assert_consistent(app).ids) == 2


def test_intermittent_kubelet_errors_are_retried(app, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    """One 503 on /pods and two connection resets among the checkpoints: retried, nothing fails."""
    # three attempts: both resets may hit the same container
    app.pipeline.kubelet_backoff = app.runner.discovery_backoff = Backoff(attempts=3, base_delay=0.01, max_delay=0.01)
    policy = apply_policy(app, POLICY)
    sim.add_fault("respond", method="GET", path="/pods", status=503, body="service unavailable", times=1)
    sim.add_fault("reset", method="POST", path=CHECKPOINT, variant="immediate", times=2)
    result = daemon_cycle(app, policy)
    assert not result.failed, result
    assert len(assert_consistent(app).ids) == 2
    assert len([r for r in sim.requests if r.fault == "reset"]) == 2


def test_a_fifo_where_the_tar_should_be_is_refused(app, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    """The kubelet names a file in the right directory that is not a regular file: never read."""
    before = baseline(app)
    fifo = sim.checkpoint_dir / "checkpoint-web_default-nginx-2026-01-01T00:00:00Z.tar"
    os.mkfifo(fifo, 0o600)
    sim.add_fault("respond", method="POST", path=CHECKPOINT, status=200, body=f'{{"items":["{fifo}"]}}',
                  content_type="application/json")
    result = daemon_cycle(app, app.runner.load_policy("web"))
    assert {o.run.error_kind for o in result.outcomes} == {"UnsafeCheckpointPath"}
    assert fifo.exists(), "backupd must not remove what is not a regular checkpoint tar"
    assert assert_consistent(app).ids == before
    recovers(app, sim, before)
