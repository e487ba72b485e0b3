"""structlog configuration, done once at the entry point.

JSON lines when stderr is not a terminal (what log collectors want), coloured key=value on a
terminal. A redaction processor masks values of secret-looking keys as a last line of defence;
the first line is never passing secrets to a logger.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

from backupd.errors import scrub

_SECRET_KEYS = re.compile(r"(secret|password|token|authorization|access_key|credential|identity)", re.IGNORECASE)


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key):
            event[key] = "[redacted]"
        elif isinstance(value, str) and "@" in value:
            event[key] = scrub(value)
    return event


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is at the time of writing.

    structlog's PrintLogger keeps the file it was given; a test harness (or a daemoniser) that
    swaps stderr would then leave the daemon logging into a closed file.
    """

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure(*, json_output: bool | None = None, level: str = "info") -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if json_output else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    # Foreign libraries log through stdlib logging; keep them quiet unless something is wrong.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "botocore", "boto3", "urllib3", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
