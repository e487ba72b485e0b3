"""One set of member rules (issue 13): the push-mode scanner (restore, verify, drills) and
inspect's tarfile pass refuse exactly the same members, with the same words."""

from __future__ import annotations

import io
import tarfile

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
