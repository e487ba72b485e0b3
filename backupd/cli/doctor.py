"""``backupd doctor``: one line per prerequisite of a checkpoint, with what to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from backupd.cli.base import OUTPUT, Context, cli, pass_ctx, print_data

if TYPE_CHECKING:
    from backupd.node.kubelet import Target

_MARKS = {"ok": "✓", "failed": "✗", "warning": "!", "skipped": "-"}


def _target(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Target | None:
    if value is None:
        return None
    from backupd.doctor import parse_target

    try:
        return parse_target(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option("--checkpoint-test", "checkpoint_test", metavar="NAMESPACE/POD/CONTAINER", callback=_target,
              help="Also checkpoint this running container of this node once (it is paused for a moment), "
                   "proving the runtime can checkpoint; the node tar is removed afterwards.")
@OUTPUT
@pass_ctx
def doctor(ctx: Context, checkpoint_test: Target | None, output: str) -> None:
    """Check every prerequisite of a checkpoint on this node, one line each with the fix.

    Run it on the node or with `kubectl exec` in the DaemonSet pod. Exit code 0 when nothing
    blocks checkpoints (warnings and untested checks do not count), else the code of the first
    blocking failure: 2 config, 4 catalog, 5 kubelet or runtime, 6 checkpoint directory or backend.
    """
    from backupd.doctor import diagnose  # imported when used: see backupd.cli

    report = diagnose(ctx.config_path, checkpoint_test=checkpoint_test)
    if output != "table":
        print_data(report.to_json(), output)
    else:
        width = max(len(c.name) for c in report.checks)
        for check in report.checks:
            line = f"{_MARKS[check.status]} {check.name.ljust(width)}  {check.message}"
            if check.fix and check.ok is not True:
                line += f" -- fix: {check.fix}"
            click.echo(line)
        blocking = sum(1 for c in report.checks if c.blocks)
        click.echo("nothing blocks checkpoints on this node" if not blocking
                   else f"{blocking} problem(s) block checkpoints on this node")
    click.get_current_context().exit(report.exit_code)
