"""Alerts: a webhook notifier for failed runs and for workloads without a fresh recovery point.

The daemon owns one :class:`Notifier` (built by :func:`notifier_from_config`, ``None`` when no
webhook is configured) and, after each cycle, calls :func:`check_and_alert` with a fresh
:func:`backupd.report.load.load_report`; it may also hand every finished run to
:meth:`Notifier.notify_run` as it happens. Nothing here raises into the daemon: a delivery that
fails is logged (with the webhook's host only) and retried on a later call.

**When it alerts.** An alert has a key ``(kind, run kind, policy, namespace, workload, container,
error kind)`` (for ``stale``, the replica in place of the error kind); while a key is active it
is not sent again:

* ``failed_run``: a run failed (a checkpoint of one container, a policy's discovery, a prune or a
  verify). A container that keeps failing with the same error alerts once; the key is resolved
  when the report no longer calls the workload ``failing`` (its latest cycle succeeded), or, for
  runs passed one by one, when every pod that failed has since succeeded.
* ``stale``: a workload's recovery point is older than ``stale_intervals`` schedule intervals --
  its report status is ``MISSING`` while it has an archive (one that never had any is reported
  by its failed runs). Resolved when the status is ``OK`` or ``LATE`` again.
* ``recovered``: sent when an active key resolves (``send_recovery``), unless the alert itself
  was still waiting to be sent -- then neither goes out.

**Rate limit.** At most one delivery per ``min_interval`` seconds across all alerts. Alerts
raised meanwhile wait and go out together, as one message, on the first call after the interval
(:meth:`Notifier.flush`; :func:`check_and_alert` flushes). At most :data:`MAX_PENDING` wait;
beyond that the oldest are dropped and counted in the next message.

**Payloads** are built from run and report fields only -- never config, credentials, tokens or
URLs. ``format="json"``::

    {"source": "backupd", "version", "node", "sent_at", "dropped",
     "alerts": [{"kind": "failed_run" | "stale" | "recovered", "severity": "error" | "warning" | "info",
                 "summary", "policy", "namespace", "workload", "container", "run_kind", "run_id", "pod",
                 "node", "started_at", "error_kind", "error", "status", "newest", "recovery_point_age_seconds",
                 "replica"}]}                                                       # replica: stale only

``format="slack"``: ``{"text": ...}`` (Slack incoming webhooks, Mattermost, Rocket.Chat), one
line per alert, with Slack's ``& < >`` escaped.

Deliveries are HTTPS with the certificate verified (``ca_file`` adds a private CA; there is no
way to turn verification off) or plain HTTP where the operator configured it; the standard
``HTTPS_PROXY``/``NO_PROXY`` variables apply; redirects are not followed (a payload goes
where it was configured to go, nowhere else). The webhook URL may itself be a secret (Slack's
carries its token in the path): it is never logged or put in an error message; logs name its
host.

The notifier's state lives in memory: after a restart a failure that persists alerts once more.
Daemons sharing a catalog each see every workload in the report, so only one of them should call
:func:`check_and_alert` (e.g. the holder of a catalog lease); :meth:`Notifier.notify_run` with a
daemon's own runs needs no such care.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
import structlog

from backupd import __version__, tls
from backupd.config import AlertsConfig, check_webhook_url
from backupd.errors import ConfigError, scrub
from backupd.model import RUN_FAILED, SUCCEEDED, rfc3339
from backupd.report.model import MISSING, UNMANAGED, RetentionReport, WorkloadStatus

log = structlog.get_logger("backupd.alerts")

MAX_PENDING = 100
FAILED_RUN, STALE, RECOVERED = "failed_run", "stale", "recovered"
_ERROR_CHARS = 1000


def _host(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    except ValueError:
        return "?"


class RunLike(Protocol):
    """A :class:`backupd.model.Run` or a :class:`backupd.report.model.RunSummary` (frozen: the
    fields are read-only properties here, so both match)."""

    @property
    def id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def outcome(self) -> str: ...

    @property
    def policy(self) -> str | None: ...

    @property
    def namespace(self) -> str | None: ...

    @property
    def pod(self) -> str | None: ...

    @property
    def workload(self) -> str | None: ...

    @property
    def container(self) -> str | None: ...

    @property
    def node(self) -> str: ...

    @property
    def started_at(self) -> datetime: ...

    @property
    def error_kind(self) -> str | None: ...

    @property
    def error(self) -> str | None: ...


Key = tuple[str, str, str | None, str | None, str | None, str | None, str | None]


@dataclass
class Alert:
    key: Key
    kind: str
    severity: str
    summary: str
    fields: dict[str, Any] = field(default_factory=dict)
    pods: set[str] = field(default_factory=set)  # failing pods of a failed_run alert (not sent)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "summary": self.summary, **self.fields}


def _scrub(text: str | None) -> str | None:
    """Run errors are written secret-free; this is the belt to those braces: no userinfo in any
    URL, and bounded length."""
    if text is None:
        return None
    text = scrub(text)
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + "…"


def _target(run: RunLike) -> str:
    if run.workload:
        return f"{run.namespace}/{run.workload}/{run.container}"
    return f"policy {run.policy}"


def run_key(run: RunLike) -> Key:
    return (FAILED_RUN, run.kind, run.policy, run.namespace, run.workload, run.container, run.error_kind)


def stale_key(w: WorkloadStatus) -> Key:
    # The last place, a failed run's error kind, holds the replica: each replica of a
    # StatefulSet or DaemonSet goes stale, and recovers, on its own.
    return (STALE, "checkpoint", w.policy, w.namespace, w.workload, w.container, w.replica or None)


class Notifier:
    """Sends de-duplicated, rate-limited alerts to one webhook. Thread-safe; never raises on
    delivery problems.

    ``url`` is a secret (never logged). ``clock`` is a monotonic seconds clock (for the rate
    limit); ``transport`` an httpx transport (tests); ``source`` names the sender (the node).
    """

    def __init__(
        self,
        url: str,
        *,
        format: Literal["json", "slack"] = "json",  # noqa: A002 - the config key's name
        min_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
        ca_file: Path | None = None,
        source: str = "",
        send_recovery: bool = True,
    ) -> None:
        try:
            check_webhook_url(url, "webhook URL")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if format not in ("json", "slack"):
            raise ConfigError(f"alerts.format must be json or slack, not {format!r}")
        self._url = url
        self.host = _host(url)
        self.format = format
        self.min_interval = min_interval
        self.clock = clock
        self.source = source
        self.send_recovery = send_recovery
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = tls.client_context(ca_file)
            except OSError as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"alerts.ca_file: cannot load {str(ca_file)!r}: {exc}") from None
        self._client = httpx.Client(
            transport=transport, timeout=timeout, verify=verify, follow_redirects=False,
            headers={"User-Agent": f"backupd/{__version__}", "Content-Type": "application/json"},
        )
        self._lock = threading.RLock()
        self._active: dict[Key, Alert] = {}
        self._pending: list[Alert] = []
        self._dropped = 0
        self._last_delivery: float | None = None
        self._batching = 0
        self._delivering = False
        self.deliveries = 0  # successful ones, for tests and metrics

    # -- what the daemon calls --------------------------------------------------------------

    def notify_run(self, run: RunLike) -> None:
        """Any finished run: a failure raises its alert; a success clears its pod from the
        target's failed-run alerts, which resolve once no pod of theirs is failing (one replica
        succeeding does not resolve another's persistent failure)."""
        if run.outcome == RUN_FAILED:
            self.notify_failed_run(run)
        elif run.outcome == SUCCEEDED:
            target = (run.kind, run.policy, run.namespace, run.workload, run.container)
            with self._lock:
                cleared = []
                for key, alert in self._active.items():
                    if key[0] == FAILED_RUN and key[1:6] == target:
                        alert.pods.discard(run.pod or "")
                        if not alert.pods:
                            cleared.append(key)
            for key in cleared:
                self._resolve(key)
            if run.kind == "checkpoint" and run.workload:
                # a container checkpointed means the policy's discovery works again too
                self.resolve_target("checkpoint", run.policy, None, None, None)

    def notify_failed_run(self, run: RunLike) -> bool:
        """Alert that ``run`` failed, once per target and error kind; True if newly raised."""
        if run.outcome != RUN_FAILED:
            return False
        with self._lock:
            known = self._active.get(run_key(run))
            if known is not None:
                known.pods.add(run.pod or "")
                return False
        summary = (f"backupd: {run.kind} of {_target(run)} failed: {run.error_kind or 'error'}: "
                   f"{_scrub(run.error) or ''}").rstrip()
        return self._raise(Alert(run_key(run), FAILED_RUN, "error", summary, pods={run.pod or ""}, fields={
            "policy": run.policy, "namespace": run.namespace, "workload": run.workload,
            "container": run.container, "run_kind": run.kind, "run_id": run.id, "pod": run.pod,
            "node": run.node, "started_at": rfc3339(run.started_at), "error_kind": run.error_kind,
            "error": _scrub(run.error),
        }))

    def notify_stale(self, status: WorkloadStatus) -> bool:
        """Alert on a workload whose recovery point is ``MISSING`` (older than N intervals), or
        resolve its alert when it is fresh again; True if newly raised."""
        if status.status == UNMANAGED:
            return False
        if status.status != MISSING or status.newest is None:
            self._resolve(stale_key(status))
            return False
        age = status.recovery_point_age
        summary = (f"backupd: no recent recovery point for {status.target} (policy {status.policy}): "
                   f"{status.reason}")
        return self._raise(Alert(stale_key(status), STALE, "warning", summary, {
            "policy": status.policy, "namespace": status.namespace, "workload": status.workload,
            "replica": status.replica, "container": status.container, "run_kind": "checkpoint",
            "status": status.status,
            "newest": rfc3339(status.newest), "recovery_point_age_seconds": age.total_seconds() if age else None,
            "error_kind": status.last_failure.error_kind if status.last_failure else None,
            "error": _scrub(status.last_failure.error) if status.last_failure else None,
        }))

    def resolve_target(self, run_kind: str, policy: str | None, namespace: str | None, workload: str | None,
                       container: str | None) -> None:
        """Resolve every failed-run alert of one target and run kind (any error kind)."""
        target = (run_kind, policy, namespace, workload, container)
        with self._lock:
            keys = [k for k in self._active if k[0] == FAILED_RUN and k[1:6] == target]
        for k in keys:
            self._resolve(k)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold deliveries until the block ends, so its alerts go out as one message."""
        with self._lock:
            self._batching += 1
        try:
            yield
        finally:
            with self._lock:
                self._batching -= 1
            self.flush()

    def flush(self) -> None:
        """Deliver what waits, if the rate limit allows now. Never raises."""
        with self._lock:
            if self._batching or self._delivering or not self._pending:
                return
            now = self.clock()
            if self._last_delivery is not None and now - self._last_delivery < self.min_interval:
                return
            alerts, dropped = self._pending, self._dropped
            self._pending, self._dropped = [], 0
            self._last_delivery = now
            self._delivering = True
        delivered = False
        try:
            delivered = self._deliver(alerts, dropped)
        finally:
            with self._lock:
                self._delivering = False
                if delivered:
                    self.deliveries += 1
                else:  # keep them for the next try (after the interval), within the bound
                    self._pending = alerts + self._pending
                    self._dropped += dropped
                    self._trim()

    def active(self) -> list[Alert]:
        with self._lock:
            return list(self._active.values())

    def close(self) -> None:
        self._client.close()

    # -- internals ------------------------------------------------------------------------

    def _raise(self, alert: Alert) -> bool:
        with self._lock:
            if alert.key in self._active:
                return False
            self._active[alert.key] = alert
            self._pending.append(alert)
            self._trim()
        log.info("alert_raised", kind=alert.kind, policy=alert.fields.get("policy"),
                 workload=alert.fields.get("workload"), container=alert.fields.get("container"),
                 error_kind=alert.fields.get("error_kind"))
        self.flush()
        return True

    def _resolve(self, key: Key) -> None:
        with self._lock:
            alert = self._active.pop(key, None)
            if alert is None:
                return
            if any(a is alert for a in self._pending):
                self._pending = [a for a in self._pending if a is not alert]  # never sent: nothing to take back
                return
            if not self.send_recovery:
                return
            what = "runs succeed again" if alert.kind == FAILED_RUN else "has a fresh recovery point again"
            f = alert.fields
            target = (f"{f.get('namespace')}/{f.get('workload')}/{f.get('container')}" if f.get("workload")
                      else f"policy {f.get('policy')}")
            summary = f"backupd: recovered: {target} {f.get('run_kind')} {what}"
            if alert.kind == FAILED_RUN and f.get("error_kind"):
                summary += f" (was {f['error_kind']})"
            self._pending.append(Alert(key, RECOVERED, "info", summary, {
                k: f.get(k) for k in ("policy", "namespace", "workload", "container", "run_kind", "error_kind")
            } | {"resolves": alert.kind}))
            self._trim()
        self.flush()

    def _trim(self) -> None:
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            self._dropped += excess

    def _payload(self, alerts: list[Alert], dropped: int) -> dict[str, Any]:
        if self.format == "slack":
            lines = [_slack_escape(a.summary) for a in alerts]
            if dropped:
                lines.append(f"…and {dropped} older alert(s) dropped by the rate limit")
            return {"text": "\n".join(lines)}
        return {
            "source": "backupd", "version": __version__, "node": self.source,
            "sent_at": rfc3339(datetime.now(UTC)), "dropped": dropped, "alerts": [a.to_json() for a in alerts],
        }

    def _deliver(self, alerts: list[Alert], dropped: int) -> bool:
        try:
            response = self._client.post(self._url, json=self._payload(alerts, dropped))
        except Exception as exc:  # noqa: BLE001 - a webhook problem must never reach the daemon
            # Exception texts may quote the URL, which may hold a token: the class and host only.
            log.warning("alert_delivery_failed", host=self.host, error_kind=type(exc).__name__, alerts=len(alerts))
            return False
        if not 200 <= response.status_code < 300:
            log.warning("alert_delivery_failed", host=self.host, status=response.status_code, alerts=len(alerts))
            return False
        log.info("alert_delivered", host=self.host, status=response.status_code, alerts=len(alerts))
        return True


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def notifier_from_config(config: AlertsConfig, *, source: str = "") -> Notifier | None:
    """The daemon's notifier, or None when ``[alerts]`` has no webhook. Raises ConfigError."""
    url = config.resolved_url()
    if url is None:
        return None
    return Notifier(url, format=config.format, min_interval=config.min_interval_seconds,
                    timeout=config.timeout_seconds, ca_file=config.ca_file, source=source,
                    send_recovery=config.send_recovery)


def _newer(a: RunLike, b: RunLike | None) -> bool:
    return b is None or (a.started_at, a.id) > (b.started_at, b.id)


def check_and_alert(notifier: Notifier, report: RetentionReport) -> None:
    """Raise and resolve alerts from a report (its runs and workload statuses), then deliver.

    Only the latest run of each target counts: an old failure followed by a success resolves,
    never re-alerts. The report's ``stale_intervals`` should be the config's. Never raises.
    """
    try:
        with notifier.batch():
            for p in report.policies:
                if not p.managed:
                    continue
                failure, success = p.last_failure, p.last_success
                # a failure of the policy as a whole (its discovery), not of one container
                if failure is not None and failure.workload is None and _newer(failure, success):
                    notifier.notify_failed_run(failure)
                elif success is not None:
                    notifier.resolve_target("checkpoint", p.name, None, None, None)
                for run in (p.last_prune, p.last_verify):
                    if run is not None:
                        notifier.notify_run(run)
                # failed-run alerts are per container, and its replicas are workloads of their own:
                # one replica's success must not resolve another's failure
                failing = {(w.namespace, w.workload, w.container) for w in p.workloads if w.failing}
                for w in p.workloads:
                    if w.failing and w.last_failure is not None:
                        notifier.notify_failed_run(w.last_failure)
                    elif w.last_success is not None and (w.namespace, w.workload, w.container) not in failing:
                        notifier.resolve_target("checkpoint", w.policy, w.namespace, w.workload, w.container)
                    notifier.notify_stale(w)
    except Exception:  # the daemon must go on whatever happens here
        log.exception("alert_check_failed")
