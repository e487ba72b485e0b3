"""Prometheus metrics.

Event metrics (runs, durations, bytes, deletions, errors) are counted where the events happen;
state metrics (what is retained, when each workload last succeeded) are read from the catalog
at scrape time by :class:`CatalogCollector`, so they are right after a restart and agree across
daemons sharing one catalog. Each :class:`Metrics` has its own registry (tests build several).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backupd.catalog.store import Catalog
from backupd.errors import BackupdError
from backupd.model import RUN_FAILED

# Checkpoints of real workloads take from a second to many minutes.
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs = Counter("backupd_runs", "Runs by kind and outcome.", ["kind", "outcome"], registry=r)
        self.checkpoint_seconds = Histogram(
            "backupd_checkpoint_duration_seconds", "Time the kubelet took to checkpoint a container.",
            buckets=_DURATION_BUCKETS, registry=r)
        self.upload_seconds = Histogram(
            "backupd_upload_duration_seconds", "Time to compress and store one archive (put and manifest).",
            ["backend"], buckets=_DURATION_BUCKETS, registry=r)
        self.bytes_read = Counter("backupd_bytes_read", "Checkpoint tar bytes read from the node.", registry=r)
        self.bytes_shipped = Counter("backupd_bytes_shipped", "Bytes stored in backends (compressed).",
                                     ["backend"], registry=r)
        self.prune_deletions = Counter("backupd_prune_deletions", "Archives deleted by retention.", ["policy"],
                                       registry=r)
        self.errors = Counter("backupd_errors", "Errors by class.", ["kind"], registry=r)

    def error(self, exc: BaseException) -> None:
        self.errors.labels(kind=exc.kind if isinstance(exc, BackupdError) else type(exc).__name__).inc()

    def run_failed(self, kind: str, exc: BaseException) -> None:
        """A failed run of ``kind``: counted once in runs and once in errors by its class."""
        self.runs.labels(kind=kind, outcome=RUN_FAILED).inc()
        self.error(exc)

    def watch_catalog(self, catalog: Catalog) -> None:
        self.registry.register(CatalogCollector(catalog))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class CatalogCollector(Collector):
    """Retained archives and bytes per policy; last success per workload -- from the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def describe(self) -> list[Metric]:
        return []  # nothing to describe up front: the catalog may be unreachable at registration

    def collect(self) -> Iterator[Metric]:
        archives = GaugeMetricFamily("backupd_archives_retained", "Committed archives per policy.", labels=["policy"])
        stored = GaugeMetricFamily("backupd_bytes_retained", "Stored bytes of committed archives per policy.",
                                   labels=["policy"])
        last_ok = GaugeMetricFamily(
            "backupd_last_success_timestamp_seconds", "When the newest successful checkpoint run of a container "
            "finished (Unix time).", labels=["namespace", "workload", "container"])
        up = GaugeMetricFamily("backupd_catalog_up", "1 if the catalog answered this scrape.")
        try:
            totals = self.catalog.totals()
        except Exception:
            # A scrape must not fail because the database blinked; readiness reports it.
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for policy, (count, total) in totals.retained.items():
            archives.add_metric([policy], count)
            stored.add_metric([policy], total)
        for (namespace, workload, container), finished in totals.last_success.items():
            last_ok.add_metric([namespace, workload, container], finished.timestamp())
        yield from (up, archives, stored, last_ok)
