"""The tar splitter: every byte handed out exactly once, and hostile or odd tars refused."""

from __future__ import annotations

import io
import re
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.errors import IntegrityError, UnsafeArchive
from backupd.storage.dedup.chunker import member_chunks
from backupd.storage.dedup.tarstream import BLOCK, TarSplitter

from .conftest import Repo


def split(data: bytes, **kwargs: object) -> tuple[list[tuple[str, str, int]], bytes]:
    """(name, kind, size) of each member, and the bytes the splitter handed out, in order."""
    tar = TarSplitter(io.BytesIO(data), what="test tar", **kwargs)  # type: ignore[arg-type]
    out = bytearray()
    members = []
    for m in tar:
        members.append((m.name, m.kind, m.size))
        out += m.literal
        for chunk in member_chunks(tar, m.name, m.size):
            out += chunk
    out += tar.trailer
    return members, bytes(out)


def make_tar(entries: list[tuple[str, bytes | None, str]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, data, kind) with kind "file", "dir" or "symlink"."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "target/" + "l" * 120
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def test_checkpoint_archive_splits_into_its_members_and_back(checkpoint_tar):
    data = checkpoint_tar()
    members, out = split(data)
    assert out == data
    names = [n for n, _, _ in members]
    assert names[:3] == ["stats-dump", "dump.log", "checkpoint/"]
    assert "checkpoint/pages-1.img" in names and names[-1] == "rootfs-diff.tar"
    assert dict((n, k) for n, k, _ in members)["checkpoint/"] == "5"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_in_each_format(fmt):
    long_dir = "d" * 90 + "/" + "e" * 60  # ustar splits this into prefix + name
    entries = [(long_dir, None, "dir"), (long_dir + "/file.img", b"x" * 1000, "file")]
    if fmt != tarfile.USTAR_FORMAT:
        entries += [("n" * 300, b"long", "file"), ("ünïcödé/" + "u" * 120, b"", "file"), ("link", None, "symlink")]
    data = make_tar(entries, fmt)
    members, out = split(data)
    assert out == data
    assert [n.rstrip("/") for n, _, _ in members] == [e[0] for e in entries]


def test_record_padding_after_the_end_blocks_is_kept():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:  # pads to 10 KiB records
        info = tarfile.TarInfo("a")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    assert len(data) == tarfile.RECORDSIZE
    assert split(data)[1] == data


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def header(name: str, size: int, kind: bytes = b"0", *, size_field: bytes | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[156:157] = kind
    if size_field is not None:
        block[124:136] = size_field
    block[148:156] = b"        "
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


END = bytes(2 * BLOCK)
ONE_FILE = header("file", 2000) + (b"a" * 2000).ljust(2048, b"\0") + END  # as Go writes it: no record padding


@pytest.mark.parametrize("data, message", [
    (ONE_FILE[:700], "truncated at byte 700"),  # in the data
    (ONE_FILE[:BLOCK + 2010], "truncated at byte 2522"),  # in the padding
    (ONE_FILE[:-2 * BLOCK], "no end-of-archive marker"),
    (ONE_FILE[:-BLOCK], "end-of-archive marker at byte"),
    (ONE_FILE[:300], "truncated"),  # in the first header
    (b"", "no end-of-archive marker"),
    (corrupt(ONE_FILE, 10, b"X"), "not a tar archive at byte 0 (header checksum mismatch)"),
    (ONE_FILE + b"\x01", "data after the tar's end-of-archive marker"),
    (ONE_FILE + ONE_FILE, "data after the tar's end-of-archive marker"),
    (header("f", 0, size_field=b"0000000001x\x00") + END, "is not octal"),
    (bytes(range(256)) * 8, "not a tar archive"),
], ids=["data", "padding", "no-end", "half-end", "header", "empty", "checksum", "trailing-byte", "concatenated",
        "size-not-octal", "garbage"])  # fmt: skip
def test_truncated_or_corrupt_tars_are_integrity_errors(data, message):
    with pytest.raises(IntegrityError, match=re.escape(message)) as info:
        split(data)
    assert type(info.value) is IntegrityError


@pytest.mark.parametrize("data, message", [
    (header("sparse", 0, b"S") + END, "unsupported tar type 'S'"),
    (header("vol", 0, b"V") + END, "unsupported tar type 'V'"),
    (header("l", 512, b"2") + bytes(512) + END, "'l' (type '2') at byte 0 claims 512 bytes"),
    (header("d/", 1024, b"5") + bytes(1024) + END, "links, directories and devices have none"),
    (header("neg", 0, size_field=b"\xff" * 12) + END, "negative size"),
    (header("big", 0, size_field=b"\x80" + b"\x00" * 4 + b"\x7f" + b"\xff" * 6) + END, "claims"),
    (header("x", 1 << 30, b"x") + END, "extended header at byte 0 claims"),
], ids=["sparse", "volume", "symlink-with-data", "dir-with-data", "negative", "absurd-size", "huge-pax"])  # fmt: skip
def test_odd_tars_are_refused_as_unsafe(data, message):
    with pytest.raises(UnsafeArchive, match=re.escape(message)):
        split(data)


def test_a_size_beyond_the_known_file_size_is_refused_before_reading():
    data = header("f", 10 << 20) + bytes(BLOCK) + END
    with pytest.raises(UnsafeArchive, match="claims 10485760 bytes, more than the"):
        split(data, total_size=len(data))


def test_a_lying_pax_record_is_corrupt():
    records = b"30 path=short\n"  # says 30 bytes, has 14
    data = header("././@PaxHeader", len(records), b"x") + records.ljust(BLOCK, b"\0") + header("f", 0) + END
    with pytest.raises(IntegrityError, match="malformed pax record"):
        split(data)


def test_a_pax_size_overrides_the_header_size():
    data = make_tar([("big", b"z" * 700, "file")])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big")
        info.size = 700
        info.pax_headers = {"size": "700"}
        tar.addfile(info, io.BytesIO(b"z" * 700))
    data = buf.getvalue()
    members, out = split(data)
    assert out == data and members == [("big", "0", 700)]


names = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1,
                max_size=40)
paths = st.lists(names, min_size=1, max_size=8).map("/".join).filter(lambda p: p not in (".", ".."))
page_images = st.integers(0, 40).map(lambda n: f"checkpoint/pages-{n}.img")
entries = st.lists(st.tuples(st.one_of(paths, page_images), st.one_of(
    st.binary(max_size=3000),
    st.integers(0, 70).map(lambda pages: bytes(range(256)) * 16 * pages),  # whole pages, some repeated
    st.integers(1, 600).map(lambda kib: (b"log line %d\n" * 100 % tuple(range(100))) * (kib // 1 + 1)),
), st.sampled_from(["file", "file", "dir", "symlink"])), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries=entries, fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       pages_per_chunk=st.sampled_from([1, 2, 4]))
def test_random_tars_come_back_byte_identical(entries, fmt, pages_per_chunk):
    from backupd.backends.memory import MemoryBackend

    data = make_tar(entries, fmt)
    assert split(data)[1] == data
    repo = Repo(MemoryBackend(), pages_per_chunk=pages_per_chunk, frame_size=8192, pack_size=64 << 10)
    repo.round_trip(data)
    repo.round_trip(data)  # the second time from chunks already stored
