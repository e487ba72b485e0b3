"""``backupd list`` over more archives than one page: everything streamed in catalog pages by
default, ``--limit``/``--after`` for one page at a time, and a bad cursor refused up front."""

from __future__ import annotations

import json
from pathlib import Path

from backupd.catalog.store import Catalog
from tests.test_catalog_pages import fill
from tests.test_cli import backupd, cfg  # noqa: F401 - the fixture


def test_list_streams_every_page_and_pages_with_limit_and_after(cfg: Path, tmp_path: Path) -> None:  # noqa: F811
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.upgrade()
    ids = fill(catalog, [i // 3 for i in range(2500)])  # three archives a minute: ties on every page edge
    catalog.close()

    everything = json.loads(backupd(cfg, "list", "-o", "json").stdout)  # 3 catalog pages, one document
    assert [a["id"] for a in everything] == ids and everything[0]["checkpoint_time"] == "2026-03-01T12:00:00Z"
    table = backupd(cfg, "list").stdout.splitlines()
    assert table[0].split()[:2] == ["ID", "TIME"] and [line.split()[0] for line in table[1:]] == ids

    seen, after, pages = [], None, 0
    while True:
        proc = backupd(cfg, "list", "--limit", "1000", "-o", "json", *(["--after", after] if after else []))
        page = json.loads(proc.stdout)
        seen += [a["id"] for a in page]
        pages += 1
        if not proc.stderr:
            break
        assert proc.stderr.startswith("more archives follow: --after ")
        after = proc.stderr.split("--after ")[1].strip()
        assert after == f"{page[-1]['checkpoint_time']}/{page[-1]['id']}"  # what a script can build itself
    assert seen == ids and pages == 3

    last = backupd(cfg, "list", "--limit", "2", "--after", f"{everything[-3]['checkpoint_time']}/{ids[-3]}")
    assert [line.split()[0] for line in last.stdout.splitlines()[1:]] == ids[-2:] and last.stderr == ""

    bad = backupd(cfg, "list", "--after", "yesterday", check=2)
    assert "--after: 'yesterday' is not a page cursor" in bad.stderr and "Traceback" not in bad.stderr
    assert "--limit" in backupd(cfg, "list", "--limit", "0", check=2).stderr
