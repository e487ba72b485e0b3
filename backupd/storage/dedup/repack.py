"""Repacking mostly-dead packs: garbage collection's third phase.

A pack stays while any archive uses any of its chunks; after retention removed the archives
that used most of it, its dead chunks still cost their bytes. Which chunks are live is in the
catalog, kept by the writers (``archive_packs.used``: :mod:`backupd.catalog.liveness`). A
``stored`` pack older than the grace period whose live chunks are fewer than a share of its
chunks (``daemon.repack_below_live_share``) is repacked, emptiest first, up to a budget of
bytes read per collection:

1. the pack is read (checked against its name, its index against its SHA-256, decrypted with
   the identities given), its live chunks taken frame by frame and checked against their ids;
2. they are written into new packs (frames of up to 512 KiB, packs closed at 4 MiB, sealed
   for the backend's recipients, put create-only) and each new pack is recorded in the
   catalog (``stored``, created now: young, so never marked while this runs);
3. once every live chunk of the old pack is in stored new packs: a note per new pack
   (:mod:`backupd.storage.dedup.moved`), for readers without the catalog;
4. the swap (:meth:`~backupd.catalog.store.Catalog.move_repacked`): in one transaction that
   locks the old and new pack rows, every archive using the old pack is moved to the new
   ones (bitmaps remapped) and the old pack becomes ``unused`` -- the two-phase sweep deletes
   it a grace period later, so a reader that located chunks in it meanwhile still finds them,
   and a writer that was told about its chunks before the swap takes it back by committing.

If a chunk dead when the pack was read is used by the time of the swap (a checkpoint
committed meanwhile), nothing is swapped: the old pack stays as it is and the copies in the
new packs are duplicates that a later repack reclaims. A crash anywhere leaves either new
packs no archive uses (removed by the mark and sweep like any unused pack), notes that stay
true, or a completed swap. Chunk ids are not changed, so no recipe is rewritten.

A backend with ``encryption_recipients`` stores its packs encrypted: the daemon (which holds
only the recipients) cannot read them, so repacking there needs ``backupd gc
--identity-file``; without one it is skipped and reported, not failed.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from backupd.backends.base import Backend
from backupd.catalog import liveness
from backupd.catalog.store import Catalog, PackRecord
from backupd.errors import IntegrityError, InvalidInput, ObjectExists, StorageNotFound
from backupd.storage.dedup import moved
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.commit import ROOT
from backupd.storage.dedup.ids import ChunkIds

log = structlog.get_logger("backupd.gc")

#: the share of live chunks below which a pack is repacked (``daemon.repack_below_live_share``)
DEFAULT_BELOW = 0.5
#: stored bytes of old packs read per collection at most (the emptiest first; the rest wait
#: for the next collection), so that one collection holds its lease minutes, not hours
DEFAULT_BUDGET = 2 << 30


@dataclass
class RepackResult:
    candidates: int = 0  # packs whose live share is below the threshold
    repacked: list[str] = field(default_factory=list)  # old pack ids swapped: now unused (dry run: would be)
    written: list[str] = field(default_factory=list)  # new pack ids
    kept: list[dict[str, str]] = field(default_factory=list)  # pack, reason: candidates left as they are
    skipped: str | None = None  # why no pack was repacked at all
    bytes_read: int = 0  # stored bytes of the old packs read
    bytes_written: int = 0  # stored bytes of the new packs

    def to_json(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "repacked": self.repacked, "written": self.written,
                "kept": self.kept, "skipped": self.skipped, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written}


@dataclass
class _Old:
    """A pack being repacked: where its live chunks went."""

    record: PackRecord
    live: int
    moves: dict[int, tuple[str, int]] = field(default_factory=dict)  # old position -> (new pack, position)
    unsealed: int = 0  # its chunks copied into the open frame or pack, not stored yet
    reading: bool = True
    failed: bool = False


def candidates(catalog: Catalog, backend: Backend, *, created_before: datetime, below: float,
               budget: int = DEFAULT_BUDGET) -> tuple[int, list[tuple[PackRecord, int]]]:
    """How many packs are below the threshold, and those of them this collection reads: the
    emptiest first, within ``budget`` stored bytes (at least one)."""
    found = catalog.repack_candidates(backend.name, created_before=created_before, below=below)
    chosen: list[tuple[PackRecord, int]] = []
    total = 0
    for record, live in found:
        if chosen and total + record.stored_size > budget:
            break
        chosen.append((record, live))
        total += record.stored_size
    return len(found), chosen


def repack(catalog: Catalog, backend: Backend, chosen: Sequence[tuple[PackRecord, int]], *, now: datetime,
           result: RepackResult, identities: Sequence[Any] = (), recipients: Sequence[Any] = (),
           ids: Sequence[ChunkIds] = (), renew: Callable[[], None] = lambda: None,
           pack_size: int = packs.DEFAULT_PACK_SIZE, frame_size: int = packs.DEFAULT_FRAME_SIZE,
           level: int = packs.DEFAULT_LEVEL) -> None:
    """Repack ``chosen`` (pack, live mask) as the module docstring says. ``ids``: the id
    schemes chunks are checked against (a chunk matching none is corrupt: its pack is kept,
    for ``verify`` to report). ``renew`` is called after each new pack (the caller's lease)."""
    with tempfile.TemporaryDirectory(prefix="backupd-repack-") as directory:
        _Repacker(catalog, backend, now=now, result=result, identities=identities, recipients=recipients,
                  ids=list(dict.fromkeys(ids)) or [ChunkIds()], renew=renew, directory=directory,
                  pack_size=pack_size,
                  frame_size=frame_size, level=level).run(chosen)


class _Repacker:
    def __init__(self, catalog: Catalog, backend: Backend, *, now: datetime, result: RepackResult,
                 identities: Sequence[Any], recipients: Sequence[Any], ids: list[ChunkIds],
                 renew: Callable[[], None], directory: str, pack_size: int, frame_size: int, level: int) -> None:
        self.catalog, self.backend, self.now, self.result = catalog, backend, now, result
        self.identities, self.recipients, self.ids = list(identities), list(recipients), ids
        self.renew, self.directory = renew, directory
        self.pack_size, self.frame_size, self.level = pack_size, frame_size, level
        self.olds: list[_Old] = []
        self.frame = bytearray()
        self.frame_ids: list[tuple[bytes, int]] = []
        self.frame_from: list[tuple[_Old, int]] = []  # where each chunk of the open frame comes from
        self.builder = packs.PackBuilder()
        self.builder_from: list[tuple[_Old, int]] = []  # likewise, for the open pack

    def run(self, chosen: Sequence[tuple[PackRecord, int]]) -> None:
        for record, live in chosen:
            old = _Old(record, live)
            self.olds.append(old)
            chunks = self._live_chunks(old)
            while True:
                try:
                    seq, chunk_id, data = next(chunks)
                except StopIteration:
                    break
                except (IntegrityError, InvalidInput, StorageNotFound) as exc:  # reading it, not writing
                    self._keep(old, f"it cannot be read: {exc}")
                    break
                self._add(old, seq, chunk_id, data)
            old.reading = False
            self._finish_ready()
        self._flush_frame()
        if len(self.builder):
            self._store()
        self._finish_ready()

    # -- reading the old packs -------------------------------------------------------------

    def _live_chunks(self, old: _Old) -> Iterator[tuple[int, bytes, bytes]]:
        """(position, id, bytes) of the live chunks of ``old``, each checked against its id."""
        record = old.record
        pack = packs.PackFile(self.backend, record.key, record.pack_id, directory=self.directory,
                              identities=self.identities)
        try:
            self.result.bytes_read += record.stored_size
            order = pack.index.order
            if len(order) != record.chunk_count:
                raise IntegrityError(f"{pack.what}: its index holds {len(order)} chunks, the catalog "
                                     f"{record.chunk_count}")
            schemes = list(self.ids)
            n_frame, frame = -1, b""
            for seq in liveness.positions(old.live):
                chunk_id = order[seq]
                loc = pack.index.chunks[chunk_id]
                if loc.frame != n_frame:
                    n_frame, frame = loc.frame, pack.frame(loc.frame)
                data = frame[loc.offset:loc.offset + loc.length]
                schemes = [s for s in schemes if s(data) == chunk_id]
                if not schemes:
                    raise IntegrityError(f"{pack.what}: chunk {chunk_id.hex()} does not match its id (under "
                                         "every id key known)")
                yield seq, chunk_id, data
        finally:
            pack.close()

    # -- writing the new packs -------------------------------------------------------------

    def _add(self, old: _Old, seq: int, chunk_id: bytes, data: bytes) -> None:
        self.frame += data
        self.frame_ids.append((chunk_id, len(data)))
        self.frame_from.append((old, seq))
        old.unsealed += 1
        if len(self.frame) >= self.frame_size:
            self._flush_frame()

    def _flush_frame(self) -> None:
        if not self.frame_ids:
            return
        self.builder.add_frame(packs.compress_frame(self.frame, self.level), self.frame_ids)
        self.builder_from.extend(self.frame_from)
        self.frame, self.frame_ids, self.frame_from = bytearray(), [], []
        if self.builder.size >= self.pack_size:
            self._store()

    def _store(self) -> None:
        """Seal the open pack, put it, record it; its chunks' old packs learn where they are."""
        builder, sources = self.builder, self.builder_from
        self.builder, self.builder_from = packs.PackBuilder(), []
        pack_id, stored = packs.seal(builder.finish(), self.recipients)
        key = packs.pack_key(pack_id, ROOT)
        try:
            self.backend.put(key, io.BytesIO(stored))
        except ObjectExists:
            pass  # the same bytes (its name is their SHA-256): a repack run again after a crash
        self.catalog.record_pack(self.backend.name, pack_id, key, stored_size=len(stored),
                                 raw_size=builder.raw_size, chunk_ids=builder.chunk_ids, created_at=self.now)
        self.result.written.append(pack_id)
        self.result.bytes_written += len(stored)
        log.info("pack_repacked_into", backend=self.backend.name, key=key, chunks=len(builder),
                 stored_size=len(stored))
        for position, (old, seq) in enumerate(sources):
            old.moves[seq] = (pack_id, position)
            old.unsealed -= 1
        self.renew()
        self._finish_ready()

    # -- the swap --------------------------------------------------------------------------

    def _finish_ready(self) -> None:
        """Notes and the swap of every old pack whose live chunks are all in stored packs."""
        for old in [o for o in self.olds if not o.reading and not o.unsealed]:
            self.olds.remove(old)
            if not old.failed:
                self._swap(old)

    def _swap(self, old: _Old) -> None:
        pack_id = old.record.pack_id
        for new in sorted({p for p, _seq in old.moves.values()}):
            moved.put_note(self.backend, pack_id, new, ROOT)
        why = self.catalog.move_repacked(self.backend.name, pack_id, old.moves, now=self.now)
        if why is not None:
            self._keep(old, why)
            return
        self.result.repacked.append(pack_id)
        log.info("pack_repacked", backend=self.backend.name, key=old.record.key, chunks=old.record.chunk_count,
                 live=len(old.moves), into=sorted({p for p, _seq in old.moves.values()}))

    def _keep(self, old: _Old, why: str) -> None:
        old.failed = True
        self.result.kept.append({"pack": old.record.pack_id, "reason": why})
        log.warning("pack_not_repacked", backend=self.backend.name, key=old.record.key, reason=why)
