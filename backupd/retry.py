"""Retries with exponential backoff and full jitter, driven by ``BackupdError.retryable``."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from backupd.errors import BackupdError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): full jitter."""
        return rand() * min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))


def call(
    fn: Callable[[], T],
    backoff: Backoff,
    *,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[BackupdError, int, float], None] | None = None,
    before_retry: Callable[[], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, raises a non-retryable error, or attempts run out.

    ``on_retry(error, attempt, pause)`` is told before each pause; ``before_retry()`` runs
    after it (e.g. to rewind a source). Exceptions that are not backupd errors pass at once.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except BackupdError as exc:
            if not exc.retryable or attempt >= backoff.attempts:
                raise
            pause = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(exc, attempt, pause)
            sleep(pause)
            if before_retry is not None:
                before_retry()
            attempt += 1
