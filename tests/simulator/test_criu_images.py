"""The CRIU image codec (CRIU's framing, CRIU's protobuf messages): round trips, the real
stats-dump fixture, hostile input."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from backupd.archive import criu
from backupd.errors import UnsafeArchive

# shared/fixtures lives beside the repository
FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
STATS_FIXTURE = FIXTURES / "checkpointctl/history/0405c795b97e646c1332fc1f3f9269e803507c68/test/stats-dump"
needs_fixture = pytest.mark.skipif(not STATS_FIXTURE.is_file(),
                                   reason=f"stats-dump fixture not found at {STATS_FIXTURE}")


def sample_images() -> dict[str, bytes]:
    ids = criu.TaskKobjIdsEntry(vm_id=1, files_id=1, fs_id=1, sighand_id=1, pid_ns_id=1, time_ns_id=5)
    return {
        "inventory": criu.encode_image("INVENTORY", [criu.InventoryEntry(
            img_version=2, fdinfo_per_id=True, root_ids=ids, ns_per_id=True, lsmtype=0,
            plugins_entry=criu.PluginsEntry(plugins=["amdgpu"]), dump_criu_run_id="run-1")]),
        "pstree": criu.encode_image("PSTREE", [
            criu.PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1, 7]),
            criu.PstreeEntry(pid=2, ppid=1, pgid=1, sid=1, threads=[2]),
        ]),
        "core": criu.encode_image("CORE", [criu.CoreEntry(
            mtype=1,
            tc=criu.TaskCoreEntry(task_state=6, exit_code=137, comm="nginx", oom_score_adj=-998, loginuid=0xFFFFFFFF),
            thread_core=criu.ThreadCoreEntry(futex_rla=0x7F0000001000, futex_rla_len=24, sched_nice=-5))]),
        "pagemap": criu.encode_image("PAGEMAP", [
            criu.PagemapHead(pages_id=3),
            criu.PagemapEntry(vaddr=0x7FFC00000000, compat_nr_pages=2, flags=criu.PE_PRESENT, nr_pages=2),
            criu.PagemapEntry(vaddr=0x400000, compat_nr_pages=0, flags=criu.PE_PRESENT | criu.PE_LAZY,
                              nr_pages=1 << 33),
        ]),
        "stats": criu.encode_stats(criu.StatsEntry(dump=criu.DumpStatsEntry(freezing_time=1, pages_written=1 << 40))),
        "mm": criu.encode_image("MM", [criu.MmEntry(mm_arg_start=0x10, mm_arg_end=0x20, exe_file_id=9,
                                                mm_saved_auxv=[33, 1 << 63],
                                                vmas=[criu.VmaEntry(start=0x1000, end=0x3000, prot=3, fd=-1)])]),
    }  # fmt: skip


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_preserves_every_field():
    images = sample_images()
    for name, data in images.items():
        decoded = criu.decode_image(data)
        assert criu.encode_image(decoded.magic, decoded.entries) == data, name

    core = criu.decode_image(images["core"], expect="CORE").entries[0]
    assert core.tc.comm == "nginx"
    assert criu.task_state_name(core.tc) == "Zombie"
    assert core.tc.exit_code == 137
    assert core.tc.oom_score_adj == -998  # int32, negative: a 10-byte varint on the wire
    assert core.thread_core.sched_nice == -5  # sint32 zigzag

    head, *entries = criu.decode_image(images["pagemap"]).entries
    assert head == criu.PagemapHead(pages_id=3)
    assert [criu.pagemap_pages(e) for e in entries] == [2, 1 << 33]  # nr_pages (u64) wins over compat_nr_pages

    tree = criu.decode_image(images["pstree"]).entries
    assert [(p.pid, p.ppid, p.threads) for p in tree] == [(1, 0, [1, 7]), (2, 1, [2])]

    mm = criu.decode_image(images["mm"]).entries[0]
    assert mm.mm_saved_auxv == [33, 1 << 63]
    assert mm.vmas[0].fd == -1  # sint64


def test_image_framing_per_kind():
    images = sample_images()
    assert struct.unpack_from("<I", images["inventory"]) == (criu.MAGICS["INVENTORY"],)  # no common magic
    assert struct.unpack_from("<II", images["pstree"]) == (criu.IMG_COMMON, criu.MAGICS["PSTREE"])
    assert struct.unpack_from("<II", images["stats"]) == (criu.IMG_SERVICE, criu.MAGICS["STATS"])


def test_magics_match_criu_magic_h():
    # spot checks against criu/include/magic.h and go-criu magic/magic.go (decimal there)
    assert criu.MAGICS["INVENTORY"] == 0x58313116
    assert criu.MAGICS["PSTREE"] == 0x50273030
    assert criu.MAGICS["CORE"] == 0x55053847 == 1426405447
    assert criu.MAGICS["PAGEMAP"] == 0x56084025
    assert criu.MAGICS["MM"] == 0x57492820
    assert criu.MAGICS["STATS"] == 1460220678
    assert criu.IMG_SERVICE == 1427134784


def test_packed_repeated_fields_are_accepted():
    # proto2 writers may pack repeated scalars; threads 1, 300 packed into one field 5
    payload = bytes([0x08, 1, 0x10, 0, 0x18, 1, 0x20, 1, 0x2A, 3, 1, 0xAC, 0x02])
    data = struct.pack("<III", criu.IMG_COMMON, criu.MAGICS["PSTREE"], len(payload)) + payload
    assert criu.decode_image(data).entries[0].threads == [1, 300]


def test_unknown_fields_are_skipped():
    known = criu.encode_message(criu.PstreeEntry(pid=5, ppid=1, pgid=5, sid=5))
    unknown = bytes([0x98, 0x06, 0x07])  # field 99 varint
    unknown += bytes([0xA2, 0x06, 0x02, 0xAA, 0xBB])  # field 100 bytes
    unknown += bytes([0xAD, 0x06]) + b"\x01\x02\x03\x04"  # field 101 fixed32
    unknown += bytes([0xB1, 0x06]) + bytes(8)  # field 102 fixed64
    payload = unknown + known
    data = struct.pack("<III", criu.IMG_COMMON, criu.MAGICS["PSTREE"], len(payload)) + payload
    assert criu.decode_image(data).entries[0] == criu.PstreeEntry(pid=5, ppid=1, pgid=5, sid=5)


# -- the real stats-dump ------------------------------------------------------------------------


@needs_fixture
def test_stats_dump_fixture_decodes_to_documented_values():
    data = STATS_FIXTURE.read_bytes()
    assert len(data) == 54
    stats = criu.decode_stats(data)
    assert not stats.HasField("restore")
    assert stats.dump == criu.DumpStatsEntry(
        freezing_time=105405, frozen_time=1376964, memdump_time=504399, memwrite_time=446571,
        pages_scanned=492153, pages_skipped_parent=0, pages_written=88689, irmap_resolve=0,
        pages_lazy=0, page_pipes=16, page_pipe_bufs=16, shpages_scanned=0,
        shpages_skipped_parent=0, shpages_written=0,
    )  # fmt: skip
    assert criu.encode_stats(stats) == data  # byte-exact: same field order and encoding as CRIU


# -- hostile input --------------------------------------------------------------------------


def refused(data: bytes, match: str, **kwargs) -> None:
    with pytest.raises(criu.CriuImageError, match=match):
        criu.decode_image(data, **kwargs)


def test_error_class_is_unsafe_archive_and_value_error():
    with pytest.raises(UnsafeArchive):
        criu.decode_image(b"\x00")
    with pytest.raises(ValueError):
        criu.decode_image(b"\x00")


def test_refuses_wrong_or_missing_magic():
    refused(b"", "too short")
    refused(b"\x19\x43\x56", "too short")
    refused(struct.pack("<I", criu.IMG_COMMON), "truncated after its common magic")
    refused(struct.pack("<II", criu.IMG_COMMON, 0xDEADBEEF), "unknown magic 0xdeadbeef")
    refused(b"GIF89a\x00\x00", "unknown magic")
    refused(sample_images()["core"], "expected a CRIU PSTREE image, found CORE", expect="PSTREE")
    refused(criu.encode_image("FILES", []), "no decoder for CRIU FILES")


def test_refuses_absurd_entry_size_without_allocating():
    data = struct.pack("<IIII", criu.IMG_COMMON, criu.MAGICS["CORE"], 0xFFFFFFFF, 0)
    refused(data, r"claims 4294967295 bytes, only 4 left")


def test_refuses_too_many_entries_before_parsing_any():
    entries = [criu.PstreeEntry(pid=i) for i in range(1, 12)]
    data = criu.encode_image("PSTREE", entries)
    assert len(criu.split_image(data, max_entries=11)[1]) == 11
    with pytest.raises(criu.CriuImageError, match="PSTREE image has more than 10 entries"):
        criu.split_image(data, max_entries=10)
    assert criu.MAX_ENTRIES == 4_000_000 and len(criu.decode_image(data).entries) == 11


def test_refuses_absurd_field_length():
    payload = bytes([0x32]) + b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f"  # comm with a 2^63-ish length
    data = struct.pack("<III", criu.IMG_COMMON, criu.MAGICS["CORE"], len(payload)) + payload
    refused(data, "CORE image entry 0: malformed core_entry message")


def test_refuses_malformed_protobuf():
    def image(payload: bytes) -> bytes:
        return struct.pack("<III", criu.IMG_COMMON, criu.MAGICS["PSTREE"], len(payload)) + payload

    # protobuf's parser names the message, not the wire-level fault
    malformed = "PSTREE image entry 0: malformed pstree_entry message"
    refused(image(b"\x08" + b"\xff" * 11), malformed)  # a varint longer than 10 bytes
    refused(image(b"\x08\xff"), malformed)  # a truncated varint
    refused(image(b"\x08\x01\x10\x00\x18\x01"), "lacks required field.*sid")
    # pid with the wire type of a string: protobuf keeps it as an unknown field, so pid is missing
    refused(image(b"\x0a\x01\x01\x10\x00\x18\x01\x20\x01"), "pstree_entry lacks required field.*pid")
    refused(image(b"\x0b"), malformed)  # a group that never ends
    refused(image(b"\x00\x01"), malformed)  # field number 0
    refused(image(b"\x09\x01\x02"), malformed)  # a truncated fixed64
    refused(struct.pack("<II", criu.IMG_COMMON, criu.MAGICS["PSTREE"]) + b"\x05\x00", "truncated in an entry size")
    refused(criu.encode_image("PAGEMAP", []), "no pagemap_head")
    with pytest.raises(criu.CriuImageError, match="has 2 entries, expected 1"):
        criu.decode_stats(criu.encode_image("STATS", [criu.StatsEntry(), criu.StatsEntry()]))


def test_nesting_is_bounded_by_the_parser():
    """Unknown groups nest without a schema; protobuf's parser stops at its depth limit (100)."""
    valid = criu.encode_message(criu.PstreeEntry(pid=1))

    def nested(depth: int) -> bytes:
        payload = valid + b"\xa3\x06" * depth + b"\xa4\x06" * depth  # field 100, start/end group
        return struct.pack("<III", criu.IMG_COMMON, criu.MAGICS["PSTREE"], len(payload)) + payload

    assert criu.encode_image("PSTREE", criu.decode_image(nested(50)).entries)[12:] == valid  # unknown fields dropped
    refused(nested(10_000), "malformed pstree_entry message")


def test_required_fields_left_unset_are_encoded_as_zero():
    entry = criu.PstreeEntry(pid=7, threads=[7])
    decoded = criu.decode_image(criu.encode_image("PSTREE", [entry])).entries[0]
    assert (decoded.pid, decoded.ppid, decoded.pgid, decoded.sid, list(decoded.threads)) == (7, 0, 0, 0, [7])
    assert not entry.HasField("ppid")  # the caller's message is left as it was
    core = criu.decode_image(criu.encode_image("CORE", [criu.CoreEntry(tc=criu.TaskCoreEntry(comm="a"))])).entries[0]
    assert core.tc.comm == "a" and criu.task_state_name(core.tc) == "Unknown" and criu.machine_name(core.mtype) is None


def test_a_comm_that_is_not_utf8_is_kept():
    payload = criu.encode_message(criu.TaskCoreEntry(comm="x"))[:-3] + b"\x32\x03a\xffb"  # comm: a, 0xff, b
    tc = criu.decode_message(criu.TaskCoreEntry, payload)
    assert criu.task_comm(tc) == "a\udcffb"


def test_every_truncation_is_refused_or_a_clean_prefix():
    for name, data in sample_images().items():
        full = criu.decode_image(data)
        for cut in range(len(data)):
            try:
                partial = criu.decode_image(data[:cut])
            except criu.CriuImageError:
                continue
            # cutting exactly at an entry boundary yields the leading entries, nothing else
            assert partial.entries == full.entries[: len(partial.entries)], (name, cut)


def test_random_corruption_only_ever_raises_criu_image_error():
    rng = random.Random(20260101)
    images = list(sample_images().values())
    for _ in range(3000):
        data = bytearray(rng.choice(images))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            data += rng.randbytes(rng.randint(1, 40))
        try:
            criu.decode_image(bytes(data))
        except criu.CriuImageError:
            pass


def test_read_image_file_refuses_oversized(tmp_path: Path):
    big = tmp_path / "pagemap-1.img"
    big.write_bytes(bytes(2048))
    with pytest.raises(criu.CriuImageError, match="larger than the 1024-byte limit"):
        criu.read_image_file(big, max_bytes=1024)
    assert criu.read_image_file(big, max_bytes=2048) == bytes(2048)
