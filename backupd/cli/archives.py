"""``backupd checkpoint`` and ``backupd list``: taking archives and listing them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click

from backupd.cli.base import OUTPUT, Context, cli, human_bytes, namespace_option, pass_ctx, print_data, print_table
from backupd.errors import PolicyError, RunsFailed


def _archive_rows(archives: Iterable[Any]) -> list[tuple[Any, ...]]:
    return [
        (a.id, a.checkpoint_time, a.namespace, a.pod, a.workload, a.container, human_bytes(a.tar_size),
         human_bytes(a.stored_size), a.policy, a.backend, "pinned" if a.pinned else a.state)
        for a in archives
    ]


ARCHIVE_HEADERS = ["id", "time", "namespace", "pod", "workload", "container", "size", "stored", "policy",
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
                "runs": [{**o.run.to_json(), "archive": o.archive.to_json() if o.archive else None} for o in r.outcomes],
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
@click.option("--pod")
@click.option("--workload", help="e.g. deployment/web")
@click.option("--container")
@click.option("--all-states", is_flag=True, help="Include pending, failed and deleting archives.")
@OUTPUT
@pass_ctx
def list_archives(ctx: Context, policy_name: str | None, namespace: str | None, pod: str | None,
                  workload: str | None, container: str | None, all_states: bool, output: str) -> None:
    """Archives in the catalog (committed ones unless --all-states), oldest first."""
    from backupd.catalog import ARCHIVE_STATES, COMMITTED

    ctx.app.catalog.check_schema()
    archives = ctx.app.catalog.list_archives(
        policy=policy_name, namespace=namespace, pod=pod, workload=workload, container=container,
        states=ARCHIVE_STATES if all_states else (COMMITTED,),
    )
    if output != "table":
        print_data([a.to_json() for a in archives], output)
    else:
        print_table(_archive_rows(archives), ARCHIVE_HEADERS)
