"""The catalog's packs of the deduplicated format: the chunk -> pack map writers ask, the
packs each archive uses, and the states garbage collection moves packs through -- on SQLite
and PostgreSQL."""

from __future__ import annotations

import zlib
from datetime import timedelta

import pytest
from sqlalchemy import text

from backupd.catalog.store import PACK_STORED, PACK_UNUSED, Catalog
from backupd.errors import IntegrityError
from backupd.model import COMMITTED, PENDING
from tests.test_catalog import T0, make_archive


def chunk(n: int) -> bytes:
    return n.to_bytes(32, "big")


def record(catalog: Catalog, pack: str, chunks: list[int], *, backend: str = "local", age: timedelta = timedelta(0)) \
        -> None:
    catalog.record_pack(backend, pack * 64, f"dedup/packs/{pack * 2}/{pack * 64}.pack", stored_size=100,
                        raw_size=400, chunk_ids=[chunk(c) for c in chunks], created_at=T0 - age)


def test_known_answers_stored_packs_of_the_backend_only(catalog: Catalog) -> None:
    record(catalog, "a", [1, 2, 3])
    record(catalog, "b", [3, 4], backend="other")
    assert catalog.known_chunks("local", [chunk(1), chunk(3), chunk(4), chunk(9)]) == {
        chunk(1): "a" * 64, chunk(3): "a" * 64}
    record(catalog, "a", [1, 2, 3])  # the same pack again (same name, same bytes): no change
    assert [p.chunk_count for p in catalog.list_packs("local")] == [3]
    assert catalog.locate_chunks("other", [chunk(4)]) == {chunk(4): f"dedup/packs/bb/{'b' * 64}.pack"}


def test_gc_states_and_the_commit_that_takes_a_pack_back(catalog: Catalog) -> None:
    record(catalog, "a", [1, 2], age=timedelta(hours=10))
    record(catalog, "c", [5], age=timedelta(hours=10))
    record(catalog, "d", [6])  # young: a writer may be about to use it
    catalog.add_archive(make_archive(1, state=PENDING, key="default/deployment-web/nginx/1.recipe"))
    marked = catalog.mark_unused_packs("local", created_before=T0 - timedelta(hours=6), now=T0)
    assert sorted(p.pack_id[0] for p in marked) == ["a", "c"]
    assert catalog.known_chunks("local", [chunk(1), chunk(5), chunk(6)]) == {chunk(6): "d" * 64}
    # a writer that was told about chunk 1 before the mark commits: pack a is used again
    archive = catalog.commit_dedup_archive(make_archive(1).id, "local", ["a" * 64, "d" * 64], expect_state=PENDING,
                                           state=COMMITTED, tar_size=5)
    assert archive.state == COMMITTED and archive.tar_size == 5
    states = {p.pack_id[0]: (p.state, p.archives) for p in catalog.list_packs("local")}
    assert states == {"a": (PACK_STORED, 1), "c": (PACK_UNUSED, 0), "d": (PACK_STORED, 1)}
    doomed = catalog.doom_unused_packs("local", marked_before=T0 + timedelta(hours=7))
    assert [p.pack_id[0] for p in doomed] == ["c"]
    # a commit that counted on a doomed pack is refused, and changes nothing
    catalog.add_archive(make_archive(2, state=PENDING, key="default/deployment-web/nginx/2.recipe"))
    with pytest.raises(IntegrityError, match="being deleted"):
        catalog.commit_dedup_archive(make_archive(2).id, "local", ["c" * 64, "d" * 64], expect_state=PENDING,
                                     state=COMMITTED)
    with pytest.raises(IntegrityError, match="not in the catalog"):
        catalog.commit_dedup_archive(make_archive(2).id, "local", ["e" * 64], expect_state=PENDING, state=COMMITTED)
    assert catalog.get_archive(make_archive(2).id).state == PENDING
    catalog.drop_pack_rows("local", ["c" * 64, "a" * 64])  # only deleting rows go
    assert {p.pack_id[0]: p.state for p in catalog.list_packs("local")} == {"a": PACK_STORED, "d": PACK_STORED}
    assert catalog.locate_chunks("local", [chunk(5)]) == {}
    # deleting the archive row frees its packs for the next collection
    catalog.delete_archive_rows([make_archive(1).id])
    assert {p.pack_id[0]: p.archives for p in catalog.list_packs("local")} == {"a": 0, "d": 0}


# -- chunk liveness: which chunks of a pack each archive uses, and the repack's swap -------------


def test_liveness_bitmaps_encode_decode_and_union() -> None:
    from backupd.catalog import liveness

    for chosen in ([], [0], [7, 8], [1, 5000], list(range(4096)), list(range(0, 9000, 3))):
        mask = liveness.mask_of(chosen)
        assert list(liveness.positions(mask)) == sorted(chosen)
        assert liveness.decode(liveness.encode(mask), 10_000) == mask
    assert liveness.decode(None, 5) == 0b11111  # unknown: every chunk
    assert liveness.decode(liveness.encode(0b1111_0000), 6) == 0b11_0000  # cut to the pack's chunks
    assert len(liveness.encode(liveness.full(5000))) < 40  # a pack's every chunk: a few bytes
    a, b = liveness.encode(liveness.mask_of([0, 2])), liveness.encode(liveness.mask_of([2, 3]))
    assert liveness.union([a, b], 8) == 0b1101
    assert liveness.union([a, None], 8) == 0xFF
    bits = bytearray()
    for n in (3, 17, 3):
        liveness.add(bits, n)
    assert int.from_bytes(bits, "little") == (1 << 3) | (1 << 17)
    for bad in (b"", b"\x02abc", b"\x01not zlib", liveness.VERSION + zlib.compress(bytes(liveness.MAX_POSITIONS))):
        with pytest.raises(IntegrityError):
            liveness.decode(bad, 8)


def commit(catalog: Catalog, n: int, packs: dict[str, list[int] | None]) -> str:
    """Archive ``n`` committed, using the chunks at these positions of each pack (None: unknown)."""
    from backupd.catalog import liveness

    archive = make_archive(n, state=PENDING, key=f"default/deployment-web/nginx/{n}.recipe")
    catalog.add_archive(archive)
    used = {p * 64: liveness.mask_of(seqs) for p, seqs in packs.items() if seqs is not None}
    catalog.commit_dedup_archive(archive.id, "local", [p * 64 for p in packs], used=used, expect_state=PENDING,
                                 state=COMMITTED)
    return archive.id


def test_writers_learn_positions_and_the_repack_candidates_follow_them(catalog: Catalog) -> None:
    old = timedelta(hours=10)
    record(catalog, "a", [10, 11, 12, 13, 10], age=old)  # chunk 10 twice: its first place counts
    record(catalog, "b", [20, 21], age=old)
    assert catalog.known_places("local", [chunk(10), chunk(13), chunk(21)]) == {
        chunk(10): ("a" * 64, 0), chunk(13): ("a" * 64, 3), chunk(21): ("b" * 64, 1)}
    first = commit(catalog, 1, {"a": [0, 1], "b": [0, 1]})
    commit(catalog, 2, {"a": [1]})
    cutoff = T0 - timedelta(hours=6)
    # a: chunks 0 and 1 of 5 live (40 %); b: all live
    assert [(p.pack_id[0], mask) for p, mask in catalog.repack_candidates("local", created_before=cutoff,
                                                                           below=0.5)] == [("a", 0b11)]
    assert catalog.repack_candidates("local", created_before=cutoff, below=0.4) == []
    assert catalog.repack_candidates("local", created_before=T0 - timedelta(hours=11), below=1) == []  # young
    catalog.delete_archive_rows([first])
    assert [(p.pack_id[0], mask, p.archives) for p, mask in catalog.repack_candidates(
        "local", created_before=cutoff, below=0.5)] == [("a", 0b10, 1)]  # b: no archive, the mark's
    commit(catalog, 3, {"a": None})  # unknown (reconciled, rebuilt): every chunk counts
    assert catalog.repack_candidates("local", created_before=cutoff, below=1) == []


def test_the_repack_swap_moves_archives_to_the_new_packs(catalog: Catalog) -> None:
    from backupd.catalog import liveness

    old = timedelta(hours=10)
    record(catalog, "a", [1, 2, 3, 4], age=old)
    record(catalog, "c", [9], age=old)
    one = commit(catalog, 1, {"a": [0, 3], "c": [0]})
    two = commit(catalog, 2, {"a": [3]})
    # the live chunks 1 and 4 were copied into the new pack n (after another chunk: positions 1, 2)
    record(catalog, "n", [7, 1, 4])
    moves = {0: ("n" * 64, 1), 3: ("n" * 64, 2)}
    assert catalog.move_repacked("local", "a" * 64, moves, now=T0) is None
    packs = {p.pack_id[0]: p for p in catalog.list_packs("local")}
    assert (packs["a"].state, packs["a"].archives, packs["a"].marked_at) == (PACK_UNUSED, 0, T0)
    assert packs["n"].archives == 2 and packs["c"].archives == 1
    assert catalog.archive_pack_ids(one) == ["c" * 64, "n" * 64] and catalog.archive_pack_ids(two) == ["n" * 64]
    assert [mask for _p, mask in catalog.repack_candidates("local", created_before=T0 + timedelta(hours=1),
                                                           below=1)] == [0b110]  # n: chunk 7 is dead
    assert catalog.known_chunks("local", [chunk(1)]) == {chunk(1): "n" * 64}  # a is no longer offered
    # the swap is done once: the old pack is unused now
    assert "unused" in (catalog.move_repacked("local", "a" * 64, moves, now=T0) or "")
    # a pack repacked into the same bytes (its chunks and nothing else) is not moved into itself
    assert "same pack" in (catalog.move_repacked("local", "n" * 64, {1: ("n" * 64, 1)}, now=T0) or "")
    assert {p.pack_id[0]: (p.state, p.archives) for p in catalog.list_packs("local")}["n"] == (PACK_STORED, 2)
    # the sweep finds it used by no archive a grace later
    assert [p.pack_id[0] for p in catalog.doom_unused_packs("local", marked_before=T0 + timedelta(hours=7))] == ["a"]
    assert liveness.full(3) == 0b111


def test_a_chunk_revived_by_a_commit_keeps_the_old_pack(catalog: Catalog) -> None:
    """The repack read the pack when chunk 2 was dead; a checkpoint committed since uses it: the
    swap refuses and changes nothing (the copies in the new pack are harmless duplicates)."""
    old = timedelta(hours=10)
    record(catalog, "a", [1, 2, 3], age=old)
    commit(catalog, 1, {"a": [0]})
    record(catalog, "n", [1])
    commit(catalog, 2, {"a": [1]})  # the concurrent checkpoint
    why = catalog.move_repacked("local", "a" * 64, {0: ("n" * 64, 0)}, now=T0)
    assert why is not None and "used now" in why
    assert {p.pack_id[0]: (p.state, p.archives) for p in catalog.list_packs("local")} == {
        "a": (PACK_STORED, 2), "n": (PACK_STORED, 0)}
    # after a swap, a writer told about the old pack before it commits: the pack is taken back
    record(catalog, "b", [5, 6], age=old)
    commit(catalog, 3, {"b": [0]})
    record(catalog, "m", [5])
    assert catalog.move_repacked("local", "b" * 64, {0: ("m" * 64, 0)}, now=T0) is None
    commit(catalog, 4, {"b": [1]})
    states = {p.pack_id[0]: (p.state, p.archives) for p in catalog.list_packs("local")}
    assert states["b"] == (PACK_STORED, 1) and states["m"] == (PACK_STORED, 1)
    assert catalog.doom_unused_packs("local", marked_before=T0 + timedelta(hours=7)) == []


def test_rows_from_before_chunk_liveness_count_as_wholly_used(db_url: str) -> None:
    """0005 adds chunks.seq and archive_packs.used as NULL to the rows before it: a writer is
    told "position unknown", and such a pack is never a repack candidate."""
    from alembic import command

    from tests.test_catalog import _migrate

    c = Catalog.open(db_url)
    try:
        _migrate(c, command.upgrade, "0004")
        with c.engine.begin() as conn:
            conn.execute(text("INSERT INTO packs (backend, pack_id, key, stored_size, raw_size, chunk_count, state, "
                              "created_at) VALUES ('local', :p, 'k', 1, 1, 2, 'stored', :t)"),
                         {"p": "a" * 64, "t": T0 - timedelta(days=1)})
            conn.execute(text("INSERT INTO chunks (chunk_id, pack) SELECT :c, id FROM packs"), {"c": chunk(1)})
        c.upgrade()
        archive = commit(c, 1, {"a": [0]})  # a writer that knew the position; another that did not:
        assert c.known_places("local", [chunk(1)]) == {chunk(1): ("a" * 64, None)}
        commit(c, 2, {"a": None})
        assert c.repack_candidates("local", created_before=T0, below=1) == []
        c.delete_archive_rows([archive])
        assert c.repack_candidates("local", created_before=T0, below=1) == []
    finally:
        c.close()
