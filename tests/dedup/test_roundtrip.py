"""Archives through packs and recipes and back, byte for byte, on every backend; corruption
anywhere is an IntegrityError; encryption; real CRIU dumps where criu runs."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
from pathlib import Path

import pytest

from backupd.backends.filesystem import FilesystemBackend
from backupd.backends.memory import MemoryBackend
from backupd.errors import IntegrityError, InvalidInput
from backupd.simulator import criu as real_criu
from backupd.simulator.archive import write_checkpoint_archive
from backupd.simulator.topology import default_topology, materialize
from backupd.storage.dedup import ArchiveReader, ArchiveWriter, ChunkIds, PackStore, restore
from backupd.storage.dedup.pack import list_packs, read_pack_index

from .conftest import Repo

CRIU_REASON = real_criu.criu_unavailable_reason()


def test_checkpoint_archives_round_trip_and_increments_store_only_what_changed(checkpoint_tar):
    repo = Repo(MemoryBackend(), pack_size=256 << 10)
    first = repo.round_trip(checkpoint_tar(0))
    assert first.new_chunks and len(first.packs) > 1
    # the same archive again: nothing new but the recipe
    again = repo.round_trip(checkpoint_tar(0))
    assert again.packs == [] and again.new_chunks == 0
    # the next checkpoint of the container: its memory changed, the rest did not
    second = repo.round_trip(checkpoint_tar(1))
    assert 0 < second.pack_bytes < first.pack_bytes
    # every pack is self-describing: its index names exactly the chunks it was written with
    assert {len(read_pack_index(repo.backend, p.key).order) for p in first.packs} == {p.chunks for p in first.packs}


@pytest.mark.parametrize("options", [{"pages_per_chunk": 2}, {"pages_per_chunk": 8}, {"list_fanout": 0},
                                     {"list_fanout": 1}, {"frame_size": 1}])
def test_other_parameters_round_trip(checkpoint_tar, options):
    repo = Repo(MemoryBackend(), **options)
    repo.round_trip(checkpoint_tar(0))
    repo.round_trip(checkpoint_tar(1))


def test_filesystem_backend(tmp_path: Path, checkpoint_tar):
    backend = FilesystemBackend("fs", tmp_path / "repo")
    repo = Repo(backend)
    repo.round_trip(checkpoint_tar(0))
    repo.round_trip(checkpoint_tar(1))
    packs = list_packs(backend)
    assert packs and all(k.startswith("dedup/packs/") and k.endswith(".pack") for k in packs)
    pack_file = tmp_path / "repo" / packs[0]
    assert pack_file.read_bytes().startswith(b"BKDPACK1")
    assert hashlib.sha256(pack_file.read_bytes()).hexdigest() == Path(packs[0]).stem
    assert oct(pack_file.stat().st_mode & 0o777) == "0o600"


def test_s3_backend(make_s3, checkpoint_tar):
    repo = Repo(make_s3(), pack_size=128 << 10)
    first = repo.round_trip(checkpoint_tar(0))
    assert len(first.packs) > 1
    repo.round_trip(checkpoint_tar(1))


def test_a_pack_with_a_flipped_byte_is_caught_by_its_name(checkpoint_tar):
    backend = MemoryBackend()
    repo = Repo(backend)
    key, result = repo.write(checkpoint_tar(0))
    victim = result.packs[0].key
    data = bytearray(backend.read_bytes(victim))
    data[len(data) // 2] ^= 0x01
    backend.corrupt(victim, bytes(data))
    with pytest.raises(IntegrityError, match="content does not match its name"):
        repo.read(key)


def test_a_corrupt_chunk_in_a_well_named_pack_is_caught_by_its_id(tmp_path: Path, checkpoint_tar):
    """A pack rewritten with one chunk's bytes changed, under the name of its new content:
    only the chunk id can tell (a writer bug or a hostile bucket, not a bit flip)."""
    from backupd.storage.dedup import pack as packs

    backend = MemoryBackend()
    repo = Repo(backend)
    key, result = repo.write(checkpoint_tar(0))
    original = packs.PackFile(backend, result.packs[0].key, result.packs[0].pack_id, directory=str(tmp_path))
    builder = packs.PackBuilder()
    for n in range(len(original.index.frames)):
        raw = bytearray(original.frame(n))
        if n == 0:
            raw[5] ^= 0xFF
        entries = [(cid, loc.length) for cid, loc in original.index.chunks.items() if loc.frame == n]
        builder.add_frame(packs.compress_frame(raw), entries)
    original.close()
    pack_id, stored = packs.seal(builder.finish())
    backend.delete(result.packs[0].key)
    backend.put(packs.pack_key(pack_id), io.BytesIO(stored))
    with pytest.raises(IntegrityError, match="is corrupt \\(its id does not match its content\\)"):
        repo.read(key)


def test_a_missing_pack_is_an_integrity_error(checkpoint_tar):
    backend = MemoryBackend()
    repo = Repo(backend)
    key, result = repo.write(checkpoint_tar(0))
    backend.delete(result.packs[-1].key)
    with pytest.raises(IntegrityError, match="is in no pack of backend 'memory'"):
        repo.read(key)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_corrupt_or_truncated_recipe_is_an_integrity_error(checkpoint_tar, where):
    backend = MemoryBackend()
    repo = Repo(backend)
    key, _ = repo.write(checkpoint_tar(0))
    data = bytearray(backend.read_bytes(key))
    if where == "end":
        data = data[:-20]
    else:
        data[10 if where == "start" else len(data) // 2] ^= 0x40
    backend.corrupt(key, bytes(data))
    with pytest.raises(IntegrityError):
        repo.read(key)


def test_the_manifest_digest_is_checked_too(checkpoint_tar):
    repo = Repo(MemoryBackend())
    key, result = repo.write(checkpoint_tar(0))
    with pytest.raises(IntegrityError, match="tar SHA-256 differs from the manifest's"):
        repo.read(key, tar_sha256="0" * 64)
    with pytest.raises(IntegrityError, match=f"tar size {result.tar_size} != 5 \\(manifest\\)"):
        repo.read(key, tar_size=5)


def test_the_reader_never_hands_out_the_last_bytes_of_a_bad_tar(checkpoint_tar):
    repo = Repo(MemoryBackend())
    key, result = repo.write(checkpoint_tar(0))
    store = PackStore(repo.backend)
    reader = ArchiveReader(repo.backend.open(key), store, tar_sha256="f" * 64)
    got = 0
    with pytest.raises(IntegrityError):
        while block := reader.read(1 << 16):
            got += len(block)
    reader.close()
    store.close()
    assert got < result.tar_size


def age_keys() -> tuple[object, object, str]:
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    return identity, identity.to_public(), str(identity)


def test_encrypted_round_trip(checkpoint_tar):
    identity, recipient, _ = age_keys()
    ids = ChunkIds.keyed(os.urandom(32))
    backend = MemoryBackend()
    repo = Repo(backend, ids=ids, recipients=[recipient], identities=[identity])
    repo.round_trip(checkpoint_tar(0))
    key, _ = repo.write(checkpoint_tar(1))
    # packs and recipes are age files; nothing of the tar shows through
    for k in [key, *list_packs(backend)]:
        stored = backend.read_bytes(k, limit=64 << 20)
        assert stored.startswith(b"age-encryption.org/v1\n")
        assert b"checkpoint/pages-" not in stored and b"BKDPACK1" not in stored
    assert repo.read(key) == checkpoint_tar(1)
    # without the identity: a clear usage error, not a corruption report
    with pytest.raises(InvalidInput, match="encrypted with age: give the identity file"):
        Repo(backend, ids=ids).read(key)
    # with another id key: said so
    with pytest.raises(InvalidInput, match="written with another chunk id key"):
        Repo(backend, ids=ChunkIds.keyed(os.urandom(32)), identities=[identity]).read(key)
    # with another identity: age cannot decrypt
    other, _, _ = age_keys()
    with pytest.raises(IntegrityError, match="age could not decrypt it"):
        Repo(backend, ids=ids, identities=[other]).read(key)


def test_encryption_needs_keyed_ids():
    _, recipient, _ = age_keys()
    with pytest.raises(InvalidInput, match="needs keyed chunk ids"):
        ArchiveWriter(MemoryBackend(), known=lambda ids: set(), recipients=[recipient])
    with pytest.raises(InvalidInput, match="must be 32 bytes"):
        ChunkIds.keyed(b"short")
    with pytest.raises(InvalidInput, match="uses 'hmac-sha256' chunk ids"):
        ChunkIds().check_matches("hmac-sha256", "00", "recipe")


def test_memory_does_not_grow_with_the_tar(tmp_path: Path, checkpoint_tar):
    """Python-level peak memory while a 32 MiB and a 160 MiB archive are written: the
    read-ahead pipeline, frames and packs in flight and the recipe spool, not the tar."""
    import tracemalloc

    peaks = []
    for size in (32 << 20, 160 << 20):
        path = tmp_path / "big.tar"
        path.write_bytes(checkpoint_tar(0, memory_bytes=size))
        repo = Repo(MemoryBackend())
        tracemalloc.start()
        try:
            with open(path, "rb") as fh:
                # 1 MiB packs: both tars fill the upload pipeline (uploads + 1 packs in flight)
                result = ArchiveWriter(repo.backend, known=repo.known, pack_size=1 << 20).write(fh, what="big tar")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.tar_size == path.stat().st_size > size
        peaks.append(peak - result.pack_bytes)  # the memory backend keeps every pack: count them out
    assert peaks[1] < peaks[0] + (8 << 20) and peaks[1] < 64 << 20, [p >> 20 for p in peaks]


@pytest.mark.skipif(CRIU_REASON is not None, reason=f"real CRIU unavailable: {CRIU_REASON}")
def test_real_criu_dumps_round_trip(tmp_path: Path):
    pod = next(p for p in materialize(default_topology(), seed=5) if p.containers)
    proc = real_criu.CountingProcess.start(tmp_path / "proc", "counter", ballast_bytes=24 << 20)
    tars = []
    try:
        proc.wait_for_counter(2)
        for i in range(2):
            work = tmp_path / f"dump-{i}"
            real_criu.criu_dump(proc.pid, work, timeout=120)
            buf = io.BytesIO()
            write_checkpoint_archive(buf, pod, pod.containers[0], criu_work_dir=work,
                                     checkpointed_at=dt.datetime(2026, 1, 1, 0, i, tzinfo=dt.UTC))
            tars.append(buf.getvalue())
            proc.wait_for_counter(proc.read_counter() + 2)
    finally:
        proc.stop()
    repo = Repo(FilesystemBackend("fs", tmp_path / "repo"))
    first = repo.round_trip(tars[0])
    second = repo.round_trip(tars[1])
    # the ballast did not change between the dumps: the second stores a small part of the first
    assert second.pack_bytes * 4 < first.pack_bytes


@pytest.mark.parametrize("damage", ["frame offset", "chunk count", "index digest", "magic"])
def test_a_hostile_pack_index_under_a_valid_name_is_refused(tmp_path: Path, damage):
    """Packs are verified by name, but a writer bug or a hostile bucket can name a bad pack
    correctly: the index is checked against the pack's own layout."""
    import struct

    from backupd.storage.dedup import pack as packs

    builder = packs.PackBuilder()
    builder.add_frame(packs.compress_frame(b"a" * 4096 + b"b" * 4096), [(b"A" * 32, 4096), (b"B" * 32, 4096)])
    plain = bytearray(builder.finish())
    footer = packs.FOOTER_SIZE
    index_offset, index_length = struct.unpack_from("<QI", plain, len(plain) - footer)
    index = bytearray(plain[index_offset : index_offset + index_length])
    if damage == "frame offset":
        struct.pack_into("<Q", index, 4, 9)
    elif damage == "chunk count":
        struct.pack_into("<I", index, 4 + 12, 3)
    elif damage == "index digest":  # a changed entry, the digest left as it was
        index[-1] ^= 0x01
    if damage == "magic":
        plain[:8] = b"BKDPACK9"
    else:
        plain[index_offset : index_offset + index_length] = index
    if damage != "index digest":
        plain[len(plain) - footer + 16 : len(plain) - footer + 48] = hashlib.sha256(bytes(index)).digest()
    pack_id, stored = packs.seal(bytes(plain))
    backend = MemoryBackend()
    backend.put(packs.pack_key(pack_id), io.BytesIO(stored))
    with pytest.raises(IntegrityError, match="corrupt pack index|not a pack"):
        packs.PackFile(backend, packs.pack_key(pack_id), pack_id, directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_locate_callback_answers_where_chunks_are(checkpoint_tar):
    """Phase 2's catalog answers locate(chunk id) -> pack key; a wrong answer is caught."""
    backend = MemoryBackend()
    repo = Repo(backend, pack_size=256 << 10)
    key, result = repo.write(checkpoint_tar(0))
    where = {cid: p.key for p in result.packs for cid in read_pack_index(backend, p.key).order}
    store = PackStore(backend, locate=where.get)
    out = io.BytesIO()
    with backend.open(key) as recipe:
        restore(recipe, store, out, tar_sha256=result.tar_sha256)
    store.close()
    assert out.getvalue() == checkpoint_tar(0)
    wrong = PackStore(backend, locate=lambda cid: result.packs[0].key)
    with backend.open(key) as recipe, pytest.raises(IntegrityError, match="does not hold chunk"):
        restore(recipe, wrong, io.BytesIO())
    wrong.close()
