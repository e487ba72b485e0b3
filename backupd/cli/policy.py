"""``backupd policy apply|list|delete``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from backupd.cli.base import OUTPUT, Context, cli, pass_ctx, print_data, print_table
from backupd.errors import PolicyError

if TYPE_CHECKING:
    from backupd.catalog import StoredPolicy


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
    from backupd.policy import parse_policies

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
    from backupd.policy import API_VERSION, KIND, Policy

    catalog = ctx.app.catalog
    catalog.check_schema()
    listed: list[tuple[StoredPolicy, Policy | None, str | None]] = []
    for s in catalog.list_policies():
        try:
            listed.append((s, Policy.from_spec_json(s.name, s.spec_json), None))
        except PolicyError as exc:
            listed.append((s, None, str(exc)))
            click.echo(f"warning: {exc}\n  (not scheduled: apply a corrected policy)", err=True)
    if output != "table":
        print_data([{**(p.to_document() if p else {"apiVersion": API_VERSION, "kind": KIND,
                                                     "metadata": {"name": s.name}, "spec": _raw_spec(s)}),
                     "generation": s.generation, "updated_at": s.updated_at.isoformat(), "error": error}
                    for s, p, error in listed], output)
        return
    rows = []
    for s, p, _error in listed:
        if p is None:
            spec = _raw_spec(s)
            rows.append((s.name, spec.get("schedule"), spec.get("backend"), "-", "INVALID: not scheduled (see above)",
                         s.updated_at))
            continue
        sel = p.spec.selector
        selector = ",".join(sel.namespaces) if sel.namespaces else "*"
        if sel.match_labels:
            selector += " " + ",".join(f"{k}={v}" for k, v in sel.match_labels.items())
        if sel.containers:
            selector += " [" + ",".join(sel.containers) + "]"
        rules = p.spec.retention.model_dump(by_alias=True, exclude_none=True)
        rows.append((s.name, p.spec.schedule, p.spec.backend, selector,
                     " ".join(f"{k}={v}" for k, v in rules.items()), s.updated_at))
    print_table(rows, ["name", "schedule", "backend", "selector", "retention", "updated"])


def _raw_spec(stored: StoredPolicy) -> dict[str, Any]:
    """The stored spec as it is, for showing a policy that no longer validates."""
    try:
        spec = json.loads(stored.spec_json)
    except ValueError:
        return {}
    return spec if isinstance(spec, dict) else {}


@policy.command("delete")
@click.argument("name")
@pass_ctx
def policy_delete(ctx: Context, name: str) -> None:
    """Delete a policy. Its archives stay in the catalog and backend."""
    ctx.app.catalog.check_schema()
    ctx.app.catalog.delete_policy(name)
    click.echo(f"checkpointpolicy/{name} deleted (its archives are kept; prune or delete them explicitly)")
