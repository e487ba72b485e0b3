"""The ``backupd`` group, its context and the presentation helpers every command uses.

Commands only parse arguments, call the core and print; each lives in a module of this
package named after what it manages and registers itself on :data:`cli`.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from backupd import __version__, logs
from backupd.config import Config, load_config
from backupd.sizes import human_bytes  # noqa: F401  (commands import it from here)

if TYPE_CHECKING:
    from backupd.app import App
    from backupd.backends import BackendWrapper

F = TypeVar("F", bound=Callable[..., Any])

#: what ``-o/--output`` means in every command: a format (files are ``--out FILE`` or ``--to FILE``)
FORMATS = ("table", "json", "yaml")


class OutputFormat(click.Choice):
    """A format name; ``misuse`` turns a value that is no format into the command's own hint
    (``restore --output x.tar`` wrote a file before ``--output`` meant the format)."""

    def __init__(self, choices: Sequence[str], misuse: Callable[[str], str] | None = None) -> None:
        super().__init__(choices)
        self.misuse = misuse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.misuse is not None and value not in self.choices:
            raise click.UsageError(self.misuse(value), ctx)
        return super().convert(value, param, ctx)


def output_option(*extra: str, default: str = "table", help: str = "Output format (yaml: the json data as YAML).",
                  misuse: Callable[[str], str] | None = None) -> Callable[[F], F]:
    """``-o/--output table|json|yaml`` (plus ``extra`` formats), the same in every command."""
    return click.option("--output", "-o", "output", type=OutputFormat([*FORMATS, *extra], misuse), default=default,
                        show_default=True, help=help)


OUTPUT = output_option()


def namespace_option(help: str = "Only this namespace.") -> Callable[[F], F]:
    """``-n/--namespace``, as kubectl spells it."""
    return click.option("--namespace", "-n", "namespace", metavar="NAMESPACE", help=help)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str], *, err: bool = False) -> None:
    print_table_pages([rows], headers, err=err)


def print_table_pages(pages: Iterable[Iterable[Sequence[Any]]], headers: Sequence[str], *, err: bool = False) -> None:
    """A table printed as its pages arrive: columns are as wide as the first page needs (a
    longer cell later widens only its own row), so a million rows need one page of memory."""
    widths: list[int] | None = None
    for page in pages:
        cells = [[_cell(v) for v in row] for row in page]
        if widths is None:
            widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
            click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), err=err)
        for r in cells:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), err=err)
    if widths is None:
        print_table_pages([[]], headers, err=err)


def render(value: Any, output: str) -> str:
    """``value`` as ``json`` or ``yaml`` text. YAML holds exactly the JSON data (times and other
    values JSON shows as strings are strings there too), in block style."""
    text = json.dumps(value, indent=2, default=str)
    if output == "json":
        return text + "\n"
    import yaml  # only the commands that print YAML pay for it

    return yaml.safe_dump(json.loads(text), sort_keys=False, default_flow_style=False, allow_unicode=True)


def print_data(value: Any, output: str) -> None:
    """Print ``value`` in a data format (``-o json`` or ``-o yaml``)."""
    click.echo(render(value, output), nl=False)


def print_json(value: Any) -> None:
    print_data(value, "json")


def print_data_pages(pages: Iterable[Iterable[Any]], output: str) -> None:
    """A list printed as its pages arrive, as ``json`` or ``yaml``: the document :func:`print_data`
    prints of the whole list, in the memory of one page."""
    first = True
    for page in pages:
        for item in page:
            if output == "json":
                click.echo("[\n" if first else ",\n", nl=False)
                click.echo(textwrap.indent(json.dumps(item, indent=2, default=str), "  "), nl=False)
            else:  # a one-item YAML list is that item's entry in the whole list
                click.echo(render([item], output), nl=False)
            first = False
    if output == "json":
        click.echo("[]" if first else "\n]")
    elif first:
        click.echo(render([], output), nl=False)


@dataclass(frozen=True)
class Wiring:
    """What :func:`backupd.cli.main`'s caller adds to how the core is built (``obj`` of the
    root click context): ``wrap_backend`` wraps every backend (the test suite's faults)."""

    wrap_backend: BackendWrapper | None = None


class Context:
    """Per invocation: the config, loaded when a command first asks for it, and the
    :class:`~backupd.app.App`, built when a command first asks for it (each of whose parts is
    built when first used), so a command builds only what it uses."""

    def __init__(self, config_path: str | None, log_level: str, wiring: Wiring | None = None) -> None:
        self.config_path = config_path
        self.log_level = log_level
        self.wiring = wiring or Wiring()
        self._config: Config | None = None
        self._app: App | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    @property
    def app(self) -> App:
        if self._app is None:
            from backupd.app import App  # the whole core: only commands that need it pay for it

            self._app = App(self.config, wrap_backend=self.wiring.wrap_backend)
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
    ctx.obj = Context(config_path, log_level, ctx.obj if isinstance(ctx.obj, Wiring) else None)
    ctx.call_on_close(ctx.obj.close)
