"""Runs: each piece of backupd's work (a checkpoint, a prune, a delete, a verify drill) is
recorded the same way -- a run row started, the work timed, the row finished with its outcome
and error, the run and its error class counted in the metrics, one log line at the end.

:func:`recorded_run` does all of it around a block::

    with recorded_run(catalog, metrics, "prune", policy=name, node=node, log=log,
                      event="prune_finished") as run:
        ...                       # the work; raise to fail the run,
        run.bytes_in = freed      # or set run.error to fail it and carry on
        run.fields["deleted"] = n # more fields for the log line

A ``BackupdError`` escaping the block fails the run and passes on. Any other exception is a
bug: it is logged with its traceback (``unexpected_error``), recorded as an internal error
(the run row is not left ``running`` until a restart) and passes on as it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backupd.catalog.store import Catalog
from backupd.errors import BackupdError
from backupd.metrics import Metrics
from backupd.model import RUN_FAILED, SKIPPED, SUCCEEDED, Run


@dataclass
class RunRecord:
    """What the block tells :func:`recorded_run` about its run; ``run`` is the finished row."""

    id: int
    bytes_in: int = 0
    bytes_out: int = 0
    archive_id: str | None = None
    #: a failure the block reports without raising (a delete that stopped part-way, a drill
    #: that found problems)
    error: BackupdError | None = None
    #: added to the log line, after ``outcome`` (and ``error``, ``error_kind``)
    fields: dict[str, Any] = field(default_factory=dict)
    run: Run | None = None

    @property
    def outcome(self) -> str:
        return SUCCEEDED if self.error is None else RUN_FAILED


@contextlib.contextmanager
def recorded_run(catalog: Catalog, metrics: Metrics, kind: str, *, policy: str | None, node: str,
                 log: Any, event: str = "run_finished", **target: str) -> Iterator[RunRecord]:
    """Record the block as one run of ``kind`` (see the module docstring). ``target`` is the
    run's namespace, pod, workload and container where it has one; ``log`` is the caller's
    (bound) logger and ``event`` the name of the line it writes when the run ends."""
    record = RunRecord(catalog.start_run(kind, policy=policy, node=node, **target))
    started = time.monotonic()
    try:
        yield record
    except BackupdError as exc:
        record.error = exc
        _finish(catalog, metrics, kind, record, log, event, started)
        raise
    except Exception as exc:
        # A bug must cost one run, not the run history: record it, keep the traceback.
        log.exception("unexpected_error")
        record.error = BackupdError(f"internal error: {type(exc).__name__}: {exc}")
        _finish(catalog, metrics, kind, record, log, event, started)
        raise
    _finish(catalog, metrics, kind, record, log, event, started)


def _finish(catalog: Catalog, metrics: Metrics, kind: str, record: RunRecord, log: Any, event: str,
            started: float) -> None:
    outcome, error = record.outcome, record.error
    record.run = catalog.finish_run(record.id, outcome, error=error, bytes_in=record.bytes_in,
                                    bytes_out=record.bytes_out, archive_id=record.archive_id)
    metrics.runs.labels(kind=kind, outcome=outcome).inc()
    duration = round(time.monotonic() - started, 3)
    if error is None:
        log.info(event, outcome=outcome, **record.fields, duration_seconds=duration)
    else:
        metrics.error(error)
        log.error(event, outcome=outcome, error=str(error), error_kind=error.kind, **record.fields,
                  duration_seconds=duration)


def record_skipped(catalog: Catalog, kind: str, reason: str, *, policy: str | None, node: str,
                   **target: str) -> Run:
    """A run that did not happen (its target was busy), kept in the history only: not counted
    in the metrics and not logged, as nothing was done."""
    run_id = catalog.start_run(kind, policy=policy, node=node, **target)
    return catalog.finish_run(run_id, SKIPPED, error=BackupdError(reason))

