"""The report as plain text for a terminal (``backupd report``, the default output)."""

from __future__ import annotations

from backupd.model import RUN_FAILED
from backupd.report.model import OK, RetentionReport, RunSummary, format_age, format_moment
from backupd.sizes import human_bytes


def _aligned_table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _run_line(label: str, run: RunSummary | None) -> str:
    if run is None:
        return f"{label} -"
    text = f"{label} {format_moment(run.started_at)}"
    if run.outcome == RUN_FAILED:
        text += f" {run.error_kind or 'error'}: {run.error or ''}".rstrip()
    return text


def render_table(report: RetentionReport) -> str:
    """The report as plain text for a terminal: a summary line, then a table per policy and the
    failures with their reasons."""
    s = report.summary()
    out = [
        f"retention report at {format_moment(report.generated_at)}: {s['workloads']} workload(s): {s['ok']} OK, "
        f"{s['late']} LATE, {s['missing']} MISSING" + (f", {s['unmanaged']} UNMANAGED" if s["unmanaged"] else "")
        + (f" ({s['failing']} failing)" if s["failing"] else "")
        + f"; {s['archives']} archive(s), {human_bytes(s['stored_bytes'])} stored; next prune removes "
        f"{s['prune_remove_archives']} ({human_bytes(s['prune_remove_bytes'])})",
    ]
    if not report.policies:
        out.append("no policies and no archives in the catalog yet: apply one with `backupd policy apply -f FILE`")
    for p in report.policies:
        out.append("")
        if p.managed:
            out.append(f"policy {p.name} [{p.status}]: schedule {p.schedule!r} ({p.timezone}), backend {p.backend}, "
                       f"next run {format_moment(p.next_run)}")
            out.append(f"  {_run_line('last success', p.last_success)}; "
                       f"{_run_line('last failure', p.last_failure)}")
            for label, run in (("last prune", p.last_prune), ("last verify", p.last_verify)):
                if run is not None and run.outcome == RUN_FAILED:
                    out.append("  " + _run_line(label + " failed", run))
        else:
            why = f"cannot be applied: {p.error}" if p.error else "no longer in the catalog"
            out.append(f"policy {p.name} [UNMANAGED]: {why}; its archives are neither scheduled nor pruned")
        if not p.workloads:
            out.append("  no workload has been checkpointed yet")
            continue
        replicas = any(w.replica for w in p.workloads)  # a column only where some workload has them
        dedup = any(w.logical_bytes is not None for w in p.workloads)  # only where a backend deduplicates
        rows = []
        for w in p.workloads:
            rows.append([
                w.status + ("!" if w.failing else ""), w.namespace, w.workload,
                *([w.replica or "-"] if replicas else []), w.container, str(w.archives),
                *([human_bytes(w.logical_bytes)] if dedup else []), human_bytes(w.stored_bytes),
                *([f"{w.dedup_ratio:.2f}x" if w.dedup_ratio else "-"] if dedup else []),
                format_moment(w.oldest), format_moment(w.newest),
                format_age(w.recovery_point_age) if w.recovery_point_age is not None else "-",
                format_moment(w.last_success.started_at if w.last_success else None),
                format_moment(w.last_failure.started_at if w.last_failure else None),
                f"{w.remove_archives} ({human_bytes(w.remove_bytes)})" if w.remove_archives else "0",
            ])
        headers = ["status", "namespace", "workload", *(["replica"] if replicas else []), "container", "archives",
                   *(["logical"] if dedup else []), "stored", *(["dedup"] if dedup else []), "oldest", "newest", "age",
                   "last success", "last failure", "prune removes"]
        out += ["  " + line for line in _aligned_table(rows, headers)]
        notes = [w for w in p.workloads if w.status != OK or w.failing]
        for w in notes:
            line = f"  {w.status}{' (failing)' if w.failing else ''} {w.target}: {w.reason}"
            if w.failing and w.last_failure is not None and w.newest is not None:
                line += f"; last run failed {format_moment(w.last_failure.started_at)} {w.last_failure.error_kind}: " \
                        f"{w.last_failure.error or ''}".rstrip()
            out.append(line)
    if any(w.failing for w in report.workloads()):
        out.append("")
        out.append("! = the latest checkpoint run of this workload failed")
    return "\n".join(out) + "\n"

