"""Alerts through the daemon's wiring: the report-based check the daemon runs every minute."""

from __future__ import annotations

from pydantic import SecretStr

from backupd.policy.document import parse_policies

POLICY = ("apiVersion: backupd.io/v1\nkind: CheckpointPolicy\nmetadata: {name: db}\n"
          "spec: {selector: {namespaces: [shop], containers: [postgres]}, schedule: '@every 1h', backend: local, "
          "retention: {keepLast: 3}}\n")


def test_a_failing_container_alerts_once_through_the_daemon_wiring(app_factory, sim, receiver) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    app.config.alerts.webhook_url = SecretStr(receiver.url("/hook?token=webhook-secret-123"))
    app.config.alerts.min_interval_seconds = 0
    (p,) = parse_policies(POLICY, "p.yaml")
    app.catalog.apply_policies([(p.name, p.canonical_json())])
    sim.add_fault("respond", method="POST", path="/checkpoint/*", status=403, times=None,
                  body="Forbidden (user=backupd, verb=create, resource=nodes, subresource(s)=[checkpoint])\n")
    for _ in range(3):
        app.after_cycle(p, app.runner.cycle(p))
        app.check_alerts()
    assert len(receiver.deliveries) == 1
    body = receiver.deliveries[0].json()
    text = str(body)
    assert "KubeletForbidden" in text and "shop" in text
    assert "webhook-secret-123" not in text
    # a second daemon sharing the catalog does not alert again: the first holds the alerts lease
    other = app_factory(app.config.database.url)
    other.holder = "other-host:1:x"
    other.config.alerts.webhook_url = app.config.alerts.webhook_url
    other.check_alerts()
    assert len(receiver.deliveries) == 1
    # the report is served by the API too
    assert app.report().to_json()["policies"][0]["name"] == "db"
