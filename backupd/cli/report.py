"""``backupd report``: the retention report as a table, JSON or one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import click

from backupd.cli.base import Context, cli, output_option, pass_ctx, render
from backupd.config import DEFAULT_STALE_INTERVALS
from backupd.durable import atomic_write
from backupd.errors import InvalidInput


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (see :mod:`backupd.durable`): a
    reader never sees half a report, and workload names stay private."""
    try:
        with atomic_write(path, replace=True) as fh:
            fh.write(text.encode())
    except OSError as exc:
        raise InvalidInput(f"--out {str(path)!r}: cannot write: {exc.strerror or exc}") from None


@cli.command()
@output_option("html", help="Output format (yaml: the json data as YAML; html: one self-contained page with a "
                           "timeline per workload).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (mode 0600, atomically) instead of standard output.")
@click.option("--stale-intervals", type=click.IntRange(min=1, max=1000),
              help="A workload is MISSING after this many scheduled runs without an archive "
                   f"(default: alerts.stale_intervals, else {DEFAULT_STALE_INTERVALS}).")
@pass_ctx
def report(ctx: Context, output: str, out_path: Path | None, stale_intervals: int | None) -> None:
    """Retention report: per policy and workload, what is kept, how fresh, what the next prune removes.

    Status: OK while the run due after the newest archive is at most half a period late; LATE
    after that; MISSING once N scheduled runs passed without an archive, or with none at all.
    """
    if stale_intervals is None:
        alerts = getattr(ctx.config, "alerts", None)
        stale_intervals = getattr(alerts, "stale_intervals", DEFAULT_STALE_INTERVALS)
    # the report's weight (Jinja2 among it) only when asked
    from backupd.report.html import render_html
    from backupd.report.load import load_report
    from backupd.report.render import render_table

    catalog = ctx.app.catalog
    catalog.check_schema()
    result = load_report(catalog, stale_intervals=stale_intervals)
    if output in ("json", "yaml"):
        text = render(result.to_json(), output)
    elif output == "html":
        text = render_html(result)
    else:
        text = render_table(result)
    if out_path is None:
        click.echo(text, nl=False)
    else:
        write_private(out_path, text)
        click.echo(f"wrote {output} report to {out_path}", err=True)
