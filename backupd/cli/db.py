"""``backupd db``: the catalog schema."""

from __future__ import annotations

import click

from backupd.cli.base import Context, cli, pass_ctx


@cli.group()
def db() -> None:
    """Catalog schema management."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: Context) -> None:
    """Apply Alembic migrations up to the version this backupd needs."""
    before, after = ctx.app.catalog.upgrade()
    if before == after:
        click.echo(f"catalog {ctx.app.catalog.safe_url} is up to date (revision {after})")
    else:
        click.echo(f"catalog {ctx.app.catalog.safe_url} upgraded from {before or 'empty'} to {after}")
