"""The catalog's packs of the deduplicated format: the chunk -> pack map writers ask, the
packs each archive uses, and the states garbage collection moves packs through -- on SQLite
and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

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
