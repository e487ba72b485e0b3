"""The ``backupd`` command line. Exit codes are public: see README "Exit codes" and
:mod:`backupd.errors` (0 success, 1 internal error, 2 invalid input, 3 not found, 4 catalog,
5 kubelet, 6 storage, 7 integrity, 8 some runs failed, 9 busy)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import click
import structlog

# Each module registers its commands on the group when imported. They import the core (catalog,
# restore, inspect, doctor...) inside the command that needs it, so `backupd --help` and each
# command pay only for what they use.
import backupd.cli.inspect  # noqa: F401
import backupd.cli.report  # noqa: F401
import backupd.cli.restore  # noqa: F401
from backupd.cli import archives, daemon, db, doctor, gc, policy, retention, verify  # noqa: F401
from backupd.cli.base import Wiring, cli, human_bytes, print_json, print_table
from backupd.errors import EXIT_INTERNAL, BackupdError

if TYPE_CHECKING:
    from backupd.backends import BackendWrapper

__all__ = ["cli", "human_bytes", "main", "print_json", "print_table"]


def _attach_optional_commands() -> None:
    from backupd.cli.demo import demo
    from backupd.simulator.cli import simulate_node

    cli.add_command(demo)
    cli.add_command(simulate_node, name="simulate-node")


def main(argv: Sequence[str] | None = None, *, wrap_backend: BackendWrapper | None = None) -> NoReturn:
    """The ``backupd`` entry point. ``wrap_backend``: see :class:`backupd.app.App` (tests only)."""
    # Archives hold process memory: everything backupd creates -- archives, temp files, the
    # SQLite catalog and its -wal/-shm files, restored tars, reports -- is private to its owner.
    os.umask(0o077)
    _attach_optional_commands()
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="backupd", standalone_mode=False,
                        obj=Wiring(wrap_backend=wrap_backend))
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
