"""Keyset pages of archives and runs, on SQLite and PostgreSQL: pages add up to the whole listing
(ties in time included, rows added between pages), cursors are checked, and PostgreSQL reads a
page from the index instead of sorting the table."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, event, insert, text

from backupd.catalog.schema import ArchiveRow, RunRow
from backupd.catalog.store import Catalog, Cursor
from backupd.errors import InvalidInput
from backupd.model import COMMITTED, FAILED
from tests.test_catalog import T0, make_archive


def fill(catalog: Catalog, minutes: list[int], **kw: object) -> list[str]:
    """Archives at T0 + the given minutes (repeats are ties), ids in insertion order."""
    rows = [replace(make_archive(i, **kw), checkpoint_time=T0 + timedelta(minutes=m), key=f"k/{i}")
            for i, m in enumerate(minutes)]
    if rows:
        with catalog.session() as s:
            s.execute(insert(ArchiveRow), [{f: getattr(a, f) for f in a.__dataclass_fields__} for a in rows])
    return [a.id for a in rows]


def paged(catalog: Catalog, size: int, **filters: object) -> list[str]:
    ids: list[str] = []
    after = None
    while True:
        page, after = catalog.archive_page(limit=size, after=after, **filters)
        assert len(page) <= size
        ids += [a.id for a in page]
        if after is None:
            return ids
        assert page, "a cursor promises another page"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(minutes=st.lists(st.integers(0, 6), max_size=40), size=st.integers(1, 7))
def test_pages_add_up_to_the_whole_listing(catalog: Catalog, minutes: list[int], size: int) -> None:
    with catalog.session() as s:
        s.execute(delete(ArchiveRow))
    fill(catalog, minutes)
    whole = [a.id for a in catalog.list_archives()]
    assert paged(catalog, size) == whole
    assert [a.id for page in catalog.archive_pages(size=size) for a in page] == whole


def test_a_page_knows_whether_another_follows(catalog: Catalog) -> None:
    ids = fill(catalog, [0, 1, 2, 3])
    page, after = catalog.archive_page(limit=4)
    assert [a.id for a in page] == ids and after is None  # exactly full: no empty page promised
    page, after = catalog.archive_page(limit=3)
    assert after == Cursor.of_archive(page[-1]) and str(after) == f"{page[-1].to_json()['checkpoint_time']}/{ids[2]}"
    assert catalog.archive_page(limit=3, after=after)[0][0].id == ids[3]
    assert catalog.archive_page(limit=5) == (catalog.list_archives(), None)


def test_filters_states_and_rows_added_between_pages(catalog: Catalog) -> None:
    ids = fill(catalog, [0, 0, 0, 5, 5, 9])
    catalog.update_archive(ids[1], state=FAILED)
    first, after = catalog.archive_page(limit=2)
    assert [a.id for a in first] == [ids[0], ids[2]]  # failed ones are not listed by default
    # an archive committed meanwhile, older than the cursor, is not repeated nor shifts the rest
    catalog.add_archive(replace(make_archive(90), checkpoint_time=T0, key="k/late", id="0" * 15))
    rest = [a.id for page in catalog.archive_pages(size=2, after=after) for a in page]
    assert rest == [ids[3], ids[4], ids[5]]
    everything = paged(catalog, 2, states=(COMMITTED, FAILED))
    assert everything == ["0" * 15, ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]]
    assert paged(catalog, 1, namespace="nowhere") == []


def test_run_pages_are_newest_first(catalog: Catalog) -> None:
    for _ in range(5):
        run_id = catalog.start_run("checkpoint", policy="web", node="n")
        catalog.finish_run(run_id, "succeeded")
    with catalog.session() as s:  # two runs started at the same moment: the id breaks the tie
        s.execute(RunRow.__table__.update().values(started_at=T0).where(RunRow.id.in_([2, 3])))
    newest_first = [r.id for r in catalog.list_runs(limit=10)]
    pages, after = [], None
    while True:
        page = catalog.list_runs(limit=2, after=after)
        pages += [r.id for r in page]
        if len(page) < 2:
            break
        after = Cursor.of_run(page[-1])
    assert pages == newest_first and newest_first[-2:] == [3, 2]


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-03-01T12:00:00/", "2026-03-01T12:00:00/abc",
                                 "2026-13-01T12:00:00Z/abc", "/abc", "2026-03-01T12:00:00Z/" + "a" * 40,
                                 "0001-01-01T00:00:00+01:00/abc", "2026-03-01/abc"])
def test_bad_cursors_are_invalid_input_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidInput, match="^--after: .*is not a page cursor"):
        Cursor.parse(bad, "--after")


def test_run_cursors_need_a_numeric_id() -> None:
    assert Cursor.parse("2026-03-01T12:00:00Z/17", "after", numeric_id=True).id == "17"
    with pytest.raises(InvalidInput, match="^after: "):
        Cursor.parse("2026-03-01T12:00:00Z/0a", "after", numeric_id=True)


def test_cursor_times_keep_their_microseconds_and_zone() -> None:
    cursor = Cursor.parse("2026-03-01T13:00:00.000250+01:00/ab", "after")
    assert cursor.time == T0 + timedelta(microseconds=250) and str(cursor) == "2026-03-01T12:00:00.000250Z/ab"


def test_postgresql_reads_a_page_from_the_index(pg_url: str) -> None:
    """EXPLAIN of the very statements a page sends (captured from the engine): an index scan
    in listing order, no sort of the table."""
    catalog = Catalog.open(pg_url)
    try:
        catalog.upgrade()
        fill(catalog, list(range(20_000)))
        with catalog.session() as s:
            s.execute(insert(RunRow), [{"kind": "checkpoint", "policy": "web", "node": "n", "outcome": "succeeded",
                                        "started_at": T0 + timedelta(seconds=i), "bytes_in": 0, "bytes_out": 0}
                                       for i in range(20_000)])
            s.execute(text("ANALYZE archives"))
            s.execute(text("ANALYZE runs"))
        sent: list[tuple[str, object]] = []

        def capture(_conn, _cursor, statement, parameters, _context, _many) -> None:  # type: ignore[no-untyped-def]
            sent.append((statement, parameters))

        first_archive = Cursor.of_archive(catalog.list_archives(limit=1)[0])
        first_run = Cursor.of_run(catalog.list_runs(limit=1)[0])
        event.listen(catalog.engine, "before_cursor_execute", capture)
        page, after = catalog.archive_page(limit=50, after=first_archive)
        (archive_query,) = sent
        sent.clear()
        runs = catalog.list_runs(limit=50, after=first_run)
        (run_query,) = sent
        event.remove(catalog.engine, "before_cursor_execute", capture)
        assert len(page) == 50 and after is not None and len(runs) == 50

        plans = []
        with catalog.engine.connect() as conn:
            for statement, parameters in (archive_query, run_query):
                cursor = conn.connection.cursor()
                cursor.execute("EXPLAIN " + statement, parameters)
                plans.append("\n".join(row[0] for row in cursor.fetchall()))
        archive_plan, run_plan = plans
        assert "ix_archives_checkpoint_time_id" in archive_plan and "Sort" not in archive_plan, archive_plan
        assert "ix_runs_started_at_id" in run_plan and "Sort" not in run_plan, run_plan
    finally:
        catalog.close()
