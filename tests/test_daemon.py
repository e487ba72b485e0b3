"""The daemon: jobs rebuilt from the catalog, catch-up once after downtime, clean stop."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import structlog.testing
from sqlalchemy import update

from backupd.backends.wrappers import Wrapper
from backupd.catalog.schema import RunRow
from backupd.model import now_utc
from backupd.policy.document import parse_policies

POLICY = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: NAME}
spec:
  selector: {namespaces: [shop], containers: [postgres]}
  schedule: "SCHEDULE"
  backend: local
  retention: {keepLast: 50}
"""


def apply(app, name: str, schedule: str) -> None:  # type: ignore[no-untyped-def]
    (p,) = parse_policies(POLICY.replace("NAME", name).replace("SCHEDULE", schedule), "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])


def checkpoint_runs(app, policy: str) -> list:  # type: ignore[no-untyped-def]
    return [r for r in app.catalog.list_runs(policy=policy, kind="checkpoint", limit=1000) if r.outcome != "running"]


def serve(daemon, seconds: float) -> None:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=daemon.serve, daemon=True)
    t.start()
    time.sleep(seconds)
    daemon.stop(5)
    t.join(5)


def test_interval_policy_runs_on_schedule(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    apply(app, "fast", "@every 1s")
    daemon = app.daemon(policy_poll_seconds=0.2)
    daemon.start()
    serve(daemon, 3.6)
    runs = checkpoint_runs(app, "fast")
    # one catch-up run at start (never ran before), then one per second
    assert 3 <= len(runs) <= 5, [r.started_at for r in runs]
    assert all(r.outcome == "succeeded" for r in runs)
    starts = sorted(r.started_at for r in runs)
    assert all(b - a >= timedelta(seconds=0.9) for a, b in zip(starts, starts[1:], strict=False))


def test_missed_runs_after_downtime_are_caught_up_exactly_once(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    apply(app, "hourly", "0 * * * *")
    app.runner.cycle(app.runner.load_policy("hourly"))
    # the daemon was down for ten hours: ten runs were missed
    with app.catalog.session() as s:
        s.execute(update(RunRow).values(started_at=now_utc() - timedelta(hours=10)))
    daemon = app.daemon(policy_poll_seconds=0.2)
    daemon.start()
    serve(daemon, 1.5)
    assert len(checkpoint_runs(app, "hourly")) == 2  # the old one + exactly one catch-up
    # a restart right after does not run it again: nothing was missed since
    daemon2 = app_factory(app.config.database.url).daemon(policy_poll_seconds=0.2)
    daemon2.start()
    serve(daemon2, 1.0)
    assert len(checkpoint_runs(app, "hourly")) == 2


def test_policy_changes_reach_the_running_daemon(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    apply(app, "yearly", "0 0 1 1 *")
    daemon = app.daemon(policy_poll_seconds=0.2)
    daemon.start()
    t = threading.Thread(target=daemon.serve, daemon=True)
    t.start()
    time.sleep(0.8)
    assert {j.id for j in daemon.scheduler.get_jobs() if not j.id.startswith("__")} == {"yearly"}
    apply(app, "later", "@every 1s")          # applied by another process, through the catalog
    app.catalog.delete_policy("yearly")
    time.sleep(2.0)
    assert {j.id for j in daemon.scheduler.get_jobs() if not j.id.startswith("__")} == {"later"}
    daemon.stop(5)
    t.join(5)
    assert len(checkpoint_runs(app, "later")) >= 1


def test_a_container_is_never_checkpointed_by_two_runs_at_once(app_factory, sim) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    apply(app, "a", "@every 1h")
    apply(app, "b", "@every 1h")
    sim.add_fault("delay", method="POST", path="/checkpoint/*", seconds=0.5, times=1)
    results = {}

    def cycle(name: str) -> None:
        results[name] = app.runner.cycle(app.runner.load_policy(name))

    threads = [threading.Thread(target=cycle, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    posts = [r for r in sim.requests if r.method == "POST"]
    # either both ran one after the other (>= 1 s apart), or the second skipped
    skipped = sum(len(r.skipped) for r in results.values())
    assert len(posts) + skipped == 2
    if len(posts) == 2:
        assert abs(posts[1].started - posts[0].started) >= 1.0


def test_a_second_daemon_for_the_same_node_refuses_to_start(app_factory) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from backupd.errors import LeaseHeld

    first = app_factory()
    apply(first, "yearly", "0 0 1 1 *")
    daemon = first.daemon(policy_poll_seconds=0.2)
    daemon.start()
    try:
        second = app_factory(first.config.database.url)
        second.holder = "another-host:1:abc"  # alive as far as this host can tell
        second.pruner.holder = second.holder
        with pytest.raises(LeaseHeld, match="another backupd daemon is running for node 'sim-node'"):
            second.daemon().start()
    finally:
        daemon.stop(5)
    # a clean stop releases the node lease at once
    assert first.pipeline.node_lease("next-daemon:1:x")


class _SlowPuts(Wrapper):
    """The real backend, with each put taking a while longer (a slow link); records when."""

    def __init__(self, inner, seconds: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self.seconds = seconds
        self.puts: list[tuple[float, float]] = []

    def put(self, key, source):  # type: ignore[no-untyped-def]
        started = time.time()
        time.sleep(self.seconds)
        info = self.inner.put(key, source)
        self.puts.append((started, time.time()))
        return info


def test_uploads_do_not_hold_the_kubelet_back(app_factory, sim) -> None:  # type: ignore[no-untyped-def]
    """At most max_concurrent_checkpoints requests reach the kubelet at once, and a slow
    upload does not keep the next checkpoint waiting."""
    app = app_factory()
    app.config.daemon.max_concurrent_checkpoints = 1
    slow = _SlowPuts(app.backends["local"], seconds=0.4)
    app.backends["local"] = slow
    sim.checkpoint_latency = 0.2
    (p,) = parse_policies(POLICY.replace("NAME", "all").replace("SCHEDULE", "@every 1h")
                          .replace("containers: [postgres]", "containers: ['*']"), "p.yaml")  # fmt: skip
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    result = app.runner.cycle(app.runner.load_policy("all"))

    assert len(result.outcomes) >= 2 and all(o.archive for o in result.outcomes)
    asked = sorted((r.started, r.started + r.duration) for r in sim.requests if r.method == "POST")
    assert len(asked) == len(result.outcomes)
    assert all(end <= nxt + 0.01 for (_, end), (nxt, _) in zip(asked, asked[1:], strict=False)), asked
    # some archive was shipping while the kubelet was dumping the next container
    assert any(p0 < k1 and k0 < p1 for p0, p1 in slow.puts for k0, k1 in asked), (slow.puts, asked)


NEVER_FIRES = '{"schedule": "0 0 30 2 *", "backend": "local", "retention": {"keepLast": 1}}'


def test_a_stored_policy_that_never_fires_is_skipped_with_an_error_and_the_rest_run(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    apply(app, "fast", "@every 1s")
    # stored by an older backupd that accepted it; `policy apply` refuses it now
    app.catalog.apply_policies([("feb30", NEVER_FIRES)])
    daemon = app.daemon(policy_poll_seconds=0.2)
    with structlog.testing.capture_logs() as logs:
        daemon.start()
        t = threading.Thread(target=daemon.serve, daemon=True)
        t.start()
        time.sleep(1.5)
        assert {j.id for j in daemon.scheduler.get_jobs() if not j.id.startswith("__")} == {"fast"}
        app.catalog.delete_policy("feb30")  # forgetting a policy that was never scheduled is no error
        time.sleep(0.6)
        daemon.stop(5)
        t.join(5)
    [invalid] = [e for e in logs if e["event"] == "policy_invalid"]
    assert invalid["policy"] == "feb30" and invalid["log_level"] == "error"
    assert "spec.schedule: cron expression '0 0 30 2 *' never fires" in invalid["error"]
    assert any(e["event"] == "policy_unscheduled" and e["policy"] == "feb30" for e in logs)
    assert not any(e["event"] in ("cycle_crashed", "policy_sync_failed") for e in logs)
    assert checkpoint_runs(app, "fast") and not checkpoint_runs(app, "feb30")
