"""Page cursors: where a page of a catalog listing ended."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from backupd.errors import InvalidInput
from backupd.model import Archive, Run, rfc3339


@dataclass(frozen=True)
class Cursor:
    """Where a page of a listing ended: the sort key of its last row.

    Written ``<time>/<id>``: the row's own ``checkpoint_time`` (archives) or ``started_at``
    (runs) and ``id`` exactly as the JSON output shows them, so a client can also build it from
    the last item it holds. The next page starts strictly after it in the listing's order
    (archives oldest first, runs newest first), which stays right while rows are added or
    removed between two pages.
    """

    time: datetime
    id: str

    def __str__(self) -> str:
        return f"{rfc3339(self.time)}/{self.id}"

    @classmethod
    def of_archive(cls, archive: Archive) -> Cursor:
        return cls(archive.checkpoint_time, archive.id)

    @classmethod
    def of_run(cls, run: Run) -> Cursor:
        return cls(run.started_at, str(run.id))

    @classmethod
    def parse(cls, text: str, field: str, *, numeric_id: bool = False) -> Cursor:
        """Read a cursor given as ``field`` (an option or query parameter, named in the error)."""
        time_text, sep, ident = text.rpartition("/")
        moment: datetime | None = None
        try:
            parsed = datetime.fromisoformat(time_text) if sep else None
            if parsed is not None and parsed.tzinfo is not None:
                moment = parsed.astimezone(UTC)
        except (ValueError, OverflowError):  # OverflowError: an offset that moves year 1 into year 0
            pass
        if moment is None or not ident or len(ident) > 32 or (numeric_id and not ident.isdigit()):
            raise InvalidInput(f"{field}: {text[:100]!r} is not a page cursor: give the one the previous page "
                               "ended with (<time>/<id> of its last item)")
        return cls(moment, ident)
