"""``backupd gc``: remove the packs that no archive of a deduplicated backend uses."""

from __future__ import annotations

import click

from backupd.cli.base import OUTPUT, Context, cli, human_bytes, pass_ctx, print_data


@cli.command("gc")
@click.option("--backend", "backend_name", help="Only this backend (default: every format = \"dedup\" backend).")
@click.option("--dry-run", is_flag=True, help="Say what would be marked and deleted; change nothing.")
@OUTPUT
@pass_ctx
def gc_cmd(ctx: Context, backend_name: str | None, dry_run: bool, output: str) -> None:
    """Collect the packs of deduplicated backends that no archive uses.

    Two phases, `daemon.orphan_grace_hours` apart: a pack no archive uses is first marked
    unused (writers stop counting on it), and deleted by a later run if still unused. The
    daemon runs this hourly; run it by hand after a large prune or delete. Exits 9 while
    another process collects the same backend.
    """
    app = ctx.app
    app.catalog.check_schema()
    names = ([app.config.backend(backend_name).name] if backend_name
             else [b.name for b in app.config.backends if b.format == "dedup"])
    reports = [app.collect_garbage(name, dry_run=dry_run) for name in names]
    if output != "table":
        print_data([r.to_json() for r in reports], output)
        return
    verb = "would" if dry_run else "did"
    for r in reports:
        click.echo(f"backend {r.backend}: {r.packs} pack(s); {verb} mark {len(r.marked)} unused, {verb} delete "
                   f"{len(r.deleted)} ({human_bytes(r.bytes_freed)}), unrecorded packs removed "
                   f"{len(r.orphans_deleted)}")
    if not names:
        click.echo("no backend has format = \"dedup\": nothing to collect")
