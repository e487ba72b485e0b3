"""Running the ``backupd`` console entry point (``backupd.cli.main``) inside the test process:
the same argument parsing, error printing and exit codes as the installed command, without a
new interpreter per call (fuzz tests call it hundreds of times)."""

from __future__ import annotations

import os
from pathlib import Path

import click.testing
import structlog

from backupd.backends import BackendWrapper
from backupd.cli import main


def run_cli(config: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None,
            wrap_backend: BackendWrapper | None = None) -> tuple[int, str, str]:
    """``backupd --config CONFIG ARGS...`` with ``stdin``; returns (exit code, stdout, stderr).

    ``BACKUPD_*`` variables of the test process are hidden; ``env`` adds variables;
    ``wrap_backend`` wraps every backend the command opens (``tests.faults``). The logging
    set-up ``main()`` does (onto this call's captured stderr) is undone afterwards.
    """
    runner = click.testing.CliRunner()
    logging_config = structlog.get_config()
    umask = os.umask(0o022)  # main() sets 077 for the whole process: give the test process its own back
    os.umask(umask)
    environment: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BACKUPD_")}
    environment.update(env or {})
    try:
        with runner.isolation(input=stdin, env=environment) as (out, err, _):
            try:
                main(["--config", str(config), *args], wrap_backend=wrap_backend)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            else:
                code = 0
            return code, out.getvalue().decode(), err.getvalue().decode()
    finally:
        os.umask(umask)
        structlog.configure(**logging_config)
