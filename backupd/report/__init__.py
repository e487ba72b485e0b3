"""The retention report: per policy and per workload, what is kept, how fresh it is, what goes next.

Read it in this order:

* :mod:`.model` -- the report's values (:class:`~.model.RetentionReport`, its policies,
  workloads, runs and archive points) and their JSON;
* :mod:`.build` -- pure: the report's facts (:class:`~.build.ReportFacts`) and a moment in,
  a report out (:func:`~.build.assemble`); no clock, no catalog, no IO, so the CLI, the daemon's
  ``/api/v1/report`` and the alerts all see the same answer for the same facts. The facts come
  from every archive and run (:func:`~.build.build_report`, for tests and small inputs) or ...
* :mod:`.load` -- ... from the catalog's aggregates (:func:`~.load.load_report`): per workload
  its counts, sizes, oldest and newest archive, and only the newest archives the retention rules
  look at (:func:`backupd.policy.retention.plan_head`); per policy its storage curve in at most
  ``STORAGE_POINTS`` steps; the latest run of each kind, target, pod and outcome. Both give the
  same report (tested); the catalog's way costs what the number of workloads and their rules'
  reach cost, not what the number of archives does;
* :mod:`.render` (a text table) and :mod:`.html` (one self-contained page, from the Jinja2
  template ``templates/report.html.j2``) present a report;
* :mod:`.cache` -- the daemon's last report and its JSON, refreshed in the background, which
  ``/api/v1/report`` answers from.

Workloads are retention groups: policy + namespace + workload (owning controller) + replica +
container (the replica of a StatefulSet pod is the pod, of a DaemonSet pod its node, ``""``
for interchangeable pods: :func:`backupd.model.replica_of`). They come from the policy's
committed archives *and* from its checkpoint runs (a run's replica is derived from its pod and
node), so a container whose every run failed (runs, no archive) is listed too.

**Status** of a workload, precisely. Let ``newest`` be the checkpoint time of its newest
committed archive, ``f1 = schedule.next_after(newest)`` the first scheduled run after it,
``fN`` the N-th (``N = stale_intervals``, default 3) and ``grace = schedule.period / 2``:

* ``OK`` -- ``now <= f1 + grace``: the run due after the newest archive is not overdue by more
  than half a period (for ``@every 1h`` the recovery point is at most ~1.5 h old);
* ``LATE`` -- ``f1 + grace < now <= fN + grace``: at least one scheduled run has passed without
  a new archive;
* ``MISSING`` -- ``now > fN + grace`` (N scheduled runs passed without an archive), or the
  workload has no committed archive at all (e.g. every run of it failed);
* ``UNMANAGED`` -- archives of a policy that no longer exists, or whose stored spec cannot be
  applied any more (it no longer validates, its schedule never fires: the policy's ``error``
  says why): nothing schedules or prunes them.

Independently of status, ``failing`` says the workload's latest cycle had a failure: some pod's
latest checkpoint run failed, and that run started within ``max(3/4 period, 5 min)`` of the
workload's latest run. Per pod, so one replica failing every cycle while another succeeds stays
failing (no flapping); within the latest cycle, so a pod that failed as it went away (a rollout)
stops counting once the next cycle ran without it. A policy's status is the worst of its
workloads' (``MISSING`` > ``LATE`` > ``OK``; ``OK`` when it has none).

**JSON** (:meth:`RetentionReport.to_json`; field names are a public contract -- add, never rename).
Times are RFC 3339 UTC with ``Z``, sizes bytes, durations seconds::

    {"format": "backupd.report/v1", "generated_at", "stale_intervals",
     "summary": {"policies", "workloads", "ok", "late", "missing", "unmanaged", "failing",
                 "archives", "stored_bytes", "prune_remove_archives", "prune_remove_bytes"},
     "policies": [{
        "name", "managed", "schedule", "timezone", "backend", "period_seconds", "status",
        "archives", "stored_bytes", "next_run",
        "last_success", "last_failure",        # checkpoint runs of any target (run or null)
        "last_prune", "last_verify",           # the latest run of that kind (run or null)
        "prune": {"remove_archives", "remove_bytes"},
        "storage": [{"time", "stored_bytes"}], # cumulative bytes of the kept archives by time,
                                               # at most STORAGE_POINTS steps
        "error",                               # why a stored policy cannot be applied, else null
        "workloads": [{
           "policy", "namespace", "workload", "replica", "container", "status", "reason", "failing",
           "archives", "stored_bytes", "oldest", "newest", "recovery_point_age_seconds",
           "due_at", "late_after", "missing_after", "next_run", "last_success", "last_failure",
           "prune": {"remove_archives", "remove_bytes",  # all of the workload's archives
                     "remove": [archive point]},        # those on the timeline
           "timeline": [archive point],        # the newest TIMELINE_POINTS archives
           "timeline_complete",                # false when older archives are not listed
           "logical_bytes", "dedup_ratio"}]}]} # only when a backend has format = "dedup": tar
                                               # bytes, and their ratio to stored_bytes

The daemon's ``/api/v1/report`` answers from its last report (``generated_at`` says when it
was computed; :mod:`.cache`) and, unless asked with ``?timeline=1``, without the archive points:
``timeline`` and ``prune.remove`` empty, ``timeline_complete`` false. ``backupd report``
computes a fresh report with everything.

    run:           {"id", "kind", "outcome", "policy", "namespace", "pod", "workload", "container",
                    "node", "started_at", "finished_at", "error_kind", "error"}
    archive point: {"id", "time", "stored_size", "pinned", "keep", "reasons"}   # oldest first

``reasons`` are the retention engine's (``last``, ``daily``, ``oldest weekly``, ``within``,
``pinned``, ``newest``; for removals ``no rule`` or ``size cap``): exactly what the next prune
would do (:func:`backupd.storage.prune.plan_policy`).
"""
