"""``backupd policy apply|list|delete``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from backupd.cli.archives import finish_deletion
from backupd.cli.base import OUTPUT, Context, cli, pass_ctx, print_data, print_table
from backupd.errors import InvalidInput, NotFound, PolicyError
from backupd.model import rfc3339


@cli.group()
def policy() -> None:
    """Manage checkpoint policies (YAML, Kubernetes style)."""


@policy.command("apply")
@click.option("-f", "--filename", "path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Policy file; several YAML documents allowed; '-' reads stdin.")
@OUTPUT
@pass_ctx
def policy_apply(ctx: Context, path: str, output: str) -> None:
    """Create or update every policy of a file; nothing is applied if one document is invalid."""
    from backupd.policy.document import parse_policies

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read {path!r}: {exc.strerror}") from None
    source = "<stdin>" if path == "-" else path
    policies = parse_policies(text, source, backends=[b.name for b in ctx.config.backends])
    ctx.app.catalog.check_schema()
    results = ctx.app.catalog.apply_policies([(p.name, p.canonical_json()) for p in policies])
    if output != "table":
        print_data([{"name": n, "result": r} for n, r in results], output)
    else:
        for name, result in results:
            click.echo(f"checkpointpolicy/{name} {result}")


@policy.command("list")
@OUTPUT
@pass_ctx
def policy_list(ctx: Context, output: str) -> None:
    """Show the policies in the catalog.

    A stored policy this backupd refuses (e.g. a schedule that never fires, kept from an older
    version) is listed with its error, and is not scheduled by the daemon.
    """
    from backupd.policy.document import stored_document

    catalog = ctx.app.catalog
    catalog.check_schema()
    listed = [(s, stored_document(s.name, s.spec_json)) for s in catalog.list_policies()]
    for _, doc in listed:
        if doc.get("error"):
            click.echo(f"warning: {doc['error']}\n  (not scheduled: apply a corrected policy)", err=True)
    if output != "table":
        print_data([{**doc, "generation": s.generation, "updated_at": rfc3339(s.updated_at),
                     "error": doc.get("error")} for s, doc in listed], output)
        return
    rows = []
    for s, doc in listed:
        spec = doc["spec"] if isinstance(doc["spec"], dict) else {}
        if doc.get("error"):
            retention = "INVALID: not scheduled (see above)"
        else:
            retention = " ".join(f"{k}={v}" for k, v in spec["retention"].items())
        rows.append((s.name, spec.get("schedule"), spec.get("backend"), _selector(spec.get("selector")), retention,
                     s.updated_at))
    print_table(rows, ["name", "schedule", "backend", "selector", "retention", "updated"])


def _selector(selector: Any) -> str:
    if not isinstance(selector, dict):
        return "*"
    text = ",".join(selector.get("namespaces") or ["*"])
    if selector.get("matchLabels"):
        text += " " + ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items())
    if selector.get("containers"):
        text += " [" + ",".join(selector["containers"]) + "]"
    return text


@policy.command("delete")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Delete the policy's archives first (objects, manifests, rows).")
@click.option("--force", is_flag=True, help="With --purge: delete pinned archives too.")
@pass_ctx
def policy_delete(ctx: Context, name: str, purge: bool, force: bool) -> None:
    """Delete a policy. Its archives stay in the catalog and backend, unless --purge."""
    from backupd.model import COMMITTED, PENDING
    from backupd.storage.delete import Selection

    catalog = ctx.app.catalog
    catalog.check_schema()
    if force and not purge:
        raise InvalidInput("--force applies to --purge only")
    if purge:
        if name not in {p.name for p in catalog.list_policies()}:
            raise NotFound(f"no policy named {name!r}")
        deleter = ctx.app.deleter
        finish_deletion(deleter.delete(deleter.plan(Selection(policy=name), force=force), force=force), "table")
    catalog.delete_policy(name)
    kept = catalog.list_archives(policy=name, states=(COMMITTED, PENDING))  # with --purge: commits in flight
    if not kept:
        click.echo(f"checkpointpolicy/{name} deleted" + (" with its archives" if purge else " (it had no archives)"))
    else:
        click.echo(f"checkpointpolicy/{name} deleted; its {len(kept)} archive(s) are kept and nothing prunes them: "
                   f"delete them with `backupd delete --policy {name} --yes` (`backupd policy delete NAME --purge` "
                   "deletes a policy with its archives)")
