"""``backupd verify`` and ``backupd catalog rebuild``: proving what the backends hold."""

from __future__ import annotations

import click

from backupd.cli.base import OUTPUT, Context, cli, human_bytes, pass_ctx, print_data, print_table
from backupd.errors import IntegrityError


@cli.command("verify")
@click.option("--policy", "policy_name", help="Only this policy's archives.")
@click.option("--sample", type=click.IntRange(min=1), help="Check N archives at random (always each policy's newest).")
@click.option("--structure/--no-structure", default=True, show_default=True,
              help="Also check each tar is a checkpoint archive (config.dump, spec.dump, checkpoint/).")
@click.option("--identity-file", metavar="FILE", envvar="BACKUPD_AGE_IDENTITY_FILE",
              help="age identity for encrypted archives; without it only their stored bytes are checked.")
@click.option("--read-data", is_flag=True,
              help="format = \"dedup\" backends: read and check every pack, not a sample of them.")
@OUTPUT
@pass_ctx
def verify_cmd(ctx: Context, policy_name: str | None, sample: int | None, structure: bool,
               identity_file: str | None, read_data: bool, output: str) -> None:
    """Re-read archives and check sizes and SHA-256 against the catalog and manifests, and every
    tar member against the rules restore and inspect apply (no links, devices, absolute or `..`
    names).

    Exits 7 when anything is missing, corrupt or orphaned.
    """
    app = ctx.app
    app.catalog.check_schema()
    from backupd.storage.transfer import load_identities
    from backupd.storage.verify import choose_sample, verify  # imported when used: see backupd.cli

    archives = choose_sample(app.catalog.list_archives(policy=policy_name), sample)
    identities = load_identities(identity_file, "--identity-file") if identity_file else []
    dedup = [b.name for b in app.config.backends if b.format == "dedup"]
    report = verify(app.catalog, app.backends, archives, structure=structure, identities=identities,
                    read_data=read_data, dedup_backends=dedup)
    if output != "table":
        print_data(report.to_json(), output)
    else:
        rows = [(f.archive_id, f.backend, f.status.upper(), f.detail or f.key) for f in report.findings]
        rows += [("-", name, "ORPHAN", key) for name, keys in report.orphans.items() for key in keys]
        rows += [("-", name, "PACK", f"{p['key']}: {p['detail']}") for name, c in report.packs.items()
                 for p in c.problems]
        if rows:
            print_table(rows, ["archive", "backend", "status", "detail"])
        click.echo(f"checked {len(report.findings)} archive(s), read {human_bytes(report.bytes_read)}: "
                   f"{len(report.problems)} problem(s), {sum(map(len, report.orphans.values()))} orphan(s)")
    if not report.clean:
        raise IntegrityError("verification found problems (see above)")


@cli.group("catalog")
def catalog_group() -> None:
    """Catalog recovery."""


@catalog_group.command("rebuild")
@click.option("--backend", "backend_name", help="Only this backend (default: every configured backend).")
@click.option("--identity-file", metavar="FILE", envvar="BACKUPD_AGE_IDENTITY_FILE",
              help="age identity: format = \"dedup\" backends with encryption need it to map their packs' chunks.")
@OUTPUT
@pass_ctx
def catalog_rebuild(ctx: Context, backend_name: str | None, identity_file: str | None, output: str) -> None:
    """Add archives the catalog lacks from the manifests in the backends; report disagreements.

    Idempotent and safe on a live catalog: existing rows are never changed. A manifest that
    fails the schema or disagrees with its key is reported and not catalogued. Exits 0 once the
    backends were read, whatever the report holds (read it, or its JSON lists).
    """
    app = ctx.app
    app.catalog.check_schema()
    names = [app.config.backend(backend_name).name] if backend_name else list(app.backends)
    from backupd.storage.rebuild import rebuild
    from backupd.storage.transfer import load_identities

    identities = load_identities(identity_file, "--identity-file") if identity_file else []
    reports = [rebuild(app.catalog, app.backends[name], identities=identities) for name in names]
    if output != "table":
        print_data([r.to_json() for r in reports], output)
        return
    for r in reports:
        click.echo(f"backend {r.backend}: added {len(r.added)}, already catalogued {r.agreeing}, "
                   f"disagreeing {len(r.disagreeing)}, bad manifests {len(r.bad_manifests)}, "
                   f"disagreeing with their key {len({k['key'] for k in r.key_disagreements})}, "
                   f"duplicate ids {len(r.duplicate_ids)}, orphans {len(r.orphans)}, "
                   f"catalogued but missing {len(r.missing)}")
        for d in r.disagreeing:
            click.echo(f"  archive {d['id']}: {d['field']} is {d['catalog']!r} in the catalog, "
                       f"{d['manifest']!r} in the manifest")
        for b in r.bad_manifests:
            click.echo(f"  bad manifest {b['key']}: {b['error']}")
        for k in r.key_disagreements:
            click.echo(f"  not catalogued, disagrees with its key: {k['key']}: {k['field']} is {k['in_key']!r} in "
                       f"the key, {k['in_manifest']!r} in the manifest")
        for d in r.duplicate_ids:
            click.echo(f"  archive id {d['id']} is claimed by {len(d['keys'])} manifests, catalogued from none the "
                       f"catalog did not already hold: {', '.join(d['keys'])}")
        for key in r.orphans:
            click.echo(f"  orphan (no manifest; prune removes it after the grace period): {key}")
        for aid in r.missing:
            click.echo(f"  archive {aid} is in the catalog but its manifest is gone (run `backupd verify`)")
