"""Notes that a pack's chunks moved: how a reader without the catalog finds the chunks of a
pack that garbage collection repacked and deleted.

A manifest names the packs its recipe used when it was written. Repacking copies a pack's
live chunks into new packs and, a grace period later, deletes the old one; the catalog moves
each archive to the new packs (``archive_packs``), but the manifest cannot change. So before
the catalog's swap, the repack puts one empty object per (old pack, new pack)::

    dedup/moved/<first two hex digits of the old id>/<old pack id>/<new pack id>

"the chunks of ``old`` that were live are in ``new`` now". One object per pair, create-only,
because a repack interrupted and run again may copy the same chunks into other new packs: the
notes of both runs stay true (a reader skips new packs that are gone). A reader whose pack is
missing lists its notes and follows them, through later repacks too (:data:`MAX_HOPS`).

Notes are never deleted: they are empty objects (one per repacked pack), and which ones are
still needed -- reachable from a pack some manifest names -- could only be told by reading
every manifest. The backend is not trusted: a planted note can only make a reader open
other packs, whose chunks are checked against their ids and the tar against its SHA-256.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from backupd.backends.base import Backend
from backupd.errors import ObjectExists, StorageNotFound

MOVED_DIR = "moved/"
MAX_HOPS = 16  # repacks of repacks followed at most: each one halves a pack at least
_PACK_ID = re.compile(r"[0-9a-f]{64}")


def note_key(old: str, new: str, root: str = "dedup/") -> str:
    return f"{_notes_prefix(old, root)}{new}"


def _notes_prefix(old: str, root: str) -> str:
    return f"{root}{MOVED_DIR}{old[:2]}/{old}/"


def put_note(backend: Backend, old: str, new: str, root: str = "dedup/") -> None:
    """Say that chunks of pack ``old`` are in pack ``new`` now (idempotent)."""
    try:
        backend.put_bytes(note_key(old, new, root), b"")
    except ObjectExists:
        pass


def notes_of(backend: Backend, old: str, root: str = "dedup/") -> list[str]:
    """The packs the notes of pack ``old`` name (one listing)."""
    prefix = _notes_prefix(old, root)
    try:
        keys = [o.key for o in backend.list(prefix)]
    except StorageNotFound:
        return []
    return sorted(k[len(prefix):] for k in keys if _PACK_ID.fullmatch(k[len(prefix):]))


def all_notes(backend: Backend, root: str = "dedup/") -> dict[str, list[str]]:
    """old pack id -> the packs its notes name, for every note of the backend (one listing)."""
    found: dict[str, list[str]] = {}
    prefix = f"{root}{MOVED_DIR}"
    try:
        keys = [o.key for o in backend.list(prefix)]
    except StorageNotFound:
        return found
    for key in keys:
        parts = key[len(prefix):].split("/")
        if len(parts) == 3 and all(_PACK_ID.fullmatch(p) for p in parts[1:]) and parts[0] == parts[1][:2]:
            found.setdefault(parts[1], []).append(parts[2])
    return found


def follow(pack_ids: Iterable[str], *, present: Callable[[str], bool],
           notes: Callable[[str], list[str]]) -> list[str]:
    """The packs that hold now what ``pack_ids`` held: each present one itself, each missing
    one replaced by the present packs its notes lead to, through at most :data:`MAX_HOPS`
    repacks. A missing pack whose notes lead to no present pack (none, gone, a loop) stays in
    the answer: its reader reports it missing."""
    is_present: dict[str, bool] = {}
    moved_to: dict[str, list[str]] = {}
    out: dict[str, None] = {}
    for start in dict.fromkeys(pack_ids):
        reached: list[str] = []
        frontier, seen = [start], {start}
        for _hop in range(MAX_HOPS + 1):
            later: list[str] = []
            for pack_id in frontier:
                if pack_id not in is_present:
                    is_present[pack_id] = present(pack_id)
                if is_present[pack_id]:
                    reached.append(pack_id)
                    continue
                if pack_id not in moved_to:
                    moved_to[pack_id] = notes(pack_id)
                later.extend(n for n in moved_to[pack_id] if n not in seen)
                seen.update(moved_to[pack_id])
            frontier = later
            if not frontier:
                break
        out.update(dict.fromkeys(reached or [start]))
    return list(out)
