"""Where a member's data is cut into chunks (docs/dedup-format.md, "Chunking").

* CRIU page images (``checkpoint/pages-<n>.img``) are raw 4 KiB pages in pagemap order: they
  are cut on page boundaries only. With ``pages_per_chunk = 1`` (the default, chosen by
  measurement: BENCHMARKS.md "Deduplicated format") every page is a chunk. With ``N > 1``
  pages are grouped *by content*: a group ends after a page whose CRC-32 is ``N - 1`` modulo
  ``N`` (and at ``4 N`` pages at the latest), so a page inserted or removed by the process
  (a new arena, a freed mapping) shifts the groups around it only, not every group after it
  as fixed groups of N would (measured: fixed groups of 2 pages left 99 % of the next dump's
  chunks new where 49 % of its pages were).
* Other members larger than :data:`CDC_MAX` go through FastCDC (the ``fastcdc`` package's
  Cython implementation) with min/avg/max = 16/64/256 KiB: small enough that an appended log
  or a changed file inside ``rootfs-diff.tar`` costs a few 64 KiB chunks, large enough that
  the index and recipe add 0.1 % (68 bytes per 64 KiB).
* Smaller members (``config.dump``, ``spec.dump``, CRIU's small images, ``stats-dump``) are
  one chunk each; they are a few KiB and most change with every checkpoint anyway.

A chunker takes the member's data through :meth:`TarSplitter.read_data` and yields chunks as
``bytes``/``memoryview`` in order; their concatenation is the member's data.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

from backupd.storage.dedup.tarstream import TarSplitter

PAGE = 4096
DEFAULT_PAGES_PER_CHUNK = 1
CDC_MIN, CDC_AVG, CDC_MAX = 16 << 10, 64 << 10, 256 << 10
READ_PAGES = 256  # pages read from the splitter at once (1 MiB)
_PAGES_IMAGE = re.compile(r"checkpoint/pages-\d+\.img")

Chunk = bytes | memoryview


def is_page_image(name: str) -> bool:
    """A CRIU page image: raw memory pages (``checkpoint/pages-<id>.img``)."""
    return _PAGES_IMAGE.fullmatch(name) is not None


def member_chunks(tar: TarSplitter, name: str, size: int, *, pages_per_chunk: int = DEFAULT_PAGES_PER_CHUNK,
                  grouping: str = "content") -> Iterator[Chunk]:
    """Chunks of the current member's data (``size`` bytes) by the rules above."""
    if not size:
        return iter(())
    if is_page_image(name):
        if pages_per_chunk == 1 or grouping == "fixed":
            return _fixed(tar, pages_per_chunk * PAGE)
        return _page_groups(tar, pages_per_chunk)
    if size <= CDC_MAX:
        return _fixed(tar, size)
    return _cdc(tar)


def _fixed(tar: TarSplitter, chunk_size: int) -> Iterator[Chunk]:
    # read several chunks at once and slice them: one buffer fill per MiB, not per chunk
    per_read = max(1, (READ_PAGES * PAGE) // chunk_size) * chunk_size
    while tar.remaining:
        block = tar.read_data(per_read)
        for start in range(0, len(block), chunk_size):
            yield block[start : start + chunk_size]


def _page_groups(tar: TarSplitter, n: int) -> Iterator[Chunk]:
    limit = 4 * n
    carry: list[memoryview] = []  # pages of the open group read in earlier blocks
    while tar.remaining:
        block = tar.read_data(READ_PAGES * PAGE)
        start = 0  # first page of the open group inside this block
        for offset in range(0, len(block), PAGE):
            page = block[offset : offset + PAGE]
            pages = len(carry) + (offset - start) // PAGE + 1
            if zlib.crc32(page) % n == n - 1 or pages >= limit or len(page) < PAGE:
                group = block[start : offset + len(page)]
                yield b"".join([*carry, group]) if carry else group
                carry, start = [], offset + len(page)
        if start < len(block):
            carry.append(block[start:])
    if carry:
        yield b"".join(carry)


def _cdc(tar: TarSplitter) -> Iterator[Chunk]:
    from fastcdc.fastcdc_cy import chunk_generator

    buf = b""
    while True:
        eof = not tar.remaining
        if not eof:
            buf += tar.read_data(4 * CDC_MAX)
            if len(buf) < 2 * CDC_MAX and tar.remaining:
                continue
            eof = not tar.remaining
        view = memoryview(buf)
        consumed = 0
        # FastCDC decides a cut from at most CDC_MAX bytes after the chunk's start, so a chunk
        # that starts CDC_MAX or more before the end of the buffer is cut as it would be in the
        # whole stream; the rest waits for more data.
        for c in chunk_generator(view, CDC_MIN, CDC_AVG, CDC_MAX, False, None):
            if not eof and c.offset + CDC_MAX > len(buf):
                break
            yield view[c.offset : c.offset + c.length]
            consumed = c.offset + c.length
        buf = buf[consumed:]
        if eof:
            return
