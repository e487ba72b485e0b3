"""``backupd run``: the daemon."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import structlog

from backupd.cli.base import Context, cli, pass_ctx


def _install_signal_handlers(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: Any) -> None:
        structlog.get_logger("backupd").info("signal_received", signal=signal.Signals(signum).name)
        threading.Thread(target=stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@cli.command()
@pass_ctx
def run(ctx: Context) -> None:
    """The daemon: scheduler, checkpoint workers and the HTTP server (stops cleanly on SIGTERM)."""
    app = ctx.app
    daemon = app.daemon()
    daemon.catalog.check_schema()
    http = app.http_server()
    http.start()
    daemon.start()
    done = threading.Event()

    def stop() -> None:
        daemon.stop(app.config.daemon.shutdown_grace_seconds)
        http.stop()
        done.set()

    _install_signal_handlers(stop)
    daemon.serve(until=done.is_set)
    done.wait()
