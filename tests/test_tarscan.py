"""One tar reader (issue 14): restore, verify, drills and inspect all read through the push-mode
scanner, so they refuse exactly the same members, with the same words; inspect lists the inner
rootfs-diff.tar with the same scanner under the content rules (sparse files, long link names)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from backupd.archive.inspect import inspect_stream
from backupd.archive.tar import Limits, TarScanner
from backupd.errors import UnsafeArchive
from tests.inspect.archives import Crafted, crafted_tar, minimal_members

HOSTILE = {
    "dot-dot": [Crafted("checkpoint/../../x", b"x")],
    "bare dot-dot": [Crafted("..", type=tarfile.DIRTYPE)],
    "absolute": [Crafted("/etc/passwd", b"x")],
    "dot-slash absolute": [Crafted(".//etc/passwd", b"x")],
    "empty segment": [Crafted("checkpoint//pages-1.img", b"x")],
    "PAX path traversal": [Crafted("harmless", b"x", pax={"path": "../../root/.ssh/authorized_keys"})],
    "symlink": [Crafted("checkpoint", type=tarfile.SYMTYPE, linkname="/etc")],
    "hardlink": [Crafted("dump", type=tarfile.LNKTYPE, linkname="config.dump")],
    "char device": [Crafted("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "block device": [Crafted("sda", type=tarfile.BLKTYPE, devmajor=8)],
    "fifo": [Crafted("fifo", type=tarfile.FIFOTYPE)],
    "GNU sparse": [Crafted("checkpoint/pages-2.img", type=tarfile.GNUTYPE_SPARSE)],
    "PAX sparse": [Crafted("checkpoint/pages-2.img", b"x", pax={"GNU.sparse.map": "0,1", "GNU.sparse.size": "1"})],
    "unknown type": [Crafted("odd", b"x", type=b"Z")],
    "a name twice": [Crafted("checkpoint/pages-1.img", b"a"), Crafted("./checkpoint/pages-1.img", b"b")],
    "a long name": [Crafted("n" * 5000, b"x")],
    "absurd size": [Crafted("checkpoint/pages-3.img", size=1 << 50)],
}


def scanner_verdict(data: bytes, limits: Limits = Limits()) -> str:
    scanner = TarScanner("archive t", lambda name: False, limits=limits)
    with pytest.raises(UnsafeArchive) as exc:
        for at in range(0, len(data), 700):  # any chunking
            scanner.feed(data[at : at + 700])
        scanner.close()
    return str(exc.value)


def inspect_verdict(data: bytes, limits: Limits = Limits()) -> str:
    with pytest.raises(UnsafeArchive) as exc:
        inspect_stream(io.BytesIO(data), source="archive t", limits=limits)
    return str(exc.value)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_scanner_and_inspect_refuse_the_same_member_with_the_same_message(kind: str) -> None:
    members = minimal_members()
    members[3:3] = HOSTILE[kind]
    data = crafted_tar(members, fmt=tarfile.GNU_FORMAT if kind == "GNU sparse" else tarfile.PAX_FORMAT,
                       end=kind != "absurd size")  # fmt: skip
    assert scanner_verdict(data) == inspect_verdict(data)


def test_the_member_limit_is_the_same_for_both() -> None:
    data = crafted_tar([*minimal_members(), *(Crafted(f"checkpoint/f{i}", b"") for i in range(20))])
    limits = Limits(max_members=10)
    assert scanner_verdict(data, limits) == inspect_verdict(data, limits) == "archive t has more than 10 members; " \
        "refused as hostile"


def test_what_the_rules_accept_both_accept() -> None:
    data = crafted_tar([Crafted(".", type=tarfile.DIRTYPE), Crafted("./checkpoint/", type=tarfile.DIRTYPE),
                        *minimal_members(), Crafted("checkpoint", type=tarfile.DIRTYPE)])  # fmt: skip
    scanner = TarScanner("archive t", lambda name: name == "config.dump")
    scanner.feed(data)
    scanner.close()
    assert scanner.members == 9 and set(scanner.files) == {"config.dump"}
    assert inspect_stream(io.BytesIO(data), source="archive t").members == 9


def test_header_only_members_carry_no_data_whatever_their_size_says() -> None:
    """A directory (or link, device, FIFO) declaring a size: tarfile and Go's archive/tar read no
    data after it, and so does the scanner -- else it would see other members than the runtime."""
    data = crafted_tar([Crafted("checkpoint", type=tarfile.DIRTYPE, size=1024), *minimal_members()[1:]])
    scanner = TarScanner("archive t", lambda name: name == "config.dump")
    scanner.feed(data)
    scanner.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert scanner.members == len(tar.getmembers()) == len(minimal_members())
    assert inspect_stream(io.BytesIO(data), source="t").members == len(minimal_members())


def _with_rootfs_diff(inner: bytes) -> bytes:
    return crafted_tar([*minimal_members(), Crafted("rootfs-diff.tar", inner)])


def test_long_link_names_are_listed_in_the_rootfs_diff() -> None:
    target = "/usr/share/" + "z" * 150 + "/UTC"
    inner = crafted_tar([Crafted("etc/localtime", type=tarfile.SYMTYPE, linkname=target)], fmt=tarfile.GNU_FORMAT)
    r = inspect_stream(io.BytesIO(_with_rootfs_diff(inner)), source="t")
    assert r.rootfs_diff is not None and [(f.path, f.type, f.link) for f in r.rootfs_diff.files] == [
        ("etc/localtime", "symlink", target)]  # fmt: skip


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse archives")
@pytest.mark.parametrize("options", [["--format=gnu"], ["--format=posix", "--sparse-version=0.1"],
                                     ["--format=posix", "--sparse-version=1.0"]], ids=["gnu", "pax-0.1", "pax-1.0"])
def test_sparse_files_are_content_in_the_rootfs_diff_and_refused_in_the_archive(tmp_path: Path,
                                                                                options: list[str]) -> None:
    """GNU tar's three sparse encodings, 12 holes (the old format needs extension blocks): the
    rootfs diff lists the file at its apparent size and reads on past it; the archive refuses it."""
    with open(tmp_path / "holes", "wb") as fh:
        for i in range(12):
            fh.seek(i << 20)
            fh.write(b"x" * 100)
    (tmp_path / "after").write_bytes(b"1")
    subprocess.run(["tar", *options, "-cSf", "inner.tar", "holes", "after"], cwd=tmp_path, check=True,
                   env={**os.environ, "LC_ALL": "C"})  # fmt: skip
    inner = (tmp_path / "inner.tar").read_bytes()
    with tarfile.open(tmp_path / "inner.tar") as tar:
        expected = [(m.name, m.size) for m in tar.getmembers()]
    r = inspect_stream(io.BytesIO(_with_rootfs_diff(inner)), source="t")
    assert r.rootfs_diff is not None
    assert [(f.path, f.size) for f in r.rootfs_diff.files] == expected == [("holes", (11 << 20) + 100), ("after", 1)]
    outer = crafted_tar(minimal_members(), end=False) + inner
    assert "'holes' is a sparse file" in scanner_verdict(outer) == inspect_verdict(outer)
