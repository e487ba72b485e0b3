"""Chunk boundaries: FastCDC streamed equals FastCDC over the whole member; page groups are
cut by content, so an inserted page disturbs only the group around it."""

from __future__ import annotations

import io
import random
import tarfile

from backupd.storage.dedup.chunker import CDC_AVG, CDC_MAX, CDC_MIN, PAGE, is_page_image, member_chunks
from backupd.storage.dedup.tarstream import TarSplitter


def chunks_of(name: str, data: bytes, **options: object) -> list[bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    splitter = TarSplitter(io.BytesIO(buf.getvalue()), what="t")
    member = splitter.next_member()
    assert member is not None
    out = [bytes(c) for c in member_chunks(splitter, member.name, member.size, **options)]  # type: ignore[arg-type]
    assert splitter.remaining == 0 and b"".join(out) == data
    return out


def test_streamed_fastcdc_cuts_where_fastcdc_cuts_the_whole_member():
    from fastcdc.fastcdc_cy import fastcdc_cy

    rng = random.Random(7)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(500)]
    data = b" ".join(rng.choice(words) for _ in range(600_000))[: 5 << 20]  # ~5 MiB, several read blocks
    ours = chunks_of("rootfs-diff.tar", data)
    whole = [data[c.offset : c.offset + c.length] for c in fastcdc_cy(data, CDC_MIN, CDC_AVG, CDC_MAX)]
    assert ours == whole
    assert len(ours) > 40 and max(map(len, ours)) <= CDC_MAX


def test_small_members_are_one_chunk_and_pages_are_pages():
    assert chunks_of("config.dump", b"x" * CDC_MAX) == [b"x" * CDC_MAX]
    pages = [bytes([i]) * PAGE for i in range(10)]
    assert chunks_of("checkpoint/pages-1.img", b"".join(pages)) == pages
    assert is_page_image("checkpoint/pages-12.img") and not is_page_image("checkpoint/pagemap-12.img")


def test_content_defined_page_groups_survive_an_inserted_page():
    rng = random.Random(3)
    pages = [rng.randbytes(PAGE) for _ in range(2000)]
    before = chunks_of("checkpoint/pages-1.img", b"".join(pages), pages_per_chunk=8)
    after = chunks_of("checkpoint/pages-1.img", b"".join(pages[:1000] + [rng.randbytes(PAGE)] + pages[1000:]),
                      pages_per_chunk=8)
    assert 2000 / 8 / 2 < len(before) < 2000 / 8 * 2
    assert all(len(c) % PAGE == 0 and len(c) <= 32 * PAGE for c in before)
    assert len(set(after) - set(before)) <= 2  # the group the page went into (maybe split in two)
    fixed_after = chunks_of("checkpoint/pages-1.img", b"".join(pages[:1000] + [bytes(PAGE)] + pages[1000:]),
                            pages_per_chunk=8, grouping="fixed")
    fixed_before = chunks_of("checkpoint/pages-1.img", b"".join(pages), pages_per_chunk=8, grouping="fixed")
    assert len(set(fixed_after) - set(fixed_before)) > 100  # every group after the insertion
