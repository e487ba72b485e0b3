"""Recipes: how one archive's tar is rebuilt, byte for byte, from literal bytes and chunks.

Byte format, version 1. The stored recipe is one zstd frame (``zstd -d`` reads it), age-
encrypted as a whole when the backend has recipients. Decompressed::

    recipe   := MAGIC header op* end
    MAGIC    := "BKDRCPE1"                                         (8 bytes)
    header   := uvarint n, n bytes of JSON:
                {"format": "backupd-dedup", "version": 1, "id_scheme": "sha256" | "hmac-sha256",
                 "id_key_check": null | "<16 hex>"}
    op       := 0x01 uvarint n, n literal bytes              -- tar headers, padding, end blocks
              | 0x02 uvarint k, k x uvarint raw_length, k x 32-byte chunk id
              | 0x03 uvarint k, k x uvarint raw_length, k x 32-byte list id
    end      := 0x00 uvarint n, n bytes of JSON:
                {"tar_size": int, "tar_sha256": "<64 hex>", "chunk_refs": int,
                 "literal_bytes": int, "members": int}

``uvarint`` is unsigned LEB128 (7 bits per byte, low group first, high bit = more). The tar
is the concatenation, in op order, of every literal and of every referenced chunk's bytes;
nothing may follow ``end``. Ids are listed after their lengths so that zstd sees the lengths
(nearly all 4096) as one compressible run and the ids (incompressible) as another.

Page images are referenced through *lists*: a list is a chunk like any other (in a pack,
named by its id) whose content is ``uvarint n, n x uvarint raw_length, n x 32-byte chunk
id``; a ``0x03`` op's raw length is the sum of its list's. The page ids are grouped into
lists by content: a list ends after an id whose first four bytes, little-endian, are
``F - 1`` modulo ``F``, or at ``4 F`` ids (``F``, the fanout, is the writer's choice: 64 by
default, measured against others in BENCHMARKS.md; readers do not need it). A list whose
pages did not change has the same id as last time and is not stored again, so a recipe costs
about half a byte per page instead of 32 (measured: 2.8 MB -> 50 KiB for a 340 MiB process).

:class:`ArchiveWriter` streams a tar into new chunks (packed and uploaded as it goes) and a
recipe; :class:`ArchiveReader` streams the tar back, checking every chunk against its id and
the whole against the recipe's size and SHA-256 (and the manifest's, given by the caller).

One module over 500 lines on purpose: the recipe format, its writer and its reader are one
format, versioned together (``docs/dedup-format.md``); the reader must undo exactly what the
writer does, which is easiest to check when both are in view.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import zstandard

from backupd.backends.base import Backend, Readable
from backupd.errors import IntegrityError, InvalidInput, ObjectExists, StorageNotFound
from backupd.storage.dedup import moved
from backupd.storage.dedup import pack as packs
from backupd.storage.dedup.chunker import DEFAULT_PAGES_PER_CHUNK, PAGE, Chunk, is_page_image, member_chunks
from backupd.storage.dedup.ids import ChunkIds
from backupd.storage.dedup.tarstream import TarSplitter

MAGIC = b"BKDRCPE1"
FORMAT = "backupd-dedup"
VERSION = 1
OP_END, OP_LITERAL, OP_REFS, OP_LISTS = 0, 1, 2, 3
MAX_REFS_PER_OP = 4096
LIST_FANOUT = 64
MAX_JSON = 1 << 16
MAX_LITERAL = 8 << 20  # a literal op larger than this is corrupt (tar headers are small)
RECIPE_LEVEL = 9  # a recipe is written once and is mostly ids; a higher level costs little
MAX_RECIPE_STORED = 1 << 30
BATCH_BYTES = 1 << 20  # chunks hashed per job
PIPELINE_DEPTH = 8  # batches in flight: enough to keep the workers busy; ~8-16 MiB of read blocks
SPOOL_MEMORY = 8 << 20
READ_BATCH = 256  # chunks checked per job when reading
READ_DEPTH = 4  # batches fetched ahead while earlier ones are checked


@functools.lru_cache(maxsize=4096)  # lengths repeat: nearly every one is 4096
def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_uvarint(stream: Readable, what: str) -> int:
    n = shift = 0
    while True:
        b = stream.read(1)
        if not b:
            raise IntegrityError(f"{what}: the recipe is truncated")
        n |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return n
        shift += 7
        if shift > 63:
            raise IntegrityError(f"{what}: corrupt recipe (varint too long)")


def spool_file(directory: str | None) -> BinaryIO:
    """A private temporary file that stays in memory up to :data:`SPOOL_MEMORY` bytes."""
    return cast(BinaryIO, tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=directory))  # noqa: SIM115


def encode_list(chunk_ids: Sequence[bytes], lengths: Sequence[int]) -> bytes:
    return b"".join([uvarint(len(chunk_ids)), *map(uvarint, lengths), *chunk_ids])


def _ends_list(chunk_id: bytes, count: int, fanout: int) -> bool:
    return int.from_bytes(chunk_id[:4], "little") % fanout == fanout - 1 or count >= 4 * fanout


def _read_exact(stream: Readable, n: int, what: str) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            raise IntegrityError(f"{what}: the recipe is truncated")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


# -- writing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackInfo:
    key: str
    pack_id: str
    stored_size: int
    chunks: int
    raw_size: int
    index_size: int  # index + footer bytes inside the pack


@dataclass
class WriteResult:
    """What :meth:`ArchiveWriter.write` did. ``recipe`` is the stored recipe (rewound), for
    the caller to put once every pack is stored (the commit protocol: packs, then recipe and
    manifest, then the catalog row)."""

    tar_size: int
    tar_sha256: str
    recipe: BinaryIO
    recipe_size: int
    packs: list[PackInfo] = field(default_factory=list)
    chunk_refs: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0

    @property
    def pack_bytes(self) -> int:
        return sum(p.stored_size for p in self.packs)

    @property
    def index_bytes(self) -> int:
        return sum(p.index_size for p in self.packs)

    @property
    def uploaded_bytes(self) -> int:
        """Packs plus recipe: what one archive adds to the backend."""
        return self.pack_bytes + self.recipe_size


class _HashedSource:
    """``read`` through, SHA-256 on a thread of its own (hashlib releases the GIL), in order."""

    def __init__(self, raw: Readable) -> None:
        self.raw = raw
        self.size = 0
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tar-sha256")
        self._pending: Future[None] | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._sha.update, data)
        return data

    def hexdigest(self) -> str:
        if self._pending is not None:
            self._pending.result()
        return self._sha.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RecipeEncoder:
    """Ops in, the zstd-compressed recipe out to ``sink``."""

    def __init__(self, sink: BinaryIO, ids: ChunkIds) -> None:
        self._z = zstandard.ZstdCompressor(level=RECIPE_LEVEL, write_checksum=True).stream_writer(
            sink, closefd=False)
        header = json.dumps({"format": FORMAT, "version": VERSION, "id_scheme": ids.scheme,
                             "id_key_check": ids.key_check}, separators=(",", ":")).encode()
        self._z.write(MAGIC + uvarint(len(header)) + header)
        self.literal_bytes = 0
        self.refs = 0

    def literal(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_LITERAL):
            piece = data[start : start + MAX_LITERAL]
            self._z.write(bytes([OP_LITERAL]) + uvarint(len(piece)))
            self._z.write(piece)
        self.literal_bytes += len(data)

    def chunk_refs(self, chunk_ids: Sequence[bytes], lengths: Sequence[int]) -> None:
        self._z.write(b"".join([bytes([OP_REFS]), uvarint(len(chunk_ids)), *map(uvarint, lengths), *chunk_ids]))
        self.refs += len(chunk_ids)

    def list_refs(self, list_ids: Sequence[bytes], lengths: Sequence[int]) -> None:
        self._z.write(b"".join([bytes([OP_LISTS]), uvarint(len(list_ids)), *map(uvarint, lengths), *list_ids]))
        self.refs += len(list_ids)

    def end(self, summary: dict[str, Any]) -> None:
        data = json.dumps(summary, separators=(",", ":")).encode()
        self._z.write(bytes([OP_END]) + uvarint(len(data)) + data)
        self._z.flush(zstandard.FLUSH_FRAME)


class ArchiveWriter:
    """Stream tars into packs (new chunks only) and recipes.

    ``known(ids)`` answers which of ``ids`` the backend already stores (the catalog in
    phase 2; a set in the tests); chunks new in this archive are remembered here, so each is
    stored once. Hashing and compression run on ``workers`` threads, the tar's SHA-256 on one
    more, uploads on ``uploads`` more; memory stays bounded (about ``PIPELINE_DEPTH`` MiB of
    read blocks, a few frames, ``uploads + 1`` packs, and ~100 bytes per new chunk for the set of
    this archive's new ids).
    """

    def __init__(self, backend: Backend, *, known: Callable[[list[bytes]], set[bytes]],
                 ids: ChunkIds | None = None, recipients: Sequence[Any] = (), root: str = "dedup/",
                 pages_per_chunk: int = DEFAULT_PAGES_PER_CHUNK, grouping: str = "content",
                 frame_size: int = packs.DEFAULT_FRAME_SIZE, pack_size: int = packs.DEFAULT_PACK_SIZE,
                 level: int = packs.DEFAULT_LEVEL, list_fanout: int = LIST_FANOUT, workers: int = 2,
                 uploads: int = 2, spool_dir: str | None = None,
                 on_stored: Callable[[PackInfo, list[bytes]], None] | None = None) -> None:
        self.backend = backend
        self.known = known
        #: called (on an upload thread) with each pack and its chunk ids once its put returned:
        #: the commit protocol records it there, so that other writers may count on its chunks
        self.on_stored = on_stored
        self.ids = ids or ChunkIds()
        if recipients and self.ids.key is None:
            raise InvalidInput("an encrypted backend needs keyed chunk ids (hmac-sha256): plain SHA-256 ids "
                               "would tell which known content the archives hold")
        self.recipients = list(recipients)
        self.root = root
        if pages_per_chunk < 1 or pages_per_chunk > 256:
            raise InvalidInput(f"pages per chunk must be 1 to 256, not {pages_per_chunk}")
        if grouping not in ("content", "fixed"):
            raise InvalidInput(f"page grouping must be 'content' or 'fixed', not {grouping!r}")
        self.pages_per_chunk, self.grouping = pages_per_chunk, grouping
        self.frame_size, self.pack_size, self.level = frame_size, pack_size, level
        if not 0 <= list_fanout <= MAX_REFS_PER_OP // 4:  # 0: page ids straight in the recipe (measuring)
            raise InvalidInput(f"list fanout must be 0 to {MAX_REFS_PER_OP // 4}, not {list_fanout}")
        self.list_fanout = list_fanout
        self.workers, self.uploads = workers, uploads
        self.spool_dir = spool_dir

    def write(self, source: Readable, *, what: str, total_size: int | None = None) -> WriteResult:
        run = _WriteRun(self, what)
        try:
            return run.write(source, total_size)
        finally:
            run.close()


class _WriteRun:
    """The state of one :meth:`ArchiveWriter.write`."""

    def __init__(self, w: ArchiveWriter, what: str) -> None:
        self.w = w
        self.what = what
        self.pool = ThreadPoolExecutor(w.workers, thread_name_prefix="dedup")
        self.upload_pool = ThreadPoolExecutor(w.uploads, thread_name_prefix="dedup-put")
        self.spool: BinaryIO = spool_file(w.spool_dir)
        self.encoder = RecipeEncoder(self.spool, w.ids)
        self.batches: deque[tuple[str, Any, Any]] = deque()
        self.frames: deque[tuple[Future[bytes], list[tuple[bytes, int]]]] = deque()
        self.uploading: deque[Future[PackInfo]] = deque()
        self.session: set[bytes] = set()
        self.list_ids: list[bytes] = []  # page ids of the open list
        self.list_lengths: list[int] = []
        self.lists: list[tuple[bytes, bytes, int]] = []  # closed lists not written yet: (id, content, raw length)
        # new chunks are copied into the frame: a view would pin its whole 1 MiB read block
        self.frame = bytearray()
        self.frame_ids: list[tuple[bytes, int]] = []
        self.pack = packs.PackBuilder()
        self.result_packs: list[PackInfo] = []
        self.new_chunks = self.new_raw = 0
        self._hashed: _HashedSource | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.upload_pool.shutdown(wait=True, cancel_futures=True)
        if self._hashed is not None:
            self._hashed.close()

    def write(self, source: Readable, total_size: int | None) -> WriteResult:
        self._hashed = hashed = _HashedSource(source)
        tar = TarSplitter(hashed, what=self.what, total_size=total_size)
        members = 0
        try:
            for member in tar:
                members += 1
                self._push("literal", member.literal)
                kind = "pages" if is_page_image(member.name) else "chunks"
                if kind == "pages" and self.w.pages_per_chunk == 1:
                    # one chunk per page, the common case: whole 1 MiB blocks go through the
                    # pipeline instead of 256 page objects each (measured: 9 % less CPU per dump)
                    while tar.remaining:
                        block = tar.read_data(BATCH_BYTES)
                        self._push("page_block", block, self.pool.submit(self._split_and_ask, block))
                    self._push("member_end", None)
                    continue
                batch: list[Chunk] = []
                size = 0
                for chunk in member_chunks(tar, member.name, member.size, pages_per_chunk=self.w.pages_per_chunk,
                                           grouping=self.w.grouping):
                    batch.append(chunk)
                    size += len(chunk)
                    if size >= BATCH_BYTES or len(batch) >= MAX_REFS_PER_OP:
                        self._push_chunks(kind, batch)
                        batch, size = [], 0
                if batch:
                    self._push_chunks(kind, batch)
                self._push("member_end", None)
            self._push("literal", tar.trailer)
            while self.batches:
                self._process(self.batches.popleft())
            self._flush_frame()
            while self.frames:
                self._take_frame()
            if len(self.pack):
                self._seal_pack()
            for f in self.uploading:
                self.result_packs.append(f.result())
            tar_sha256 = hashed.hexdigest()
            if hashed.size != tar.offset:  # the splitter hands out every byte it reads
                raise IntegrityError(f"{self.what}: read {hashed.size} bytes but split {tar.offset}")
            self.encoder.end({"tar_size": tar.offset, "tar_sha256": tar_sha256, "chunk_refs": self.encoder.refs,
                              "literal_bytes": self.encoder.literal_bytes, "members": members})
            recipe, size = self._stored_recipe()
        except BaseException:
            self.spool.close()
            raise
        return WriteResult(tar_size=tar.offset, tar_sha256=tar_sha256, recipe=recipe, recipe_size=size,
                           packs=self.result_packs, chunk_refs=self.encoder.refs, new_chunks=self.new_chunks,
                           new_raw_bytes=self.new_raw)

    def _stored_recipe(self) -> tuple[BinaryIO, int]:
        if self.w.recipients:
            import pyrage

            plain = self.spool
            plain.seek(0)
            self.spool = spool_file(self.w.spool_dir)
            try:
                pyrage.encrypt_io(plain, self.spool, self.w.recipients)
            finally:
                plain.close()
        size = self.spool.seek(0, io.SEEK_END)
        self.spool.seek(0)
        return self.spool, size

    # -- the pipeline, in order ---------------------------------------------------------------

    def _push(self, kind: str, payload: Any, future: Any = None) -> None:
        self.batches.append((kind, payload, future))
        while len(self.batches) > PIPELINE_DEPTH:
            self._process(self.batches.popleft())

    def _push_chunks(self, kind: str, batch: list[Chunk]) -> None:
        ids = self.w.ids
        self._push(kind, batch, self.pool.submit(lambda: [ids(c) for c in batch]))

    def _process(self, item: tuple[str, Any, Any]) -> None:
        kind, payload, future = item
        if kind in ("literal", "member_end"):
            self._close_list()
            if kind == "literal":
                self.encoder.literal(payload)
            return
        if kind == "page_block":
            chunk_ids, stored = future.result()
            lengths = [PAGE] * (len(payload) // PAGE) + ([len(payload) % PAGE] if len(payload) % PAGE else [])
            self._store_new_pages(payload, chunk_ids, lengths, stored)
        else:
            chunk_ids = future.result()
            lengths = [len(c) for c in payload]
            self._store_new(payload, chunk_ids)
        if kind == "chunks" or not self.w.list_fanout:
            self.encoder.chunk_refs(chunk_ids, lengths)
            return
        fanout = self.w.list_fanout
        for chunk_id, length in zip(chunk_ids, lengths, strict=True):
            self.list_ids.append(chunk_id)
            self.list_lengths.append(length)
            if _ends_list(chunk_id, len(self.list_ids), fanout):
                self._cut_list()
        self._write_lists()

    def _cut_list(self) -> None:
        content = encode_list(self.list_ids, self.list_lengths)
        self.lists.append((self.w.ids(content), content, sum(self.list_lengths)))
        self.list_ids, self.list_lengths = [], []

    def _close_list(self) -> None:
        if self.list_ids:
            self._cut_list()
        self._write_lists()

    def _write_lists(self) -> None:
        if not self.lists:
            return
        list_ids = [i for i, _, _ in self.lists]
        self._store_new([c for _, c, _ in self.lists], list_ids)
        self.encoder.list_refs(list_ids, [n for _, _, n in self.lists])
        self.lists = []

    def _store_new(self, chunks: Sequence[Chunk], chunk_ids: Sequence[bytes]) -> None:
        """Put the chunks that neither the backend nor this archive holds yet into frames."""
        session = self.session
        ask = list(dict.fromkeys(i for i in chunk_ids if i not in session))
        if not ask:
            return
        stored = self.w.known(ask)
        frame, frame_ids, limit = self.frame, self.frame_ids, self.w.frame_size  # locals: ~90,000 rounds a dump
        for chunk, chunk_id in zip(chunks, chunk_ids, strict=True):
            if chunk_id in session or chunk_id in stored:
                continue
            session.add(chunk_id)
            frame += chunk
            frame_ids.append((chunk_id, len(chunk)))
            if len(frame) >= limit:
                self._flush_frame()
                frame, frame_ids = self.frame, self.frame_ids

    def _split_and_ask(self, block: memoryview) -> tuple[list[bytes], set[bytes]]:
        """On a worker thread: the page ids of ``block`` and which of them the backend holds.
        Asked here rather than in order on the pipeline's thread, so that the catalog's answers
        overlap the reading and hashing of the next blocks (measured: the lookups took a third
        of a first checkpoint's time when asked in order). A page this archive stores first
        in an earlier block is still skipped in order (:attr:`session`)."""
        chunk_ids = self.w.ids.split(block, PAGE)
        session = self.session
        ask = list(dict.fromkeys(i for i in chunk_ids if i not in session))
        return chunk_ids, self.w.known(ask) if ask else set()

    def _store_new_pages(self, block: memoryview, chunk_ids: list[bytes], lengths: list[int],
                         stored: set[bytes]) -> None:
        """:meth:`_store_new` for a block of whole pages (``stored``: those the backend holds):
        runs of new pages are copied into frames as one slice each."""
        session = self.session
        start: int | None = None  # first page of the run of new pages being collected
        for n, chunk_id in enumerate(chunk_ids):
            if chunk_id in session or chunk_id in stored:
                if start is not None:
                    self._add_pages(block, chunk_ids, lengths, start, n)
                    start = None
                continue
            session.add(chunk_id)
            if start is None:
                start = n
        if start is not None:
            self._add_pages(block, chunk_ids, lengths, start, len(chunk_ids))

    def _add_pages(self, block: memoryview, chunk_ids: list[bytes], lengths: list[int], a: int, b: int) -> None:
        limit = self.w.frame_size
        while a < b:
            c = min(b, a + max(1, -(-(limit - len(self.frame)) // PAGE)))  # pages that fill the frame
            self.frame += block[a * PAGE : min(c * PAGE, len(block))]
            self.frame_ids.extend(zip(chunk_ids[a:c], lengths[a:c], strict=True))
            a = c
            if len(self.frame) >= limit:
                self._flush_frame()

    def _flush_frame(self) -> None:
        if not self.frame:
            return
        self.new_chunks += len(self.frame_ids)
        self.new_raw += len(self.frame)
        self.frames.append((self.pool.submit(packs.compress_frame, self.frame, self.w.level), self.frame_ids))
        self.frame, self.frame_ids = bytearray(), []
        while len(self.frames) > 2 * self.w.workers or (self.frames and self.frames[0][0].done()):
            self._take_frame()

    def _take_frame(self) -> None:
        future, chunk_ids = self.frames.popleft()
        self.pack.add_frame(future.result(), chunk_ids)
        if self.pack.size >= self.w.pack_size:
            self._seal_pack()

    def _seal_pack(self) -> None:
        builder, self.pack = self.pack, packs.PackBuilder()
        self.uploading.append(self.upload_pool.submit(self._upload, builder))
        while len(self.uploading) > self.w.uploads:
            self.result_packs.append(self.uploading.popleft().result())

    def _upload(self, builder: packs.PackBuilder) -> PackInfo:
        plain = builder.finish()
        index_size = len(plain) - builder.size
        pack_id, stored = packs.seal(plain, self.w.recipients)
        key = packs.pack_key(pack_id, self.w.root)
        try:
            self.w.backend.put(key, io.BytesIO(stored))
        except ObjectExists:
            pass  # the name is the content's SHA-256: the same bytes are already there
        info = PackInfo(key=key, pack_id=pack_id, stored_size=len(stored), chunks=len(builder),
                        raw_size=builder.raw_size, index_size=index_size)
        if self.w.on_stored is not None:
            self.w.on_stored(info, builder.chunk_ids)
        return info


# -- reading -----------------------------------------------------------------------------


class PackStore:
    """Chunks by id from a backend's packs: each pack fetched once into a private temporary
    directory and kept there for the rest of the restore (disk: the packs the archive uses;
    memory: their indexes and up to ``frame_cache`` bytes of decompressed frames).

    Where a chunk is: ``locate(chunk_id) -> pack key`` when given; else in the ``pack_keys``
    given (the catalog's packs of the archive, or those its manifest names), read on the
    first lookup; for a chunk not there, in the packs the notes of the missing ones among
    them name (a repack moved their chunks: :mod:`backupd.storage.dedup.moved`); and as a
    last resort in every pack under ``root`` (a test, the benchmark, a note lost).
    """

    def __init__(self, backend: Backend, *, identities: Sequence[Any] = (), root: str = "dedup/",
                 locate: Callable[[bytes], str | None] | None = None, spool_dir: str | None = None,
                 frame_cache: int = 64 << 20, pack_keys: Sequence[str] | None = None) -> None:
        self.backend = backend
        self.identities = list(identities)
        self.root = root
        self._dir = tempfile.mkdtemp(prefix="backupd-restore-", dir=spool_dir)  # 0700
        self._locate = locate
        #: packs to look in before every pack under ``root`` (a manifest names its archive's)
        self._hint = list(pack_keys) if pack_keys is not None else None
        self._gone: list[str] = []  # ids of hinted packs found missing
        self._scanned = False  # every pack's index read
        self._where: dict[bytes, str] | None = None
        self._open: dict[str, packs.PackFile] = {}
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._frames_size, self._frames_limit = 0, frame_cache

    def _pack(self, key: str) -> packs.PackFile:
        pack = self._open.get(key)
        if pack is None:
            pack_id = key.rsplit("/", 1)[-1].removesuffix(".pack")
            pack = self._open[key] = packs.PackFile(self.backend, key, pack_id, directory=self._dir,
                                                    identities=self.identities)
        return pack

    def _scan(self, keys: Sequence[str] | None = None) -> dict[bytes, str]:
        where: dict[bytes, str] = {}
        for key in packs.list_packs(self.backend, self.root) if keys is None else keys:
            try:
                pack = self._pack(key)
            except StorageNotFound:
                if keys is None:
                    raise
                self._gone.append(key.rsplit("/", 1)[-1].removesuffix(".pack"))
                continue  # a hinted pack gone (repacked): its notes, or the scan of every pack
            for chunk_id in pack.index.order:
                where.setdefault(chunk_id, key)
        return where

    def _follow_notes(self) -> list[str]:
        """Keys of the packs the notes of the missing hinted packs lead to."""
        gone, self._gone = self._gone, []
        if not gone:
            return []
        found = moved.follow(gone, present=lambda p: self.backend.stat(packs.pack_key(p, self.root)) is not None,
                             notes=lambda p: moved.notes_of(self.backend, p, self.root))
        return [packs.pack_key(p, self.root) for p in found if p not in gone]

    def _frame(self, pack: packs.PackFile, n: int) -> bytes:
        # Recently used frames of every pack: an archive's chunks come from the packs of many
        # checkpoints, interleaved, and a list is read just before the pages it names.
        cached = self._frames.get((pack.key, n))
        if cached is not None:
            self._frames.move_to_end((pack.key, n))
            return cached
        raw = pack.frame(n)
        self._frames[(pack.key, n)] = raw
        self._frames_size += len(raw)
        while self._frames_size > self._frames_limit and len(self._frames) > 1:
            self._frames_size -= len(self._frames.popitem(last=False)[1])
        return raw

    def read(self, chunk_id: bytes) -> bytes:
        key = self._locate(chunk_id) if self._locate is not None else None
        if key is None:
            if self._where is None:
                self._scanned = self._hint is None
                self._where = self._scan(self._hint)
            key = self._where.get(chunk_id)
            if key is None and self._hint is not None:
                self._hint = None
                for chunk, where in self._scan(self._follow_notes()).items():
                    self._where.setdefault(chunk, where)
                key = self._where.get(chunk_id)
            if key is None and not self._scanned:
                self._scanned = True
                for chunk, where in self._scan().items():
                    self._where.setdefault(chunk, where)
                key = self._where.get(chunk_id)
        if key is None:
            raise IntegrityError(f"chunk {chunk_id.hex()} is in no pack of backend {self.backend.name!r}")
        pack = self._pack(key)
        loc = pack.index.chunks.get(chunk_id)
        if loc is None:
            raise IntegrityError(f"{pack.what} does not hold chunk {chunk_id.hex()}")
        return self._frame(pack, loc.frame)[loc.offset : loc.offset + loc.length]

    def close(self) -> None:
        for pack in self._open.values():
            pack.close()
        self._open.clear()
        self._frames.clear()
        shutil.rmtree(self._dir, ignore_errors=True)


class ArchiveReader:
    """The tar of one recipe as a readable stream, verified as it goes.

    Every chunk is checked against its id, and when the stream ends its size and SHA-256
    against the recipe's and against ``tar_sha256``/``tar_size`` (the manifest's); the last
    ``read`` raises :class:`IntegrityError` instead of returning b"" if any differs, so a
    consumer writing to a temp file never commits a bad tar.
    """

    def __init__(self, recipe: Readable, chunks: Any, *, ids: ChunkIds | None = None,
                 identities: Sequence[Any] = (), what: str = "recipe", tar_sha256: str | None = None,
                 tar_size: int | None = None, spool_dir: str | None = None) -> None:
        self.what = what
        self.chunks = chunks
        self.ids = ids or ChunkIds()
        self._expect = (tar_sha256, tar_size)
        self._spools: list[BinaryIO] = []
        self._plain = self._decrypted(recipe, identities, spool_dir)
        self._stream = zstandard.ZstdDecompressor().stream_reader(self._plain, read_across_frames=False)
        self._sha = hashlib.sha256()
        self.size = 0
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="dedup-check")
        self._sha_pool = ThreadPoolExecutor(1, thread_name_prefix="tar-sha256")
        self._hashing: Future[None] | None = None
        self._batches = self._generate()
        self._pending: deque[tuple[list[bytes], Future[None] | None]] = deque()
        self._exhausted = False
        self._summary: dict[str, Any] = {}
        self._ready: deque[bytes] = deque()
        self._ready_size = 0
        self._done = False

    def _decrypted(self, recipe: Readable, identities: Sequence[Any], spool_dir: str | None) -> BinaryIO:
        stored = spool_file(spool_dir)
        self._spools.append(stored)
        size = 0
        while block := recipe.read(1 << 20):
            size += len(block)
            if size > MAX_RECIPE_STORED:
                raise IntegrityError(f"{self.what}: larger than {MAX_RECIPE_STORED} bytes; not a recipe")
            stored.write(block)
        stored.seek(0)
        if stored.read(len(packs.AGE_MAGIC)) != packs.AGE_MAGIC:
            stored.seek(0)
            return stored
        if not identities:
            raise InvalidInput(f"{self.what} is encrypted with age: give the identity file that decrypts it "
                               "(--identity-file)")
        import pyrage

        stored.seek(0)
        plain = spool_file(spool_dir)
        self._spools.append(plain)
        try:
            pyrage.decrypt_io(stored, plain, list(identities))
        except Exception as exc:
            raise IntegrityError(f"{self.what}: age could not decrypt it: {exc}") from None
        plain.seek(0)
        return plain

    def _generate(self) -> Iterator[tuple[list[bytes], Future[None] | None]]:
        """Batches of tar pieces in order, each with the check of its chunks' ids running on
        the pool (hashing releases the GIL) while the next batch is fetched."""
        z, what = self._stream, self.what
        if _read_exact(z, len(MAGIC), what) != MAGIC:
            raise IntegrityError(f"{what}: not a recipe, or a newer recipe version")
        header = _json(_read_exact(z, _length(z, MAX_JSON, what), what), what)
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise IntegrityError(f"{what}: unsupported recipe format {header.get('format')!r} "
                                 f"version {header.get('version')!r}")
        self.ids.check_matches(str(header.get("id_scheme")), header.get("id_key_check"), what)
        pieces: list[bytes] = []
        expected: list[tuple[bytes, int]] = []
        while True:
            op = _read_exact(z, 1, what)[0]
            if op == OP_LITERAL:
                yield [_read_exact(z, _length(z, MAX_LITERAL, what), what)], None
            elif op in (OP_REFS, OP_LISTS):
                for chunk_id, length in _refs(z, what):
                    if op == OP_REFS:
                        refs = [(chunk_id, length)]
                    else:  # a list is checked at once: what it names is read next
                        listed = io.BytesIO(self._checked(chunk_id))
                        refs = list(_refs(listed, f"{what}: list {chunk_id.hex()}"))
                        if listed.read(1) or sum(n for _, n in refs) != length:
                            raise IntegrityError(f"{what}: list {chunk_id.hex()} is corrupt")
                    for ref in refs:
                        pieces.append(self.chunks.read(ref[0]))
                        expected.append(ref)
                        if len(pieces) >= READ_BATCH:
                            yield pieces, self._pool.submit(self._check_chunks, pieces, expected)
                            pieces, expected = [], []
                if pieces:
                    yield pieces, self._pool.submit(self._check_chunks, pieces, expected)
                    pieces, expected = [], []
            elif op == OP_END:
                summary = _json(_read_exact(z, _length(z, MAX_JSON, what), what), what)
                if z.read(1):
                    raise IntegrityError(f"{what}: corrupt recipe (data after its end)")
                self._summary = summary
                return
            else:
                raise IntegrityError(f"{what}: corrupt recipe (unknown op {op})")

    def _checked(self, chunk_id: bytes) -> bytes:
        data = self.chunks.read(chunk_id)
        self._check_chunks([data], [(chunk_id, None)])
        return data

    def _check_chunks(self, pieces: Sequence[bytes], expected: Sequence[tuple[bytes, int | None]]) -> None:
        for data, (chunk_id, length) in zip(pieces, expected, strict=True):
            if self.ids(data) != chunk_id:
                raise IntegrityError(f"{self.what}: chunk {chunk_id.hex()} is corrupt (its id does not match "
                                     "its content)")
            if length is not None and len(data) != length:
                raise IntegrityError(f"{self.what}: chunk {chunk_id.hex()} holds {len(data)} bytes, "
                                     f"the recipe says {length}")

    def _check(self, summary: dict[str, Any]) -> None:
        sha = self._sha.hexdigest()
        problems = []
        for source, (want_sha, want_size) in (("recipe", (summary.get("tar_sha256"), summary.get("tar_size"))),
                                              ("manifest", self._expect)):
            if want_size is not None and self.size != want_size:
                problems.append(f"tar size {self.size} != {want_size} ({source})")
            if want_sha is not None and sha != want_sha:
                problems.append(f"tar SHA-256 differs from the {source}'s")
        if problems:
            raise IntegrityError(f"{self.what}: the rebuilt tar does not match: {'; '.join(problems)}")

    def _next_ready(self) -> list[bytes] | None:
        """The next batch whose chunks are verified (None at the end), keeping a few in flight."""
        while len(self._pending) < READ_DEPTH and not self._exhausted:
            item = next(self._batches, None)
            if item is None:
                self._exhausted = True
            else:
                self._pending.append(item)
        if not self._pending:
            return None
        pieces, check = self._pending.popleft()
        if check is not None:
            check.result()
        return pieces

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        try:
            while self._ready_size < n and not self._done:
                pieces = self._next_ready()
                if pieces is None:
                    self._done = True
                    if self._hashing is not None:
                        self._hashing.result()
                    self._check(self._summary)
                    break
                if self._hashing is not None:
                    self._hashing.result()  # in order, and at most one batch behind
                self._hashing = self._sha_pool.submit(_update_all, self._sha, pieces)
                self._ready.extend(pieces)
                self._ready_size += sum(map(len, pieces))
                self.size += sum(map(len, pieces))
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self.what}: the recipe is corrupt ({exc})") from None
        out: list[bytes] = []
        got = 0
        while self._ready and got < n:
            piece = self._ready.popleft()
            if got + len(piece) > n:
                self._ready.appendleft(piece[n - got :])
                piece = piece[: n - got]
            out.append(piece)
            got += len(piece)
        self._ready_size -= got
        return b"".join(out)

    @property
    def tar_sha256(self) -> str:
        if self._hashing is not None:
            self._hashing.result()
        return self._sha.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sha_pool.shutdown(wait=True, cancel_futures=True)
        for spool in self._spools:
            spool.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _update_all(sha: Any, pieces: Sequence[bytes]) -> None:
    for piece in pieces:
        sha.update(piece)


def _refs(stream: Readable, what: str) -> Iterator[tuple[bytes, int]]:
    """``uvarint k, k x uvarint length, k x id`` (a refs op, a lists op, a list's content)."""
    k = _length(stream, MAX_REFS_PER_OP, what)
    lengths = [read_uvarint(stream, what) for _ in range(k)]
    ids = _read_exact(stream, 32 * k, what)
    for i, length in enumerate(lengths):
        yield ids[32 * i : 32 * i + 32], length


def _length(stream: Readable, limit: int, what: str) -> int:
    n = read_uvarint(stream, what)
    if n > limit:
        raise IntegrityError(f"{what}: corrupt recipe (a length of {n}, more than {limit})")
    return n


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise IntegrityError(f"{what}: corrupt recipe (its header or summary is not a JSON object)")
    return value


def restore(recipe: Readable, chunks: Any, sink: BinaryIO, **kwargs: Any) -> int:
    """Write the verified tar of ``recipe`` to ``sink``; returns its size."""
    with ArchiveReader(recipe, chunks, **kwargs) as reader:
        while block := reader.read(1 << 20):
            sink.write(block)
        return reader.size


__all__ = ["ArchiveReader", "ArchiveWriter", "PackInfo", "PackStore", "RecipeEncoder", "WriteResult", "restore",
           "uvarint"]
