"""The ``backupd`` command line. Commands only parse arguments, call the core and print.

Exit codes are public (see README "Exit codes" and :mod:`backupd.errors`): 0 success,
1 internal error, 2 invalid input, 3 not found, 4 catalog, 5 kubelet, 6 storage, 7 integrity,
8 some runs failed, 9 busy (a lease is held elsewhere).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog

from backupd import __version__, logs
from backupd.app import App
from backupd.config import Config, load_config
from backupd.errors import EXIT_INTERNAL, BackupdError, PolicyError, RunsFailed

OUTPUT = click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True,
                      help="Output format.")


# -- presentation -----------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# -- context ----------------------------------------------------------------------------


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


# -- db ---------------------------------------------------------------------------------


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


# -- policies ---------------------------------------------------------------------------


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
    if output == "json":
        print_json([{"name": n, "result": r} for n, r in results])
    else:
        for name, result in results:
            click.echo(f"checkpointpolicy/{name} {result}")


@policy.command("list")
@OUTPUT
@pass_ctx
def policy_list(ctx: Context, output: str) -> None:
    """Show the policies in the catalog."""
    from backupd.policy import Policy

    catalog = ctx.app.catalog
    catalog.check_schema()
    stored = catalog.list_policies()
    policies = [(s, Policy.from_spec_json(s.name, s.spec_json)) for s in stored]
    if output == "json":
        print_json([{**p.to_document(), "generation": s.generation, "updatedAt": s.updated_at.isoformat()}
                    for s, p in policies])
        return
    rows = []
    for s, p in policies:
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


@policy.command("delete")
@click.argument("name")
@pass_ctx
def policy_delete(ctx: Context, name: str) -> None:
    """Delete a policy. Its archives stay in the catalog and backend."""
    ctx.app.catalog.check_schema()
    ctx.app.catalog.delete_policy(name)
    click.echo(f"checkpointpolicy/{name} deleted (its archives are kept; prune or delete them explicitly)")


# -- checkpoints and archives -----------------------------------------------------------


def _archive_rows(archives: Iterable[Any]) -> list[tuple[Any, ...]]:
    return [
        (a.id, a.checkpoint_time, a.namespace, a.pod, a.workload, a.container, human_bytes(a.tar_size),
         human_bytes(a.stored_size), a.policy, a.backend, "pinned" if a.pinned else a.state)
        for a in archives
    ]


ARCHIVE_HEADERS = ["id", "time", "namespace", "pod", "workload", "container", "size", "stored", "policy",
                   "backend", "state"]


@cli.command()
@click.option("--policy", "policy_name", help="Only this policy (default: every policy).")
@OUTPUT
@pass_ctx
def checkpoint(ctx: Context, policy_name: str | None, output: str) -> None:
    """Run one checkpoint cycle now, wait for it, and print each result."""
    app = ctx.app
    app.catalog.check_schema()
    runner = app.runner
    policies = [runner.load_policy(policy_name)] if policy_name else runner.policies()
    if not policies:
        raise PolicyError("no policies in the catalog: apply one with `backupd policy apply -f FILE`")
    app.pipeline.reconcile()
    results = [runner.cycle(p) for p in policies]
    if output == "json":
        print_json([
            {
                "policy": r.policy,
                "error": str(r.error) if r.error else None,
                "skipped": r.skipped,
                "runs": [{**o.run.to_json(), "archive": o.archive.to_json() if o.archive else None} for o in r.outcomes],
            }
            for r in results
        ])
    else:
        rows = []
        for r in results:
            if r.error:
                rows.append((r.policy, "-", "failed", "-", "-", str(r.error)))
            for o in r.outcomes:
                target = f"{o.run.namespace}/{o.run.pod}/{o.run.container}"
                rows.append((r.policy, target, o.run.outcome, o.archive.id if o.archive else "-",
                             human_bytes(o.archive.stored_size) if o.archive else "-", o.run.error or ""))
            for s in r.skipped:
                rows.append((r.policy, s, "skipped", "-", "-", "another run of this container is in progress"))
        if rows:
            print_table(rows, ["policy", "target", "outcome", "archive", "stored", "error"])
        else:
            click.echo("no running containers matched the policies")
    if any(r.failed for r in results):
        raise RunsFailed("some checkpoints failed (see above)")


@cli.command("list")
@click.option("--policy", "policy_name")
@click.option("--namespace")
@click.option("--pod")
@click.option("--workload", help="e.g. deployment/web")
@click.option("--container")
@click.option("--all-states", is_flag=True, help="Include pending, failed and deleting archives.")
@OUTPUT
@pass_ctx
def list_archives(ctx: Context, policy_name: str | None, namespace: str | None, pod: str | None,
                  workload: str | None, container: str | None, all_states: bool, output: str) -> None:
    """Archives in the catalog (committed ones unless --all-states), oldest first."""
    from backupd.catalog import ARCHIVE_STATES, COMMITTED

    ctx.app.catalog.check_schema()
    archives = ctx.app.catalog.list_archives(
        policy=policy_name, namespace=namespace, pod=pod, workload=workload, container=container,
        states=ARCHIVE_STATES if all_states else (COMMITTED,),
    )
    if output == "json":
        print_json([a.to_json() for a in archives])
    else:
        print_table(_archive_rows(archives), ARCHIVE_HEADERS)


# -- daemon -----------------------------------------------------------------------------


def _install_signal_handlers(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: Any) -> None:
        structlog.get_logger("backupd").info("signal_received", signal=signal.Signals(signum).name)
        threading.Thread(target=stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@cli.command()
@pass_ctx
def run(ctx: Context) -> None:
    """The daemon: scheduler and checkpoint workers (stops cleanly on SIGTERM)."""
    app = ctx.app
    daemon = app.daemon()
    daemon.start()
    done = threading.Event()

    def stop() -> None:
        daemon.stop(app.config.daemon.shutdown_grace_seconds)
        done.set()

    _install_signal_handlers(stop)
    daemon.serve(until=done.is_set)
    done.wait()


# -- entry point ------------------------------------------------------------------------


def _attach_optional_commands() -> None:
    from backupd.demo import demo
    from backupd.simulator.cli import simulate_node

    cli.add_command(demo)
    cli.add_command(simulate_node, name="simulate-node")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    _attach_optional_commands()
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="backupd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BackupdError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        structlog.get_logger("backupd").exception("internal_error")
        click.echo("error: internal error (a bug in backupd; the traceback is above)", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)
