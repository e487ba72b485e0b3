"""``backupd checkpoint``, ``backupd list`` and ``backupd delete``: taking, listing and deleting archives."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import click

from backupd.cli.base import (
    OUTPUT,
    Context,
    cli,
    human_bytes,
    namespace_option,
    pass_ctx,
    print_data,
    print_data_pages,
    print_table,
    print_table_pages,
)
from backupd.cli.retention import DurationParam
from backupd.errors import InvalidInput, PolicyError, RunsFailed

if TYPE_CHECKING:
    from backupd.model import Archive
    from backupd.policy.retention import Duration
    from backupd.storage.delete import DeleteResult, Plan


def _archive_rows(archives: Iterable[Any]) -> list[tuple[Any, ...]]:
    return [
        (a.id, a.checkpoint_time, a.namespace, a.pod, a.workload, a.replica or "-", a.container,
         human_bytes(a.tar_size), human_bytes(a.stored_size), a.policy, a.backend, "pinned" if a.pinned else a.state)
        for a in archives
    ]


ARCHIVE_HEADERS = ["id", "time", "namespace", "pod", "workload", "replica", "container", "size", "stored", "policy",
                   "backend", "state"]


@cli.command()
@click.option("--policy", "policy_name", help="Only this policy (default: every policy).")
@OUTPUT
@pass_ctx
def checkpoint(ctx: Context, policy_name: str | None, output: str) -> None:
    """Run one checkpoint cycle now, wait for it, and print each result."""
    app = ctx.app
    app.catalog.check_schema()
    runner = app.runner
    policies = [runner.load_policy(policy_name)] if policy_name else runner.policies()
    if not policies:
        raise PolicyError("no policies in the catalog: apply one with `backupd policy apply -f FILE`")
    # Without a daemon on this node, this run owns the node: settle what a crash left first.
    owns_node = app.pipeline.node_lease(app.holder)
    if owns_node:
        app.pipeline.reconcile()
    try:
        results = [runner.cycle(p) for p in policies]
    finally:
        if owns_node:
            app.pipeline.release_node_lease(app.holder)
    if output != "table":
        print_data([
            {
                "policy": r.policy,
                "error": str(r.error) if r.error else None,
                "skipped": r.skipped,
                "runs": [{**o.run.to_json(), "archive": o.archive.to_json() if o.archive else None}
                         for o in r.outcomes],
            }
            for r in results
        ], output)
    else:
        rows = []
        for r in results:
            if r.error:
                rows.append((r.policy, "-", "failed", "-", "-", str(r.error)))
            for o in r.outcomes:
                target = f"{o.run.namespace}/{o.run.pod}/{o.run.container}"
                rows.append((r.policy, target, o.run.outcome, o.archive.id if o.archive else "-",
                             human_bytes(o.archive.stored_size) if o.archive else "-", o.run.error or ""))
            for s in r.skipped:
                rows.append((r.policy, s, "skipped", "-", "-", "another run of this container is in progress"))
        if rows:
            print_table(rows, ["policy", "target", "outcome", "archive", "stored", "error"])
        else:
            click.echo("no running containers matched the policies")
    if any(r.failed for r in results):
        raise RunsFailed("some checkpoints failed (see above)")


@cli.command("list")
@click.option("--policy", "policy_name")
@namespace_option()
@click.option("--pod", help="A pod name or a replica (a StatefulSet pod, a DaemonSet pod's node).")
@click.option("--workload", help="e.g. deployment/web")
@click.option("--container")
@click.option("--all-states", is_flag=True, help="Include pending, failed and deleting archives.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many archives (default: every one, read "
              "from the catalog a page at a time). When more follow, the cursor of the next page is printed on "
              "standard error.")
@click.option("--after", "after_text", metavar="CURSOR",
              help="Only archives after this cursor: the one a previous --limit listing printed (the "
                   "checkpoint_time/id of its last archive).")
@OUTPUT
@pass_ctx
def list_archives(ctx: Context, policy_name: str | None, namespace: str | None, pod: str | None,
                  workload: str | None, container: str | None, all_states: bool, limit: int | None,
                  after_text: str | None, output: str) -> None:
    """Archives in the catalog (committed ones unless --all-states), oldest first."""
    from backupd.catalog.store import Cursor
    from backupd.model import ARCHIVE_STATES, COMMITTED

    after = Cursor.parse(after_text, "--after") if after_text is not None else None
    catalog = ctx.app.catalog
    catalog.check_schema()
    filters: dict[str, Any] = dict(policy=policy_name, namespace=namespace, pod_or_replica=pod, workload=workload,
                                   container=container, states=ARCHIVE_STATES if all_states else (COMMITTED,))
    if limit is None:
        pages: Iterable[list[Any]] = catalog.archive_pages(after=after, **filters)
        following = None
    else:
        page, following = catalog.archive_page(limit=limit, after=after, **filters)
        pages = [page]
    if output != "table":
        print_data_pages(([a.to_json() for a in page] for page in pages), output)
    else:
        print_table_pages((_archive_rows(page) for page in pages), ARCHIVE_HEADERS)
    if following is not None:
        click.echo(f"more archives follow: --after {following}", err=True)


DELETE_HEADERS = ["id", "time", "namespace", "workload", "pod", "container", "stored"]


def _deletion_rows(archives: Iterable[Archive]) -> list[tuple[Any, ...]]:
    return [(a.id, a.checkpoint_time, a.namespace, a.workload, a.pod, a.container, human_bytes(a.stored_size))
            for a in archives]


def print_deletion(archives: Sequence[Archive], *, dry_run: bool, output: str, pending: Sequence[Archive] = (),
                   error: BaseException | None = None) -> None:
    """What a delete removed (or, with ``dry_run``, would remove), and the totals."""
    freed = sum(a.stored_size or 0 for a in archives)
    if output != "table":
        print_data({"dry_run": dry_run, "deleted": [a.to_json() for a in archives], "bytes_freed": freed,
                    "pending_skipped": [a.id for a in pending], "error": str(error) if error else None}, output)
        return
    if archives:
        print_table(_deletion_rows(archives), DELETE_HEADERS)
    pinned = sum(a.pinned for a in archives)
    click.echo(f"{'would delete' if dry_run else 'deleted'} {len(archives)} archive(s), {human_bytes(freed)}"
               + (f" ({pinned} pinned)" if pinned else ""))
    if pending:
        click.echo(f"left {len(pending)} pending archive(s) alone (a commit is in flight): "
                   + ", ".join(a.id for a in pending))


def finish_deletion(result: DeleteResult, output: str) -> None:
    """Print a delete's result; a failure part-way exits with its error after saying how to finish."""
    print_deletion(result.deleted, dry_run=False, output=output, pending=result.plan.pending, error=result.error)
    if result.error is not None:
        left = len(result.plan.archives) - len(result.deleted)
        click.echo(f"{left} archive(s) were not deleted; those already marked deleting are no longer listed. Run the "
                   "same command again (or `backupd prune`) to finish.", err=True)
        raise result.error


def _confirm(plan: Plan) -> None:
    """Several archives chosen by filters: a person at a terminal says yes, a script says --yes."""
    what = f"{len(plan.archives)} archives ({human_bytes(plan.bytes)})"
    if not sys.stdin.isatty():
        raise InvalidInput(f"{what} match the filters: add --yes to delete them (--dry-run lists them); "
                           "nothing was deleted")
    print_table(_deletion_rows(plan.archives), DELETE_HEADERS, err=True)
    click.confirm(f"Delete these {what}?", abort=True, err=True)


@cli.command()
@click.argument("archive_ids", nargs=-1, metavar="[ID]...")
@click.option("--policy", "policy_name", help="Archives of this policy (also one that no longer exists).")
@namespace_option()
@click.option("--workload", help="e.g. deployment/web")
@click.option("--pod")
@click.option("--container")
@click.option("--older-than", type=DurationParam(),
              help="Archives taken before now minus this restic duration (7d, 12h, 1y6m).")
@click.option("--dry-run", is_flag=True, help="Print exactly what would be deleted, and change nothing.")
@click.option("--force", is_flag=True, help="Delete pinned archives too.")
@click.option("--yes", "-y", is_flag=True, help="Delete several archives matched by filters without asking.")
@OUTPUT
@pass_ctx
def delete(ctx: Context, archive_ids: tuple[str, ...], policy_name: str | None, namespace: str | None,
           workload: str | None, pod: str | None, container: str | None, older_than: Duration | None,
           dry_run: bool, force: bool, yes: bool, output: str) -> None:
    """Delete archives now: by ID (or unique prefix), or every archive matching all the filters.

    Manifests, objects and catalog rows go through the same crash-safe protocol as prune (a
    crash is finished by running the command again, or by the next prune). Pinned archives
    need --force; several archives matched by filters need --yes (or a yes at the terminal's
    prompt); pending archives (a commit in flight) are never deleted.
    """
    from backupd.storage.delete import Selection

    ctx.app.catalog.check_schema()
    deleter = ctx.app.deleter
    selection = Selection(archive_ids, policy_name, namespace, workload, pod, container, older_than)
    plan = deleter.plan(selection, force=force)
    if dry_run or not plan.archives:
        print_deletion(plan.archives, dry_run=dry_run, output=output, pending=plan.pending)
        return
    if selection.by_filter and len(plan.archives) > 1 and not yes:
        _confirm(plan)
    finish_deletion(deleter.delete(plan, force=force), output)
