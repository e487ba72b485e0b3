"""Hostile archives (issue 8): path traversal, absolute names, links out of the tree, device
files, enormous headers, truncated streams, garbage, corrupt CRIU images. Every one must end in
a clean ``BackupdError`` -- never another exception -- and nothing may be written anywhere.

"Nothing written" is checked two ways around every inspection: a Python audit hook records any
open for writing, mkdir, link, symlink, rename, remove, chmod, utime or truncate made by this
process while the inspection runs, and the test's temporary tree (the working directory's
parent, where ``../x`` would land) must be unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import struct
import sys
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.archive import criu
from backupd.archive.inspect import Inspection, Limits, inspect_stream
from backupd.errors import BackupdError, IntegrityError, UnsafeArchive

from .archives import Crafted, crafted_tar, minimal_members

# -- "nothing written" -------------------------------------------------------------------------

_WATCH: dict[str, list[str] | None] = {"events": None}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATING = {"os.mkdir", "os.symlink", "os.link", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.chown",
             "os.utime", "os.truncate", "shutil.copyfile", "shutil.move", "tempfile.mkstemp",
             "tempfile.mkdtemp"}  # fmt: skip


def _audit(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    events = _WATCH["events"]
    if events is None:
        return
    if event == "open":
        _path, mode, flags = args
        writes_mode = isinstance(mode, str) and any(c in mode for c in "wax+")
        if writes_mode or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            events.append(f"open {args!r}")
    elif event in _MUTATING:
        events.append(f"{event} {args!r}")


sys.addaudithook(_audit)


def _tree(root: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(root)), p.lstat().st_mode) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose parent is watched for anything new."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    inspect_stream(io.BytesIO(crafted_tar(rich_members())), source="warm-up")  # lazy imports happen now
    return tmp_path


@contextlib.contextmanager
def nothing_written(root: Path) -> Iterator[None]:
    before = _tree(root)
    _WATCH["events"] = events = []
    try:
        yield
    finally:
        _WATCH["events"] = None
    assert events == [], events
    assert _tree(root) == before


def inspect_bytes(data: bytes, root: Path, limits: Limits | None = None) -> Inspection | BackupdError:
    """Inspect; return the result or the BackupdError. Any other exception fails the test."""
    with nothing_written(root):
        try:
            return inspect_stream(io.BytesIO(data), source="fuzz", limits=limits or Limits())
        except BackupdError as exc:
            assert exc.exit_code == 7 or exc.exit_code == 2, exc
            assert "Traceback" not in str(exc)
            return exc


def refused(data: bytes, root: Path, kind: type[BackupdError] = UnsafeArchive, limits: Limits | None = None) -> str:
    got = inspect_bytes(data, root, limits)
    assert isinstance(got, kind), got
    return str(got)


# -- archives ----------------------------------------------------------------------------------


def inner_tar(members: list[Crafted]) -> bytes:
    return crafted_tar(members)


def rich_members() -> list[Crafted]:
    """Small, but reaching every reader: stats, deleted files, an inner rootfs diff, a tree."""
    base = minimal_members()
    pstree = criu.encode_image("PSTREE", [criu.PstreeEntry(pid=1, threads=[1]),
                                          criu.PstreeEntry(pid=7, ppid=1, threads=[7])])  # fmt: skip
    core7 = criu.encode_image("CORE", [criu.CoreEntry(tc=criu.TaskCoreEntry(comm="worker", task_state=6))])
    dump = criu.DumpStatsEntry(freezing_time=5, pages_scanned=9, pages_written=2)
    stats = criu.encode_stats(criu.StatsEntry(dump=dump))
    rootfs = inner_tar([Crafted("etc", type=tarfile.DIRTYPE), Crafted("etc/app.conf", b"x = 1\n"),
                        Crafted("etc/localtime", type=tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/UTC"),
                        Crafted("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)])  # fmt: skip
    return [
        *[m for m in base if m.name != "checkpoint/pstree.img"],
        Crafted("checkpoint/pstree.img", pstree),
        Crafted("checkpoint/core-7.img", core7),
        Crafted("stats-dump", stats),
        Crafted("deleted.files", json.dumps(["/etc/motd"]).encode()),
        Crafted("rootfs-diff.tar", rootfs),
    ]


def with_member(extra: Crafted, at: int = 2) -> bytes:
    members = rich_members()
    members.insert(at, extra)
    return crafted_tar(members)


def test_the_rich_archive_itself_is_fine(sandbox: Path) -> None:
    r = inspect_bytes(crafted_tar(rich_members()), sandbox)
    assert isinstance(r, Inspection), r
    assert r.process_tree is not None and [(c.pid, c.command, c.task_state) for c in r.process_tree.children] == [
        (7, "worker", "Zombie")]  # fmt: skip
    assert r.rootfs_diff is not None and {f.type for f in r.rootfs_diff.files} == {"dir", "file", "symlink", "char"}
    assert r.statistics is not None and r.statistics.pages_written == 2 and r.deleted_files == ["/etc/motd"]


# -- targeted regressions, one per class -----------------------------------------------------

NAMES = ["../x", "/etc/passwd", "a/../../b", "./../x", "checkpoint/../../../x", "//etc/x", "..", "x/.."]


@pytest.mark.parametrize("name", NAMES)
def test_traversal_and_absolute_names(sandbox: Path, name: str) -> None:
    message = refused(with_member(Crafted(name, b"owned\n")), sandbox)
    assert repr(name) in message and ("absolute" in message or "path traversal" in message)


@pytest.mark.parametrize("member", [
    Crafted("link", type=tarfile.SYMTYPE, linkname="../../etc/passwd"),
    Crafted("checkpoint/pages-9.img", type=tarfile.SYMTYPE, linkname="/dev/zero"),
    Crafted("hl", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
    Crafted("config.dump", type=tarfile.LNKTYPE, linkname="../outside"),
    Crafted("tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0),
    Crafted("sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
    Crafted("pipe", type=tarfile.FIFOTYPE),
    Crafted("odd", b"data", type=b"Z"),
], ids=lambda m: f"{m.name}-{m.type.decode()}")  # fmt: skip
def test_links_devices_fifos_and_unknown_types(sandbox: Path, member: Crafted) -> None:
    message = refused(with_member(member), sandbox)
    assert repr(member.name) in message and "not a regular file or directory" in message


def test_duplicate_names_over_long_names_and_absurd_sizes(sandbox: Path) -> None:
    assert "'config.dump' appears twice" in refused(with_member(Crafted("config.dump", b"{}"), at=7), sandbox)
    assert "longer than 64" in refused(with_member(Crafted("n" * 100, b"")), sandbox, limits=Limits(max_name_length=64))
    # declared sizes are judged before any data is read (the data is not even there)
    huge = crafted_tar([*rich_members()[:2], Crafted("checkpoint/pages-2.img", size=1 << 50)], end=False)
    assert f"declares {1 << 50} bytes" in refused(huge, sandbox)
    big_meta = crafted_tar([*rich_members()[:2], Crafted("config.dump", size=17 << 20)], end=False)
    assert "over the 16777216-byte limit for a metadata file" in refused(big_meta, sandbox)
    pax_size = crafted_tar([Crafted("checkpoint/pages-3.img", pax={"size": str(10**30)})], end=False)
    assert f"declares {10**30} bytes" in refused(pax_size, sandbox)


@pytest.mark.timeout(120)  # a regression spins for hours (tarfile skips block by block past the end)
@pytest.mark.parametrize("where", ["outer", "rootfs-diff"])
def test_a_member_declaring_terabytes_on_a_short_stream(sandbox: Path, where: str) -> None:
    big = Crafted("checkpoint/pages-9.img" if where == "outer" else "big", size=1 << 43)
    if where == "outer":
        data = crafted_tar([*rich_members(), big], end=False) + b"only this"
    else:
        members = [m for m in rich_members() if m.name != "rootfs-diff.tar"]
        data = crafted_tar([*members, Crafted("rootfs-diff.tar", crafted_tar([big], end=False))])
    assert "truncated" in refused(data, sandbox, IntegrityError)


def _negative_size_header(name: str) -> bytes:
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\xff" * 12  # base-256 -1
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def test_negative_size(sandbox: Path) -> None:
    data = crafted_tar(rich_members(), end=False) + _negative_size_header("checkpoint/pages-5.img") + bytes(1024)
    assert "declares -1 bytes" in refused(data, sandbox)


class Endless:
    """``size`` bytes of ``fill`` after ``head``, generated as read: never in memory at once."""

    def __init__(self, head: bytes, size: int, fill: bytes = b"7") -> None:
        self.head, self.left, self.block = head, size, fill * (1 << 16)

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data
        n = min(n if n >= 0 else 1 << 16, self.left, len(self.block))
        self.left -= n
        return self.block[:n]


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
def test_enormous_extended_headers_are_never_buffered(sandbox: Path, kind: bytes) -> None:
    """A PAX/GNU long-name header declaring a terabyte, followed by 48 MiB: tarfile alone would
    buffer all of it (it reads an extended header whole); the header budget stops at ~1 MiB."""
    info = tarfile.TarInfo("././@LongLink" if kind != tarfile.XHDTYPE else "pax")
    info.type, info.size = kind, 1 << 40
    head = crafted_tar(rich_members()[:1], end=False) + info.tobuf(tarfile.GNU_FORMAT)
    tracemalloc.start()
    try:
        with nothing_written(sandbox), pytest.raises(UnsafeArchive, match="runs past the .*-byte limit"):
            inspect_stream(Endless(head, 48 << 20), source="endless")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_enormous_gnu_sparse_map_is_never_buffered(sandbox: Path) -> None:
    """GNU sparse 1.0: tarfile reads the map (``count\\n`` then numbers) inside header parsing."""
    pax = tarfile.TarInfo("pax")
    pax.type = tarfile.XHDTYPE
    records = b"".join(b"%d %s\n" % (len(r) + 3 + len(str(len(r) + 3)) - 1, r)
                       for r in (b"GNU.sparse.major=1", b"GNU.sparse.minor=0"))  # fmt: skip
    assert all(int(line.split(b" ")[0]) == len(line) + 1 for line in records.split(b"\n")[:-1])
    pax.size = len(records)
    member = tarfile.TarInfo("checkpoint/pages-1.img")
    member.size = 1 << 30
    head = (crafted_tar(rich_members()[:1], end=False) + pax.tobuf(tarfile.USTAR_FORMAT)
            + records.ljust(512, b"\0") + member.tobuf(tarfile.USTAR_FORMAT) + b"99999999999\n")
    tracemalloc.start()
    try:
        with nothing_written(sandbox), pytest.raises(UnsafeArchive, match="runs past the .*-byte limit"):
            inspect_stream(Endless(head, 48 << 20, fill=b"12345\n"), source="sparse",
                           limits=Limits(max_header_bytes=64 << 10))  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_chained_extended_headers(sandbox: Path) -> None:
    pax = tarfile.TarInfo("pax")
    pax.type, pax.size = tarfile.XHDTYPE, 512
    record = b"18 comment=padded\n".ljust(512, b"\0")
    chain = (pax.tobuf(tarfile.USTAR_FORMAT) + record) * 20
    data = crafted_tar(rich_members(), end=False) + chain + crafted_tar([Crafted("x", b"1")])
    assert "chained" in refused(data, sandbox)


def test_truncation_anywhere_is_reported(sandbox: Path) -> None:
    data = crafted_tar(rich_members())
    complete = len(data) - 512  # the first end-of-archive block is all a reader needs
    cuts = sorted({*range(0, len(data), 512), *range(100, len(data), 1024), *range(511, len(data), 2048)})
    for cut in cuts:
        got = inspect_bytes(data[:cut], sandbox)
        if cut >= complete:
            assert isinstance(got, Inspection), (cut, got)
        else:
            assert isinstance(got, IntegrityError), (cut, got)
            assert "truncated" in str(got) or "not a tar archive" in str(got) or "unexpected end" in str(got), got
    for compress in (gzip.compress, zstandard.ZstdCompressor().compress):
        packed = compress(data)
        for cut in range(10, len(packed) - 20, max(len(packed) // 15, 1)):
            assert isinstance(inspect_bytes(packed[:cut], sandbox), IntegrityError), (compress, cut)


def test_garbage_where_a_header_should_be(sandbox: Path) -> None:
    members = rich_members()
    head = crafted_tar(members[:3], end=False)
    data = head + b"\x8b garbage, not a header " * 40 + crafted_tar(members[3:])
    message = refused(data, sandbox, IntegrityError)
    assert f"invalid tar header at offset {len(head)}" in message


@pytest.mark.parametrize("name, data, expected", [
    ("checkpoint/core-1.img", b"\x19\x43\x56\x54\x47\x38\x05\x55" + b"\xff" * 12, "core-1.img"),
    ("checkpoint/core-1.img", criu.encode_image("CORE", [criu.CoreEntry(tc=criu.TaskCoreEntry(comm="a"))])[:-3],
     "core-1.img"),
    ("checkpoint/pstree.img", b"\x19\x43\x56\x54\x30\x30\x27\x50\x05\x00\x00\x00\x08", "pstree.img"),
    ("checkpoint/pstree.img", criu.encode_image("INVENTORY", [criu.InventoryEntry()]), "expected a CRIU PSTREE"),
    ("stats-dump", b"\x40\x59\x10\x55\x06\x33\x09\x57\xff\xff\xff\x7f", "stats-dump"),
], ids=["core-garbage", "core-truncated", "pstree-truncated", "pstree-wrong-magic", "stats-huge-entry"])  # fmt: skip
def test_corrupt_criu_images(sandbox: Path, name: str, data: bytes, expected: str) -> None:
    members = [m for m in rich_members() if m.name != name] + [Crafted(name, data)]
    assert expected in refused(crafted_tar(members), sandbox)


def _tree_members(entries: list[criu.PstreeEntry]) -> bytes:
    members = [m for m in minimal_members() if not m.name.startswith(("checkpoint/pstree", "checkpoint/core"))]
    members.append(Crafted("checkpoint/pstree.img", criu.encode_image("PSTREE", entries)))
    for e in entries:
        core = criu.CoreEntry(tc=criu.TaskCoreEntry(comm=f"p{e.pid}"))
        members.append(Crafted(f"checkpoint/core-{e.pid}.img", criu.encode_image("CORE", [core])))
    return crafted_tar(members)


def test_process_trees_that_are_not_trees(sandbox: Path) -> None:
    cycle = [criu.PstreeEntry(pid=1, ppid=0), criu.PstreeEntry(pid=2, ppid=3), criu.PstreeEntry(pid=3, ppid=2)]
    assert "not a tree" in refused(_tree_members(cycle), sandbox)
    assert "2 root processes" in refused(_tree_members([criu.PstreeEntry(pid=1), criu.PstreeEntry(pid=2)]), sandbox)
    orphan = [criu.PstreeEntry(pid=1), criu.PstreeEntry(pid=2, ppid=9)]
    assert "parent 9 of pid 2 is not in the tree" in refused(_tree_members(orphan), sandbox)
    deep = [criu.PstreeEntry(pid=1)] + [criu.PstreeEntry(pid=i, ppid=i - 1) for i in range(2, 300)]
    assert "deeper than 128" in refused(_tree_members(deep), sandbox)
    ok = inspect_bytes(_tree_members(deep[:100]), sandbox)
    assert isinstance(ok, Inspection) and ok.process_tree is not None


@pytest.mark.parametrize("inner, expected", [
    (Crafted("../../etc/passwd", b"x"), "climbs out"),
    (Crafted("/etc/passwd", b"x"), "absolute name"),
    (Crafted("hl", type=tarfile.LNKTYPE, linkname="/etc/shadow"), "points outside the tree"),
    (Crafted("hl", type=tarfile.LNKTYPE, linkname="a/../../x"), "points outside the tree"),
], ids=["traversal", "absolute", "hardlink-abs", "hardlink-up"])  # fmt: skip
def test_hostile_rootfs_diff(sandbox: Path, inner: Crafted, expected: str) -> None:
    members = [m for m in rich_members() if m.name != "rootfs-diff.tar"]
    members.append(Crafted("rootfs-diff.tar", inner_tar([Crafted("etc", type=tarfile.DIRTYPE), inner])))
    message = refused(crafted_tar(members), sandbox)
    assert "rootfs-diff.tar" in message and expected in message


def test_corrupt_json_and_wrong_types(sandbox: Path) -> None:
    for name, data, expected in [
        ("config.dump", b"{not json", "config.dump is not valid JSON"),
        ("config.dump", b"[" * 100_000, "config.dump is not valid JSON"),
        ("config.dump", b'{"id": 5}', "field 'id' is int, not a string"),
        ("spec.dump", b'{"annotations": []}', "'annotations' is not a JSON object"),
        ("deleted.files", b'{"a": 1}', "deleted.files is not a JSON list"),
    ]:
        members = [m for m in rich_members() if m.name != name] + [Crafted(name, data)]
        assert expected in refused(crafted_tar(members), sandbox, IntegrityError)


# -- fuzzing ---------------------------------------------------------------------------------

# BACKUPD_FUZZ_EXAMPLES=20000 for a deeper run than the suite's quick one
FUZZ = settings(max_examples=int(os.environ.get("BACKUPD_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

segments = st.sampled_from(["..", ".", "", "a", "checkpoint", "etc", "passwd"])
bad_names = st.one_of(
    st.sampled_from(NAMES),
    st.lists(segments, min_size=1, max_size=5).map("/".join).filter(lambda n: ".." in n.split("/")),
    st.lists(segments, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)),
)
link_targets = st.one_of(st.sampled_from(["/etc/passwd", "../../x", "x", "", "checkpoint/pages-1.img"]),
                         st.text(min_size=1, max_size=30))  # fmt: skip
hostile_members = st.one_of(
    st.builds(Crafted, name=bad_names, data=st.binary(max_size=64)),
    st.builds(Crafted, name=st.sampled_from(["l", "config.dump", "checkpoint/x"]), type=st.sampled_from(
        [tarfile.SYMTYPE, tarfile.LNKTYPE]), linkname=link_targets),
    st.builds(Crafted, name=st.sampled_from(["d", "checkpoint/dev"]), type=st.sampled_from(
        [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]), devmajor=st.integers(0, 255),
        devminor=st.integers(0, 255)),
)  # fmt: skip


@FUZZ
@given(member=hostile_members, at=st.integers(0, 10), fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_fuzz_hostile_members_are_always_refused(sandbox: Path, member: Crafted, at: int, fmt: int) -> None:
    members = rich_members()
    members.insert(min(at, len(members)), member)
    try:
        data = crafted_tar(members, fmt=fmt)
    except (ValueError, UnicodeError):  # not encodable in this format: nothing to test
        return
    refused(data, sandbox)


VALID = crafted_tar(rich_members())
mutations = st.lists(st.one_of(
    st.tuples(st.just("cut"), st.integers(0, len(VALID))),
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=24)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("size"), st.integers(0, len(VALID) // 512 - 1), st.integers(-(1 << 70), 1 << 70)),
), min_size=1, max_size=4)  # fmt: skip


def _mutate(data: bytes, ops: list[tuple]) -> bytes:  # type: ignore[type-arg]
    buf = bytearray(data)
    for op in ops:
        if op[0] == "cut":
            del buf[op[1] :]
        elif op[0] == "flip":
            buf[op[1] : op[1] + len(op[2])] = op[2]
        elif op[0] == "insert":
            buf[op[1] : op[1]] = op[2]
        elif op[0] == "size" and (op[1] + 1) * 512 <= len(buf):
            # rewrite a block's size field as if it were a header, with a valid checksum
            start = op[1] * 512
            block = buf[start : start + 512]
            value = op[2]
            block[124:136] = (b"%011o\0" % value) if 0 <= value < 8**11 else (
                b"\x80" + value.to_bytes(11, "big", signed=True)[1:] if abs(value) < 1 << 87 else b"\xff" * 12)
            block[148:156] = b" " * 8
            block[148:156] = b"%06o\0 " % sum(block)
            buf[start : start + 512] = block
    return bytes(buf)


@FUZZ
@given(ops=mutations, packing=st.sampled_from(["none", "gzip", "zstd"]))
def test_fuzz_mutated_archives_never_escape(sandbox: Path, ops: list[tuple], packing: str) -> None:  # type: ignore[type-arg]
    data = _mutate(VALID, ops)
    if packing == "gzip":
        data = gzip.compress(data)
    elif packing == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    inspect_bytes(data, sandbox)  # an Inspection or a BackupdError; anything else fails


@FUZZ
@given(data=st.binary(max_size=4096), prefix=st.sampled_from([b"", b"\x28\xb5\x2f\xfd", b"\x1f\x8b", b"BZh",
                                                              b"\xfd7zXZ\x00", VALID[:512]]))  # fmt: skip
def test_fuzz_random_bytes(sandbox: Path, data: bytes, prefix: bytes) -> None:
    got = inspect_bytes(prefix + data, sandbox)
    assert isinstance(got, BackupdError)


@FUZZ
@given(image=st.sampled_from(["checkpoint/pstree.img", "checkpoint/core-1.img", "checkpoint/core-7.img",
                              "stats-dump"]), ops=mutations)  # fmt: skip
def test_fuzz_corrupt_criu_images(sandbox: Path, image: str, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    members = rich_members()
    target = next(m for m in members if m.name == image)
    target.data = _mutate(target.data, [op for op in ops if op[0] != "size"])
    got = inspect_bytes(crafted_tar(members), sandbox)
    assert isinstance(got, (Inspection, BackupdError))


def test_mutation_helper_writes_valid_checksums() -> None:
    data = _mutate(VALID, [("size", 0, 7)])
    info = tarfile.TarInfo.frombuf(data[:512], "utf-8", "surrogateescape")
    assert info.size == 7 and struct.unpack("4s", data[:4])
