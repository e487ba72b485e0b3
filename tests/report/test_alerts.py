"""Alerts to a real local webhook receiver: a failed run is delivered once, without secrets;
de-duplication, the rate limit, recovery, staleness, Slack's format, TLS verification, and
delivery failures that never reach the daemon."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from pydantic import ValidationError

from backupd.config import format_validation_error
from backupd.daemon.alerts import AlertsConfig, Notifier, check_and_alert, notifier_from_config
from backupd.errors import ConfigError
from backupd.model import RUN_FAILED
from backupd.policy.document import parse_policies
from backupd.report.build import build_report
from backupd.report.load import load_report
from backupd.simulator.server import NodeSimulator
from tests.policies import web_policy
from tests.report.conftest import Receiver
from tests.report.test_build import T0, archive, policy, run

WEBHOOK_TOKEN = "T0KEN-in-the-webhook-path-never-logged-7d1e"
REGISTRY_PASSWORD = "hunter2-registry-password"



class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_run_triggers_exactly_one_delivery_without_secrets(
        s3_app_factory, sim: NodeSimulator, receiver: Receiver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.s3_rig import FAKE_ACCESS_KEY, FAKE_SECRET

    app = s3_app_factory()  # its config holds S3 keys: they must never reach a webhook
    policy_ = parse_policies(web_policy(), "web.yaml", backends=["local", "s3"])[0]
    app.catalog.apply_policies([(policy_.name, policy_.canonical_json())])
    url_file = tmp_path / "webhook-url"
    url_file.write_text(receiver.url(f"/hooks/{WEBHOOK_TOKEN}") + "\n")
    notifier = notifier_from_config(AlertsConfig(webhook_url_file=url_file, min_interval_seconds=0), source="sim-node")
    assert notifier is not None
    sim.add_fault("checkpoint_error", method="POST", path="/checkpoint/default/*/nginx",
                  message=f"pulling https://robot:{REGISTRY_PASSWORD}@registry.example/web failed")

    with structlog.testing.capture_logs() as logs:
        for _ in range(2):  # the container keeps failing: still one alert
            result = app.runner.cycle(policy_)
            assert result.outcomes and all(o.run.outcome == RUN_FAILED for o in result.outcomes)
            check_and_alert(notifier, load_report(app.catalog, stale_intervals=3))
    assert len(receiver.deliveries) == 1
    delivery = receiver.deliveries[0]
    assert delivery.path == f"/hooks/{WEBHOOK_TOKEN}"  # it went where configured
    body = delivery.json()
    assert body["source"] == "backupd" and body["node"] == "sim-node" and body["dropped"] == 0
    [alert] = body["alerts"]
    assert alert["kind"] == "failed_run" and alert["severity"] == "error"
    assert (alert["policy"], alert["namespace"], alert["workload"], alert["container"]) == (
        "web", "default", "deployment/web", "nginx")
    assert alert["run_kind"] == "checkpoint" and alert["error_kind"] == "CheckpointFailed"
    assert "https://***@registry.example/web" in alert["error"]
    everything = delivery.body.decode() + json.dumps(delivery.headers)
    for secret in (FAKE_ACCESS_KEY, FAKE_SECRET, REGISTRY_PASSWORD, WEBHOOK_TOKEN,
                   sim.client_key.read_text().splitlines()[1]):
        assert secret not in everything
    assert "authorization" not in {k.lower() for k in delivery.headers}
    logged = json.dumps([e for e in logs if e["event"].startswith("alert")], default=str)
    assert WEBHOOK_TOKEN not in json.dumps(logs, default=str) and REGISTRY_PASSWORD not in logged
    assert any(e["event"] == "alert_delivered" and e["host"] == f"127.0.0.1:{receiver.port}" for e in logs)

    # The container recovers: one "recovered" message, then silence.
    sim.clear_faults()
    app.runner.cycle(policy_)
    check_and_alert(notifier, load_report(app.catalog))
    check_and_alert(notifier, load_report(app.catalog))
    assert [d.json()["alerts"][0]["kind"] for d in receiver.deliveries] == ["failed_run", "recovered"]
    assert notifier.active() == []
    notifier.close()


def test_rate_limit_holds_alerts_and_sends_them_together(receiver: Receiver) -> None:
    clock = Clock()
    notifier = Notifier(receiver.url(), min_interval=60, clock=clock)
    now = T0 + timedelta(hours=1)
    a = run(1, now, RUN_FAILED, error_kind="KubeletTimeout", error="timed out")
    b = run(2, now, RUN_FAILED, workload="deployment/api", container="app", error_kind="CheckpointFailed", error="x")
    c = run(3, now, RUN_FAILED, workload="deployment/db", container="pg", error_kind="NoSpace", error="disk full")
    assert notifier.notify_failed_run(a)
    assert len(receiver.deliveries) == 1  # the first goes at once
    clock.now += 10
    assert notifier.notify_failed_run(b) and notifier.notify_failed_run(c)
    assert not notifier.notify_failed_run(a)  # de-duplicated
    clock.now += 40
    notifier.flush()
    assert len(receiver.deliveries) == 1  # still inside the interval
    clock.now += 11
    notifier.flush()
    assert len(receiver.deliveries) == 2
    held = receiver.deliveries[1].json()["alerts"]
    assert [(x["workload"], x["error_kind"]) for x in held] == [("deployment/api", "CheckpointFailed"),
                                                               ("deployment/db", "NoSpace")]
    notifier.close()


def test_one_replica_failing_while_another_succeeds_alerts_once(receiver: Receiver) -> None:
    notifier = Notifier(receiver.url(), min_interval=0)

    def replica(i: int, pod: str, outcome: str):  # type: ignore[no-untyped-def]
        r = run(i, T0 + timedelta(hours=i), outcome, error_kind="CheckpointFailed" if outcome == RUN_FAILED else None)
        from dataclasses import replace
        return replace(r, pod=pod)

    for i in range(0, 8, 2):  # every cycle: web-a succeeds, web-b fails
        notifier.notify_run(replica(i, "web-a", "succeeded"))
        notifier.notify_run(replica(i + 1, "web-b", RUN_FAILED))
    assert [d.json()["alerts"][0]["kind"] for d in receiver.deliveries] == ["failed_run"]
    notifier.notify_run(replica(9, "web-b", "succeeded"))
    assert [d.json()["alerts"][0]["kind"] for d in receiver.deliveries] == ["failed_run", "recovered"]
    notifier.close()


def test_report_failing_is_per_pod_so_a_steady_replica_failure_does_not_flap() -> None:
    p = policy()
    runs = []
    for cycle in range(3):
        at = T0 + timedelta(hours=cycle)
        runs.append(run(10 * cycle, at + timedelta(seconds=1 + (cycle % 2) * 5), "succeeded"))
        from dataclasses import replace
        runs.append(replace(run(10 * cycle + 1, at + timedelta(seconds=3), RUN_FAILED, error_kind="CheckpointFailed",
                                error="x"), pod="web-abc-2"))
        report = build_report([p], [archive(cycle, at + timedelta(seconds=2))], runs, at + timedelta(minutes=1))
        assert next(report.workloads()).failing, cycle
    # web-abc-2 went away (a rollout) after failing: the next cycle runs without it
    at = T0 + timedelta(hours=3)
    runs.append(run(99, at, "succeeded"))
    report = build_report([p], [archive(9, at)], runs, at + timedelta(minutes=1))
    assert not next(report.workloads()).failing


def test_a_recovery_before_the_alert_went_out_sends_nothing(receiver: Receiver) -> None:
    clock = Clock()
    notifier = Notifier(receiver.url(), min_interval=60, clock=clock)
    notifier.notify_failed_run(run(1, T0, RUN_FAILED, workload="deployment/api", container="app",
                                   error_kind="CheckpointFailed", error="x"))
    notifier.notify_failed_run(run(2, T0, RUN_FAILED, error_kind="KubeletTimeout", error="y"))  # held
    notifier.notify_run(run(3, T0 + timedelta(minutes=1), "succeeded"))  # web recovers while held
    clock.now += 61
    notifier.flush()
    assert len(receiver.deliveries) == 1 and receiver.deliveries[0].json()["alerts"][0]["workload"] == "deployment/api"
    notifier.close()


def test_stale_workloads_alert_once_and_recover(receiver: Receiver) -> None:
    notifier = Notifier(receiver.url(), min_interval=0)
    p = policy(schedule="@hourly")
    archives = [archive(1, T0)]
    fresh = build_report([p], archives, [], T0 + timedelta(minutes=30))
    late = build_report([p], archives, [], T0 + timedelta(hours=2))
    stale = build_report([p], archives, [], T0 + timedelta(hours=3, minutes=31), stale_intervals=3)
    check_and_alert(notifier, fresh)
    check_and_alert(notifier, late)
    assert receiver.deliveries == []  # LATE is not yet an alert
    check_and_alert(notifier, stale)
    check_and_alert(notifier, stale)
    assert len(receiver.deliveries) == 1
    [alert] = receiver.deliveries[0].json()["alerts"]
    assert alert["kind"] == "stale" and alert["newest"] == "2026-03-02T00:00:00Z"
    assert alert["recovery_point_age_seconds"] == 3 * 3600 + 31 * 60
    recovered = build_report([p], [*archives, archive(2, T0 + timedelta(hours=4))], [], T0 + timedelta(hours=4))
    check_and_alert(notifier, recovered)
    assert [d.json()["alerts"][0]["kind"] for d in receiver.deliveries] == ["stale", "recovered"]
    notifier.close()


def test_failed_prune_and_policy_discovery_alert_and_resolve(receiver: Receiver) -> None:
    notifier = Notifier(receiver.url(), min_interval=0, send_recovery=False)
    p = policy()
    now = T0 + timedelta(minutes=5)
    runs = [run(1, T0, RUN_FAILED, workload=None, container=None, error_kind="KubeletUnreachable", error="refused"),
            run(2, T0, RUN_FAILED, kind="prune", workload=None, container=None, error_kind="StorageUnavailable",
                error="503")]
    with notifier.batch():
        check_and_alert(notifier, build_report([p], [], runs, now))
    [delivery] = receiver.deliveries  # one message for both
    kinds = {(a["run_kind"], a["error_kind"]) for a in delivery.json()["alerts"]}
    assert kinds == {("checkpoint", "KubeletUnreachable"), ("prune", "StorageUnavailable")}
    runs += [run(3, T0 + timedelta(hours=1), workload=None, container=None, kind="prune"),
             run(4, T0 + timedelta(hours=1))]
    check_and_alert(notifier, build_report([p], [archive(1, T0 + timedelta(hours=1))], runs, now + timedelta(hours=1)))
    assert notifier.active() == [] and len(receiver.deliveries) == 1  # resolved quietly (send_recovery off)
    notifier.close()


def test_slack_format_is_one_text_with_slack_escaping(receiver: Receiver) -> None:
    notifier = Notifier(receiver.url(), format="slack", min_interval=0)
    notifier.notify_failed_run(run(1, T0, RUN_FAILED, error_kind="CheckpointFailed", error="criu <dump> & co"))
    body = receiver.deliveries[0].json()
    assert set(body) == {"text"}
    assert body["text"] == ("backupd: checkpoint of default/deployment/web/nginx failed: CheckpointFailed: "
                            "criu &lt;dump&gt; &amp; co")
    notifier.close()


def test_delivery_failures_are_logged_by_host_never_raised_and_retried(receiver: Receiver) -> None:
    clock = Clock()
    url = receiver.url(f"/hooks/{WEBHOOK_TOKEN}")
    notifier = Notifier(url, min_interval=30, clock=clock)
    receiver.status = 500
    with structlog.testing.capture_logs() as logs:
        assert notifier.notify_failed_run(run(1, T0, RUN_FAILED, error_kind="KubeletTimeout", error="x"))
    assert notifier.deliveries == 0 and len(receiver.deliveries) == 1
    assert [e for e in logs if e["event"] == "alert_delivery_failed"][0]["status"] == 500
    receiver.status = 200
    clock.now += 31
    notifier.flush()
    assert notifier.deliveries == 1 and len(receiver.deliveries) == 2  # the same alert, retried
    assert receiver.deliveries[1].json()["alerts"][0]["run_id"] == 1

    # nothing listens there any more: logged, not raised
    receiver.server.shutdown()
    receiver.server.server_close()
    with structlog.testing.capture_logs() as logs:
        clock.now += 31
        notifier.notify_failed_run(run(2, T0, RUN_FAILED, workload="deployment/api", error_kind="NoSpace", error="y"))
    failed = [e for e in logs if e["event"] == "alert_delivery_failed"]
    assert failed and failed[0]["error_kind"] == "ConnectError" and failed[0]["host"] == f"127.0.0.1:{receiver.port}"
    assert WEBHOOK_TOKEN not in json.dumps(logs, default=str)
    notifier.close()


def test_tls_is_verified(tls_receiver: tuple[Receiver, Path]) -> None:
    receiver, ca_file = tls_receiver
    with structlog.testing.capture_logs() as logs:
        untrusting = Notifier(receiver.url(), min_interval=0)
        untrusting.notify_failed_run(run(1, T0, RUN_FAILED, error_kind="KubeletTimeout", error="x"))
        untrusting.close()
    assert receiver.deliveries == [] and untrusting.deliveries == 0
    assert any(e["event"] == "alert_delivery_failed" and e["error_kind"] == "ConnectError" for e in logs)
    trusting = Notifier(receiver.url(), min_interval=0, ca_file=ca_file)
    trusting.notify_failed_run(run(1, T0, RUN_FAILED, error_kind="KubeletTimeout", error="x"))
    assert len(receiver.deliveries) == 1 and trusting.deliveries == 1
    trusting.close()


# -- config --------------------------------------------------------------------------------


def test_alerts_config(tmp_path: Path) -> None:
    assert AlertsConfig().enabled is False and notifier_from_config(AlertsConfig()) is None
    with pytest.raises(ValidationError) as exc:
        AlertsConfig(webhook_url="https://hooks.example/x", webhook_url_file=tmp_path / "f")
    assert "webhook_url or alerts.webhook_url_file, not both" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        AlertsConfig(webhook_url=f"ftp://robot:{WEBHOOK_TOKEN}@hooks.example/x")
    message = format_validation_error(exc.value, "config.toml")
    assert "alerts.webhook_url: expected an http:// or https:// URL with a host" in message
    assert WEBHOOK_TOKEN not in message and WEBHOOK_TOKEN not in str(exc.value)

    url_file = tmp_path / "url"
    url_file.write_text(f"mailto:{WEBHOOK_TOKEN}\n")
    with pytest.raises(ConfigError) as err:
        AlertsConfig(webhook_url_file=url_file).resolved_url()
    assert str(url_file) in str(err.value) and WEBHOOK_TOKEN not in str(err.value)
    assert err.value.exit_code == 2
    with pytest.raises(ConfigError, match="alerts.webhook_url_file: cannot read .*missing"):
        AlertsConfig(webhook_url_file=tmp_path / "missing").resolved_url()
    with pytest.raises(ValidationError, match="stale_intervals"):
        AlertsConfig(stale_intervals=0)
    config = AlertsConfig(webhook_url="https://hooks.example/services/T/B/x", format="slack")
    assert WEBHOOK_TOKEN not in repr(config) and "hooks.example" not in repr(config)  # SecretStr


def test_replicas_go_stale_and_fail_each_on_their_own_without_flapping(receiver: Receiver) -> None:
    """db-1 of a StatefulSet is stale and failing while db-0 is fine: one stale and one failed-run
    alert, unchanged by every further check (db-0's successes do not resolve db-1's failure)."""
    from dataclasses import replace

    notifier = Notifier(receiver.url(), min_interval=0)
    p = policy(schedule="@hourly")
    now = T0 + timedelta(hours=6)

    def of(pod: str, item):  # type: ignore[no-untyped-def]
        return replace(item, workload="statefulset/db", container="pg", pod=pod, **(
            {"replica": pod} if hasattr(item, "replica") else {}))

    archives = [of("db-0", archive(1, now - timedelta(minutes=20))), of("db-1", archive(2, now - timedelta(hours=5)))]
    runs = [of("db-0", run(1, now - timedelta(minutes=20), "succeeded", workload="statefulset/db", container="pg")),
            of("db-1", run(2, now - timedelta(minutes=19), RUN_FAILED, workload="statefulset/db", container="pg",
                           error_kind="CheckpointFailed", error="x"))]
    for _ in range(3):
        check_and_alert(notifier, build_report([p], archives, runs, now))
    sent = [a for d in receiver.deliveries for a in d.json()["alerts"]]
    assert sorted((a["kind"], a.get("replica")) for a in sent) == [("failed_run", None), ("stale", "db-1")]
    assert next(a for a in sent if a["kind"] == "failed_run")["pod"] == "db-1"
    # db-1 is back: its archive is fresh and its run succeeded
    archives.append(of("db-1", archive(3, now)))
    runs.append(of("db-1", run(3, now, "succeeded", workload="statefulset/db", container="pg")))
    check_and_alert(notifier, build_report([p], archives, runs, now + timedelta(minutes=1)))
    assert [a["kind"] for d in receiver.deliveries[-1:] for a in d.json()["alerts"]] == ["recovered", "recovered"]
    notifier.close()
