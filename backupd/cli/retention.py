"""``backupd retention simulate``, ``backupd prune``, ``backupd pin`` / ``unpin``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from backupd.cli.base import OUTPUT, Context, cli, human_bytes, output_option, pass_ctx, print_data, print_table
from backupd.errors import InvalidInput, NotFound, PolicyError, RunsFailed
from backupd.model import rfc3339
from backupd.policy import retention

if TYPE_CHECKING:
    from backupd.storage.prune import PruneResult


class _Count(click.ParamType):
    """restic's count flags: an integer >= 0, or -1 / ``unlimited``."""

    name = "count"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if str(value).lower() == "unlimited":
            return -1
        try:
            n = int(value)
        except ValueError:
            self.fail(f"expected a number or 'unlimited', got {value!r}", param, ctx)
        if n < -1:
            self.fail(f"expected a number >= 0, or -1/'unlimited', got {value!r}", param, ctx)
        return n


class DurationParam(click.ParamType):
    """A restic duration (``7d``, ``36h``, ``1y6m``) as :class:`backupd.policy.retention.Duration`."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> retention.Duration:
        if isinstance(value, retention.Duration):
            return value
        try:
            return retention.Duration.parse(str(value))
        except PolicyError as exc:
            self.fail(str(exc), param, ctx)


COUNT_FLAGS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
WITHIN_FLAGS = ("within", "within-hourly", "within-daily", "within-weekly", "within-monthly", "within-yearly")


@cli.group("retention")
def retention_group() -> None:
    """Try retention rules without touching any archive."""


def _keep_options(fn: Any) -> Any:
    for name in reversed(WITHIN_FLAGS):
        fn = click.option(f"--keep-{name}", type=DurationParam(),
                          help=f"restic --keep-{name} (e.g. 7d, 1y6m, 36h).")(fn)
    for name in reversed(COUNT_FLAGS):
        fn = click.option(f"--keep-{name}", type=_Count(), default=0, show_default=False,
                          help=f"restic --keep-{name} (n, or 'unlimited').")(fn)
    return fn


@retention_group.command("simulate")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="JSON list of RFC 3339 timestamps, one per archive ('-' = stdin).")
@_keep_options
@click.option("--timezone", "tz_name", help="Compute buckets in this IANA zone (default: each time's own offset).")
@click.option("--now", "now_text", metavar="TIME",
              help="RFC 3339 (default: the current time, as restic's forget); archives at or after it do not "
                   "anchor keep-within windows.")
@output_option(default="json")
def simulate(input_path: str, tz_name: str | None, now_text: str | None, output: str, **flags: Any) -> None:
    """What a rule set keeps of a list of archive times (restic forget semantics).

    Prints {"keep": [{"time", "reasons"}], "remove": [{"time"}]}, newest first. keep-within
    windows are measured from the newest archive before --now (default: the current time).
    """
    try:
        raw = sys.stdin.read() if input_path == "-" else Path(input_path).read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {input_path!r}: {exc.strerror}") from None
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"{input_path}: not valid JSON: {exc}") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidInput(f"{input_path}: expected a JSON list of RFC 3339 timestamp strings")
    times = [retention.parse_rfc3339(v) for v in values]
    tz = None
    if tz_name:
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidInput(f"--timezone: unknown time zone {tz_name!r}") from None
    rules = retention.Rules(
        **{name: flags[f"keep_{name}"] for name in COUNT_FLAGS},
        **{name.replace("-", "_"): flags[f"keep_{name.replace('-', '_')}"] for name in WITHIN_FLAGS},
    )
    now = retention.parse_rfc3339(now_text) if now_text else datetime.now(UTC)
    result = retention.simulate(times, rules, tz=tz, now=now)
    if output != "table":
        print_data(result, output)
        return
    rows = [(k["time"], "keep", ", ".join(k["reasons"])) for k in result["keep"]]
    rows += [(r["time"], "remove", "") for r in result["remove"]]
    rows.sort(key=lambda r: retention.parse_rfc3339(r[0]), reverse=True)
    print_table(rows, ["time", "decision", "reasons"])


def _prune_json(result: PruneResult) -> dict[str, Any]:
    return {
        "policy": result.policy,
        "dry_run": result.dry_run,
        "error": str(result.error) if result.error else None,
        "resumed": [a.id for a in result.resumed],
        "groups": [
            {
                "namespace": p.namespace,
                "workload": p.workload,
                "replica": p.replica,
                "container": p.container,
                "decisions": [
                    {"id": d.archive.id, "time": rfc3339(d.archive.checkpoint_time),
                     "keep": d.keep, "reasons": list(d.reasons), "stored_size": d.archive.stored_size,
                     "pinned": d.archive.pinned}
                    for d in p.decisions
                ],
            }
            for p in result.plans
        ],
        "remove": [a.id for a in result.removals],
        "deleted": [a.id for a in result.deleted],
        "bytes_freed": result.bytes_freed if not result.dry_run else sum(a.stored_size or 0 for a in result.removals),
    }


@cli.command()
@click.option("--policy", "policy_name", help="Only this policy (default: every policy).")
@click.option("--dry-run", is_flag=True, help="Print the exact plan, with reasons, and change nothing.")
@OUTPUT
@pass_ctx
def prune(ctx: Context, policy_name: str | None, dry_run: bool, output: str) -> None:
    """Apply retention now. Deletes manifests, then objects, then catalog rows."""
    from backupd.storage.delete import policy_gone

    app = ctx.app
    app.catalog.check_schema()
    if policy_name:
        try:
            policies = [app.load_policy(policy_name)]
        except NotFound:
            raise policy_gone(app.catalog, policy_name) from None
    else:
        policies = app.policies()
    results = [app.pruner.prune(p, dry_run=dry_run) for p in policies]
    if not policy_name:  # deletes a crash interrupted in policies deleted since: no prune of theirs finishes them
        results += app.deleter.finish_leftovers({p.name for p in policies}, dry_run=dry_run)
    if output != "table":
        print_data([_prune_json(r) for r in results], output)
    else:
        for r in results:
            verb = "would remove" if dry_run else "removed"
            removals = r.removals if dry_run else r.deleted
            click.echo(f"policy {r.policy}: {verb} {len(removals)} archive(s), "
                       f"{human_bytes(sum(a.stored_size or 0 for a in removals))}"
                       + (f" (finishing {len(r.resumed)} left by an interrupted prune or delete)" if r.resumed else ""))
            rows = [
                (p.namespace, p.workload, p.replica or "-", p.container, d.archive.id, d.archive.checkpoint_time,
                 "keep" if d.keep else "REMOVE", ", ".join(d.reasons))
                for p in r.plans for d in p.decisions
            ]
            if rows:
                print_table(rows, ["namespace", "workload", "replica", "container", "archive", "time", "decision",
                                   "reasons"])
            if r.error:
                click.echo(f"error: {r.error}", err=True)
    if not dry_run:
        _collect_garbage(app, quiet=output != "table")
    if any(r.error for r in results):
        raise RunsFailed("pruning failed for some policies (see above); rerunning finishes the interrupted deletes")


def _collect_garbage(app: Any, *, quiet: bool) -> None:
    """After a prune, the packs of ``format = "dedup"`` backends that no archive uses any more,
    and those it uses little of (``backupd gc``; its two phases are a grace period apart, so
    this run marks what the next one deletes, and a pack repacked now goes with the next)."""
    from backupd.errors import LeaseHeld

    for backend in app.config.backends:
        if backend.format != "dedup":
            continue
        try:
            gc = app.collect_garbage(backend.name)
        except LeaseHeld:
            continue  # the daemon's maintenance is collecting it now
        if not quiet:
            click.echo(f"backend {backend.name}: packs marked unused {len(gc.marked)}, deleted {len(gc.deleted)} "
                       f"({human_bytes(gc.bytes_freed)}), repacked {len(gc.repack.repacked)}"
                       + (f" (repack skipped: {gc.repack.skipped})" if gc.repack.skipped else ""))


def _set_pin(ctx: Context, archive_id: str, pinned: bool) -> None:
    ctx.app.catalog.check_schema()
    archive = ctx.app.catalog.set_pinned(archive_id, pinned)
    state = "pinned: no retention rule will remove it" if pinned else "unpinned: retention rules apply again"
    click.echo(f"archive {archive.id} ({archive.namespace}/{archive.workload}/{archive.container} "
               f"{archive.checkpoint_time:%Y-%m-%d %H:%M:%SZ}) {state}")


@cli.command()
@click.argument("archive_id")
@pass_ctx
def pin(ctx: Context, archive_id: str) -> None:
    """Protect an archive from every retention rule."""
    _set_pin(ctx, archive_id, True)


@cli.command()
@click.argument("archive_id")
@pass_ctx
def unpin(ctx: Context, archive_id: str) -> None:
    """Let retention rules apply to a pinned archive again."""
    _set_pin(ctx, archive_id, False)
