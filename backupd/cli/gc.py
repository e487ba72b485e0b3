"""``backupd gc``: remove the packs that no archive of a deduplicated backend uses, and repack
the packs that archives use only a little of."""

from __future__ import annotations

import click

from backupd.cli.base import OUTPUT, Context, cli, human_bytes, pass_ctx, print_data


@cli.command("gc")
@click.option("--backend", "backend_name", help="Only this backend (default: every format = \"dedup\" backend).")
@click.option("--dry-run", is_flag=True, help="Say what would be marked, deleted and repacked; change nothing.")
@click.option("--repack-below", type=click.FloatRange(0, 1), metavar="SHARE",
              help="Repack packs whose live chunks are fewer than this share of theirs (default: "
                   "daemon.repack_below_live_share, 0.5).")
@click.option("--no-repack", is_flag=True, help="Only remove unused packs; repack none.")
@click.option("--identity-file", metavar="FILE", envvar="BACKUPD_AGE_IDENTITY_FILE",
              help="age identity: backends with encryption_recipients are repacked only with it "
                   "(or $BACKUPD_AGE_IDENTITY_FILE).")
@OUTPUT
@pass_ctx
def gc_cmd(ctx: Context, backend_name: str | None, dry_run: bool, repack_below: float | None, no_repack: bool,
           identity_file: str | None, output: str) -> None:
    """Collect the packs of deduplicated backends that no archive uses, and repack mostly-dead ones.

    Two phases, `daemon.orphan_grace_hours` apart: a pack no archive uses is first marked
    unused (writers stop counting on it), and deleted by a later run if still unused. Then a
    pack older than that whose live chunks (those an archive still uses) are fewer than
    `--repack-below` of its chunks is repacked: its live chunks are copied into new packs,
    its archives moved to them, and it is marked unused, to be deleted like the others. The
    daemon runs this hourly, without an identity: on a backend with `encryption_recipients`
    it cannot read packs, so it skips the repack (reported); run `backupd gc --identity-file`
    there. Run it by hand after a large prune or delete. Exits 9 while another process
    collects the same backend.
    """
    from backupd.storage.transfer import load_identities  # imported when used: see backupd.cli

    app = ctx.app
    app.catalog.check_schema()
    names = ([app.config.backend(backend_name).name] if backend_name
             else [b.name for b in app.config.backends if b.format == "dedup"])
    identities = load_identities(identity_file, "--identity-file") if identity_file else []
    below = 0.0 if no_repack else repack_below
    reports = [app.collect_garbage(name, dry_run=dry_run, repack_below=below, identities=identities)
               for name in names]
    if output != "table":
        print_data([r.to_json() for r in reports], output)
        return
    verb = "would" if dry_run else "did"
    for r in reports:
        click.echo(f"backend {r.backend}: {r.packs} pack(s); {verb} mark {len(r.marked)} unused, {verb} delete "
                   f"{len(r.deleted)} ({human_bytes(r.bytes_freed)}), unrecorded packs removed "
                   f"{len(r.orphans_deleted)}")
        rp = r.repack
        if rp.skipped:
            click.echo(f"  repack skipped: {rp.skipped}")
        elif rp.candidates:
            click.echo(f"  {verb} repack {len(rp.repacked)} of {rp.candidates} mostly-dead pack(s) "
                       f"({human_bytes(rp.bytes_read)} read"
                       + ("" if dry_run else f", {len(rp.written)} new ({human_bytes(rp.bytes_written)})")
                       + "); the old ones are deleted a grace period later")
        for kept in rp.kept:
            click.echo(f"  kept pack {kept['pack']}: {kept['reason']}")
    if not names:
        click.echo("no backend has format = \"dedup\": nothing to collect")
