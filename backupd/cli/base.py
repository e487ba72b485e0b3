"""The ``backupd`` group, its context and the presentation helpers every command uses.

Commands only parse arguments, call the core and print; each lives in a module of this
package named after what it manages and registers itself on :data:`cli`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from backupd import __version__, logs
from backupd.config import Config, load_config
from backupd.sizes import human_bytes  # noqa: F401  (commands import it from here)

if TYPE_CHECKING:
    from backupd.app import App

OUTPUT = click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True,
                      help="Output format.")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str], *, err: bool = False) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), err=err)
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), err=err)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


class Context:
    def __init__(self, config_path: str | None, log_level: str) -> None:
        self.config_path = config_path
        self.log_level = log_level
        self._app: App | None = None

    @property
    def config(self) -> Config:
        return self.app.config

    @property
    def app(self) -> App:
        if self._app is None:
            from backupd.app import App  # the whole core: only commands that need it pay for it

            self._app = App(load_config(self.config_path))
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "-c", "config_path", envvar="BACKUPD_CONFIG", type=click.Path(dir_okay=False),
              help="Config file (TOML). Default: $BACKUPD_CONFIG, else /etc/backupd/config.toml if present.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]),
              show_default=True)
@click.version_option(__version__, prog_name="backupd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """Scheduled Kubernetes container checkpoints: take, ship, catalogue, prune, restore."""
    logs.configure(level=log_level)
    ctx.obj = Context(config_path, log_level)
    ctx.call_on_close(ctx.obj.close)
