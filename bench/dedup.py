"""The deduplicated format on real CRIU dumps: bytes stored per checkpoint and ship time,
each against a baseline measured in the same run.

    python -m bench.dedup [--size MiB] [--dumps N] [--workdir DIR] [--quick] [--catalog-url URL]

Needs real CRIU (root, criu >= 4 on PATH or in /opt/checkpoint-tools/bin). Two workloads of
:mod:`bench.criu_workload` (a Python process holding ``--size`` MiB of records that rewrites
2 % of them between dumps: ``scattered`` and ``contiguous``), ``--dumps`` dumps each. For
every dump:

* baselines: the whole tar through zstd -3 (what ``format = "full"`` stores), and zstd -3 of
  only the pages whose content is in no earlier dump (``changed``), as one stream;
* the dedup format with 1, 2, 4, 8 and 16 pages per chunk (and a few frame sizes and list
  fanouts at 1 page): new pack bytes, of which index, plus recipe = uploaded; the ratio
  ``uploaded / changed`` (the target is <= 1.3 for every dump after the first);
* every dump through the daemon's commit path (:func:`daemon_path`: a SQLite catalog answers
  ``known()``): seconds and bytes stored against the full format, dump by dump;
* ship time of the first dump to a filesystem backend: ``transfer.PackingReader`` (the full
  format) against :class:`~backupd.storage.dedup.ArchiveWriter`, alternating, five of each (median,
  best, CPU seconds), the same age-encrypted, and a verified restore of each.

``--quick`` measures the defaults only (each dump on its row, and the ship times). Dumps are
cached in ``--workdir`` between runs. Prints a table and writes ``bench/results/dedup.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from backupd.backends.filesystem import FilesystemBackend
from backupd.backends.memory import MemoryBackend
from backupd.storage.dedup import ArchiveWriter, ChunkIds, PackStore, restore
from backupd.storage.dedup.pack import read_pack_index
from backupd.storage.transfer import PackingReader
from bench.criu_workload import MiB, criu_dumps
from bench.report import Row, report

PAGES = re.compile(r"(\./)?checkpoint/pages-\d+\.img")


def baselines(tars: list[Path]) -> list[dict[str, int]]:
    """Per dump: tar size, zstd -3 of the whole tar, zstd -3 of its pages new to the series."""
    seen: set[bytes] = set()
    out = []
    for tar in tars:
        with open(tar, "rb") as fh:
            full = PackingReader(fh)
            while full.read(8 * MiB):
                pass
        new = bytearray()
        pages = fresh = 0
        with tarfile.open(tar) as t:
            for m in t:
                if not PAGES.fullmatch(m.name):
                    continue
                data = t.extractfile(m).read()  # type: ignore[union-attr]
                for i in range(0, len(data), 4096):
                    page = data[i : i + 4096]
                    h = hashlib.sha256(page).digest()
                    pages += 1
                    if h not in seen:
                        seen.add(h)
                        new += page
                        fresh += 1
        changed = len(zstandard.ZstdCompressor(level=3).compress(bytes(new))) if new else 0
        out.append({"tar": tar.stat().st_size, "full": full.stored_size, "changed": changed, "pages": pages,
                    "new_pages": fresh})
    return out


def series(tars: list[Path], **options: object) -> list[dict[str, float]]:
    """Write every dump in turn to one repository (in memory); what each one added."""
    backend = MemoryBackend()
    stored: set[bytes] = set()
    rows = []
    for tar in tars:
        writer = ArchiveWriter(backend, known=lambda ids: {i for i in ids if i in stored}, **options)  # type: ignore[arg-type]
        started = time.perf_counter()
        with open(tar, "rb") as fh:
            result = writer.write(fh, what=tar.name, total_size=tar.stat().st_size)
        seconds = time.perf_counter() - started
        for p in result.packs:
            stored.update(read_pack_index(backend, p.key).order)
        rows.append({"packs": result.pack_bytes, "index": result.index_bytes, "recipe": result.recipe_size,
                     "uploaded": result.uploaded_bytes, "new_chunks": result.new_chunks, "refs": result.chunk_refs,
                     "seconds": seconds})
        result.recipe.close()
    return rows


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of ``fn()``."""
    cpu, started = os.times(), time.perf_counter()
    fn()
    after = os.times()
    return time.perf_counter() - started, (after.user + after.system) - (cpu.user + cpu.system)


def ship_times(tar: Path, work: Path, rounds: int = 5) -> dict[str, float]:
    """First dump to a filesystem backend: the full format's PackingReader against the dedup
    writer (packs plus recipe), alternating, ``rounds`` of each (the machine is shared: the
    median and the CPU seconds say more than one run); then the same age-encrypted, and a
    verified restore of each."""
    from backupd.storage.transfer import UnpackingReader

    with open(tar, "rb") as fh:
        while fh.read(16 * MiB):
            pass
    recipients = [__import__("pyrage").x25519.Identity.generate().to_public()]
    backend = FilesystemBackend("bench", work / "ship")

    def full(encrypted: bool = False) -> None:
        with open(tar, "rb") as fh:
            backend.put("full/archive.tar.zst", PackingReader(fh, recipients=recipients if encrypted else ()))

    def dedup(encrypted: bool = False) -> None:
        keyed = {"ids": ChunkIds.keyed(os.urandom(32)), "recipients": recipients} if encrypted else {}
        with open(tar, "rb") as fh:
            result = ArchiveWriter(backend, known=lambda ids: set(), **keyed).write(  # type: ignore[arg-type]
                fh, what=tar.name, total_size=tar.stat().st_size)
        backend.put("dedup/recipes/archive.recipe", result.recipe)
        result.recipe.close()

    times: dict[str, list[tuple[float, float]]] = {"full": [], "dedup": [], "full_age": [], "dedup_age": []}
    for i in range(rounds):
        order = ["full", "dedup"] if i % 2 == 0 else ["dedup", "full"]
        if i < 2:
            order += ["full_age", "dedup_age"]
        for name in order:
            shutil.rmtree(work / "ship", ignore_errors=True)
            backend = FilesystemBackend("bench", work / "ship")
            kind, _, age = name.partition("_")
            times[name].append(_timed(lambda kind=kind, age=age: (full if kind == "full" else dedup)(bool(age))))
    # a verified restore of each (written once more, unencrypted, side by side)
    shutil.rmtree(work / "ship", ignore_errors=True)
    backend = FilesystemBackend("bench", work / "ship")
    full()
    dedup()
    reader_sha = ""

    def full_restore() -> None:
        nonlocal reader_sha
        with backend.open("full/archive.tar.zst") as stored:
            reader = UnpackingReader(stored, what="full", tar_sha256=None, stored_sha256=None)
            while reader.read(8 * MiB):
                pass
            reader_sha = reader.tar_sha256

    def dedup_restore() -> None:
        store = PackStore(backend, spool_dir=str(work))
        with backend.open("dedup/recipes/archive.recipe") as recipe, open(os.devnull, "wb") as sink:
            restore(recipe, store, sink, tar_sha256=reader_sha)
        store.close()

    out = {f"{name} {stat}": value for name, runs in times.items() for stat, value in (
        ("wall", statistics.median(w for w, _ in runs)), ("best", min(w for w, _ in runs)),
        ("cpu", statistics.median(c for _, c in runs)))}
    out["full restore"] = _timed(full_restore)[0]
    out["dedup restore"] = _timed(dedup_restore)[0]
    shutil.rmtree(work / "ship", ignore_errors=True)
    return out


def daemon_path(tars: list[Path], work: Path, catalog_url: str | None = None) -> list[dict[str, float]]:
    """Every dump in turn through what the daemon runs: the full format (``PackingReader`` with
    the daemon's compression settings, put to a filesystem backend) and the dedup commit path
    (:func:`backupd.storage.dedup.commit.ship`: ``known()`` answered by a SQLite catalog, each
    pack recorded as its put returns, reused packs checked, then the recipe), alternating which
    goes first. Per dump: seconds and bytes stored by each. ``catalog_url``: a PostgreSQL
    database to use instead (in a schema of its own, dropped afterwards)."""
    from backupd.catalog.store import Catalog
    from backupd.storage.dedup.commit import ship

    shutil.rmtree(work / "daemon", ignore_errors=True)
    (work / "daemon").mkdir(parents=True)
    backend = FilesystemBackend("bench", work / "daemon" / "backend")
    schema = f"bench_dedup_{os.getpid()}"
    if catalog_url:
        import sqlalchemy

        admin = sqlalchemy.create_engine(catalog_url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        catalog = Catalog.open(f"{catalog_url}{'&' if '?' in catalog_url else '?'}options=-csearch_path%3D{schema}")
    else:
        catalog = Catalog.open(f"sqlite:///{work / 'daemon' / 'catalog.db'}")
    rows = []
    try:
        catalog.upgrade()
        for i, tar in enumerate(tars):
            with open(tar, "rb") as fh:  # into the page cache: both read it warm
                while fh.read(16 * MiB):
                    pass
            full_size = 0
            shipped = None

            def full(i: int = i, tar: Path = tar) -> None:
                nonlocal full_size
                with open(tar, "rb") as fh:
                    reader = PackingReader(fh)
                    backend.put(f"full/dump-{i}.tar.zst", reader)
                full_size = reader.stored_size

            def dedup(i: int = i, tar: Path = tar) -> None:
                nonlocal shipped
                with open(tar, "rb") as fh:
                    shipped = ship(backend, catalog, fh, f"dedup/recipes/dump-{i}.recipe", ids=ChunkIds(),
                                   what=tar.name)

            timed = {}
            for name in (("full", "dedup") if i % 2 == 0 else ("dedup", "full")):
                timed[name] = _timed(full if name == "full" else dedup)
            assert shipped is not None
            rows.append({"full s": timed["full"][0], "dedup s": timed["dedup"][0], "full cpu": timed["full"][1],
                         "dedup cpu": timed["dedup"][1], "full bytes": full_size, "dedup bytes": shipped.new_bytes})
    finally:
        catalog.close()
        shutil.rmtree(work / "daemon", ignore_errors=True)
        if catalog_url:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()
    return rows


CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("1 page/chunk (default: 512 KiB frames, list fanout 64)", {}),
    ("2 pages/chunk", {"pages_per_chunk": 2}),
    ("4 pages/chunk", {"pages_per_chunk": 4}),
    ("8 pages/chunk", {"pages_per_chunk": 8}),
    ("16 pages/chunk", {"pages_per_chunk": 16}),
    ("2 pages/chunk, fixed groups", {"pages_per_chunk": 2, "grouping": "fixed"}),
    ("1 page, frames of 1 chunk", {"frame_size": 1}),
    ("1 page, 128 KiB frames", {"frame_size": 128 << 10}),
    ("1 page, 2 MiB frames", {"frame_size": 2 << 20}),
    ("1 page, list fanout 16", {"list_fanout": 16}),
    ("1 page, list fanout 256", {"list_fanout": 256}),
    ("1 page, no lists (page ids in the recipe)", {"list_fanout": 0}),
]


def run(work: Path, size: int, dumps: int, quick: bool, catalog_url: str | None = None) -> list[Row]:
    rows: list[Row] = []
    configs = CONFIGS[:1] if quick else CONFIGS
    for mode in ("scattered", "contiguous"):
        print(f"dumping {mode} ...", file=sys.stderr, flush=True)
        tars = criu_dumps(work, mode, size=size, dumps=dumps)
        base = baselines(tars)
        increments = base[1:]
        changed = sum(b["changed"] for b in increments)
        full = sum(b["full"] for b in increments)
        rows.append({"workload": mode, "case": "baseline: zstd -3 of the whole tar (format=full)",
                     "first MiB": round(base[0]["full"] / MiB, 1),
                     "per increment MiB": round(full / len(increments) / MiB, 2),
                     "x changed": round(full / changed, 2)})
        rows.append({"workload": mode, "case": "baseline: zstd -3 of the changed pages only",
                     "first MiB": round(base[0]["full"] / MiB, 1),
                     "per increment MiB": round(changed / len(increments) / MiB, 2), "x changed": 1.0,
                     "note": "new pages/dump: " + ", ".join(f"{b['new_pages'] / b['pages']:.1%}" for b in increments)})
        for name, options in configs:
            print(f"  {mode}: {name}", file=sys.stderr, flush=True)
            s = series(tars, **options)
            inc = s[1:]
            uploaded = sum(r["uploaded"] for r in inc)
            worst = max(r["uploaded"] / b["changed"] for r, b in zip(inc, increments, strict=True))
            rows.append({
                "workload": mode, "case": f"dedup, {name}",
                "first MiB": round(s[0]["uploaded"] / MiB, 1),
                "first x full": round(s[0]["uploaded"] / base[0]["full"], 3),
                "per increment MiB": round(uploaded / len(inc) / MiB, 2),
                "x changed": round(uploaded / changed, 2), "worst x changed": round(worst, 2),
                "recipe KiB": round(sum(r["recipe"] for r in inc) / len(inc) / 1024),
                "index KiB": round(sum(r["index"] for r in inc) / len(inc) / 1024),
                "s/increment": round(sum(r["seconds"] for r in inc) / len(inc), 2),
            })
            if not options:  # the default: each dump on its own row too
                for i, (r, b) in enumerate(zip(s, base, strict=True)):
                    rows.append({"workload": mode, "case": f"  dump {i}: {b['tar'] / MiB:.0f} MiB tar, "
                                 f"{b['new_pages'] / b['pages']:.1%} pages new",
                                 "per increment MiB": round(r["uploaded"] / MiB, 2),
                                 "x changed": round(r["uploaded"] / b["changed"], 2) if i else "",
                                 "first x full": round(r["uploaded"] / b["full"], 3) if i == 0 else "",
                                 "recipe KiB": round(r["recipe"] / 1024), "index KiB": round(r["index"] / 1024),
                                 "note": f"full {b['full'] / MiB:.2f} MiB, changed {b['changed'] / MiB:.2f} MiB"})
        if mode == "scattered":
            print("  ship times ...", file=sys.stderr, flush=True)
            t = ship_times(tars[0], work)
            for suffix, label in (("", ""), ("_age", ", age-encrypted (dedup: keyed ids)")):
                rows.append({"workload": mode,
                             "case": f"ship first dump ({base[0]['tar'] / MiB:.0f} MiB) to filesystem{label}",
                             "full s": round(t[f"full{suffix} wall"], 2), "dedup s": round(t[f"dedup{suffix} wall"], 2),
                             "dedup x full": round(t[f"dedup{suffix} wall"] / t[f"full{suffix} wall"], 2),
                             "note": f"median of {5 if not suffix else 2}; best {t[f'full{suffix} best']:.2f} / "
                                     f"{t[f'dedup{suffix} best']:.2f} s; CPU s {t[f'full{suffix} cpu']:.2f} / "
                                     f"{t[f'dedup{suffix} cpu']:.2f}"})
            rows.append({"workload": mode, "case": "restore it, verified (to /dev/null)",
                         "full s": round(t["full restore"], 2), "dedup s": round(t["dedup restore"], 2),
                         "dedup x full": round(t["dedup restore"] / t["full restore"], 2)})
        print(f"  {mode}: the daemon's commit path ...", file=sys.stderr, flush=True)
        db = "PostgreSQL" if catalog_url else "SQLite"
        for i, (d, b) in enumerate(zip(daemon_path(tars, work, catalog_url), base, strict=True)):
            rows.append({"workload": mode,
                         "case": f"daemon path ({db}), dump {i} ({'first' if not i else 'increment'})",
                         "full s": round(d["full s"], 2), "dedup s": round(d["dedup s"], 2),
                         "dedup x full": round(d["dedup s"] / d["full s"], 2),
                         "per increment MiB": round(d["dedup bytes"] / MiB, 2),
                         "x changed": round(d["dedup bytes"] / b["changed"], 2) if i else "",
                         "first x full": round(d["dedup bytes"] / d["full bytes"], 3) if not i else "",
                         "note": f"full {d['full bytes'] / MiB:.2f} MiB; CPU s {d['full cpu']:.2f} / "
                                 f"{d['dedup cpu']:.2f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dedup")
    ap.add_argument("--size", type=int, default=340, help="MiB of records the workload process holds")
    ap.add_argument("--dumps", type=int, default=6)
    ap.add_argument("--workdir", type=Path, help="where dumps are cached (default: a temp dir, removed)")
    ap.add_argument("--quick", action="store_true", help="the default parameters only (no comparisons)")
    ap.add_argument("--catalog-url", help="the daemon path's catalog on this PostgreSQL database (default: SQLite)")
    args = ap.parse_args()
    os.environ["PATH"] = f"{os.environ.get('PATH', '')}:/opt/checkpoint-tools/bin"
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = run(args.workdir, args.size * MiB, args.dumps, args.quick, args.catalog_url)
    else:
        with tempfile.TemporaryDirectory(prefix="backupd-bench-dedup-") as tmp:
            rows = run(Path(tmp), args.size * MiB, args.dumps, args.quick, args.catalog_url)
    report(rows, "dedup", size_mib=args.size, dumps=args.dumps)

if __name__ == "__main__":
    main()
