"""``format = "dedup"`` wired into backupd: the commit protocol, reading back, verify, rebuild,
delete, on the node simulator with a real catalog (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from backupd.app import App
from backupd.model import COMMITTED
from backupd.report.html import render_html
from backupd.report.render import render_table
from backupd.simulator.server import NodeSimulator
from backupd.storage import layout
from backupd.storage.verify import verify
from tests import policies
from tests.dedup.conftest import dedup_app, encrypted_dedup_app, read_all


def test_dedup_archives_restore_the_byte_identical_tar(app: App, sim: NodeSimulator) -> None:
    backend = app.backends["local"]
    policy = policies.apply(app, policies.web_policy(keep_on_node=5))
    first = app.runner.cycle(policy)
    second = app.runner.cycle(policy)
    assert not first.failed and not second.failed
    archives = app.catalog.list_archives(policy="web")
    assert len(archives) == 4
    for a in archives:
        assert a.state == COMMITTED and a.key.endswith(".recipe")
        node_tar = (sim.checkpoint_dir / a.node_path).read_bytes()
        assert read_all(app, a) == node_tar
        assert hashlib.sha256(node_tar).hexdigest() == a.tar_sha256
        manifest = json.loads(backend.read_bytes(layout.manifest_key(a.key)))
        assert manifest["format"] == "dedup" and manifest["packs"]
        recipe = backend.read_bytes(a.key)
        assert manifest["stored_sha256"] == hashlib.sha256(recipe).hexdigest() == a.stored_sha256
        assert manifest["recipe_size"] == len(recipe)
    packs = app.catalog.list_packs("local")
    assert packs and all(p.state == "stored" for p in packs)
    # stored_size: what each archive added (its new packs and its recipe), the packs counted once
    assert sum(a.stored_size or 0 for a in archives) == sum(p.stored_size for p in packs) + sum(
        len(backend.read_bytes(a.key)) for a in archives)
    assert {p.key for p in packs} == {o.key for o in backend.list("dedup/packs/")}
    report = verify(app.catalog, app.backends, archives, structure=True)
    assert report.clean, report.to_json()


def test_encrypted_dedup_backend(tmp_path: Path, sim: NodeSimulator) -> None:
    """age-encrypted packs and recipes, keyed chunk ids; the id key travels in the backend,
    encrypted to the recipients, so a restore needs only the age identity."""
    app, ident = encrypted_dedup_app(tmp_path, sim)
    try:
        policy = policies.apply(app, policies.web_policy(keep_on_node=5))
        assert not app.runner.cycle(policy).failed
        archives = app.catalog.list_archives()
        keys = list((tmp_path / "backend" / "dedup" / "keys").iterdir())
        assert len(keys) == 1 and b"5a5a" not in keys[0].read_bytes()
        for a in archives:
            assert a.key.endswith(".recipe.age") and a.encryption == "age"
            stored = (tmp_path / "backend" / a.key).read_bytes()
            assert stored.startswith(b"age-encryption.org/v1")
            assert read_all(app, a, [ident]) == (sim.checkpoint_dir / a.node_path).read_bytes()
        for pack in (tmp_path / "backend" / "dedup" / "packs").rglob("*.pack"):
            assert pack.read_bytes().startswith(b"age-encryption.org/v1")
        blind = verify(app.catalog, app.backends, archives)
        assert blind.clean and all("recipe and packs verified" in f.detail for f in blind.findings)
        assert verify(app.catalog, app.backends, archives, structure=True, identities=[ident]).clean
        # a flipped byte in a pack: found by its name without the identity, by the tar with it
        pack = next((tmp_path / "backend" / "dedup" / "packs").rglob("*.pack"))
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 1
        pack.chmod(0o600)
        pack.write_bytes(bytes(data))
        assert not verify(app.catalog, app.backends, archives).clean
        assert not verify(app.catalog, app.backends, archives, identities=[ident]).clean
    finally:
        app.close()


def test_catalog_rebuild_from_manifests_and_pack_indexes(app: App, sim: NodeSimulator, tmp_path: Path,
                                                        kind: dict[str, object]) -> None:
    from backupd.storage.rebuild import rebuild

    policy = policies.apply(app, policies.web_policy(keep_on_node=5))
    assert not app.runner.cycle(policy).failed
    before = {p.pack_id: p.chunk_count for p in app.catalog.list_packs("local")}
    lost = dedup_app(tmp_path, sim, f"sqlite:///{tmp_path / 'rebuilt.db'}", **kind)
    try:
        report = rebuild(lost.catalog, lost.backends["local"])
        assert report.clean, report.to_json()
        assert len(report.added) == 2 and report.packs_added == len(before)
        rebuilt = lost.catalog.list_packs("local")
        assert {p.pack_id: p.chunk_count for p in rebuilt} == before and all(p.archives for p in rebuilt)
        node_tars = {a.id: a.node_path for a in app.catalog.list_archives()}
        for a in lost.catalog.list_archives():
            assert read_all(lost, a) == (sim.checkpoint_dir / node_tars[a.id]).read_bytes()
        # the writer's map is back: the next checkpoint stores only what changed
        assert lost.catalog.known_chunks("local", lost.catalog.pack_chunk_ids("local", rebuilt[0].pack_id))
        again = rebuild(lost.catalog, lost.backends["local"])
        assert again.added == [] and again.packs_added == 0 and again.agreeing == 2
    finally:
        lost.close()


def test_verify_read_data_checks_every_pack(fs_app: App, tmp_path: Path) -> None:
    app = fs_app
    policy = policies.apply(app, policies.web_policy())
    assert not app.runner.cycle(policy).failed
    packs = app.catalog.list_packs("local")
    full = verify(app.catalog, app.backends, [], read_data=True, dedup_backends=["local"])
    assert full.clean and full.packs["local"].checked == len(packs)
    sampled = verify(app.catalog, app.backends, [], dedup_backends=["local"])
    assert sampled.clean and 0 < sampled.packs["local"].checked <= len(packs)
    victim = tmp_path / "backend" / packs[0].key
    victim.chmod(0o600)
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    bad = verify(app.catalog, app.backends, [], read_data=True, dedup_backends=["local"])
    assert not bad.clean and bad.packs["local"].problems[0]["key"] == packs[0].key
    assert "does not match its name" in bad.packs["local"].problems[0]["detail"]
    victim.unlink()
    gone = verify(app.catalog, app.backends, [], read_data=True, dedup_backends=["local"])
    assert "not in the backend" in gone.packs["local"].problems[0]["detail"]


def test_report_shows_logical_and_stored_bytes_and_the_ratio(app: App) -> None:
    policy = policies.apply(app, policies.web_policy())
    for _ in range(2):
        assert not app.runner.cycle(policy).failed
    archives = app.catalog.list_archives()
    (web,) = [p for p in app.report().to_json()["policies"] if p["name"] == "web"]
    (row,) = web["workloads"]
    assert row["logical_bytes"] == sum(a.tar_size or 0 for a in archives)
    assert row["stored_bytes"] == sum(a.stored_size or 0 for a in archives)
    assert row["dedup_ratio"] == round(row["logical_bytes"] / row["stored_bytes"], 2) > 1
    table = render_table(app.report())
    header = next(line for line in table.splitlines() if "STATUS" in line).split()
    assert header[header.index("LOGICAL") + 1:header.index("LOGICAL") + 3] == ["STORED", "DEDUP"]
    assert f"{row['dedup_ratio']:.2f}x" in table
    page = render_html(app.report())
    assert '<th scope="col" class="num">Logical</th>' in page and ">Dedup ratio</th>" in page
    assert f'<td class="num">{row["dedup_ratio"]:.2f}x</td>' in page


def test_rebuild_never_offers_the_chunks_of_a_planted_pack(fs_app: App, sim: NodeSimulator, tmp_path: Path) -> None:
    """The bucket is not trusted: a pack whose index claims a chunk it does not hold (here:
    the id of a page every checkpoint has) must not make later checkpoints point at it."""
    from backupd.storage.dedup import pack as packs
    from backupd.storage.dedup.ids import ChunkIds
    from backupd.storage.rebuild import rebuild

    app = fs_app
    zero_page = ChunkIds()(bytes(4096))
    builder = packs.PackBuilder()
    builder.add_frame(packs.compress_frame(b"\xee" * 4096), [(zero_page, 4096)])
    pack_id, stored = packs.seal(builder.finish())
    app.backends["local"].put_bytes(packs.pack_key(pack_id), stored)
    report = rebuild(app.catalog, app.backends["local"])
    assert [c["key"] for c in report.corrupt_packs] == [packs.pack_key(pack_id)]
    assert "does not match its id" in report.corrupt_packs[0]["error"] and not report.clean
    assert app.catalog.known_chunks("local", [zero_page]) == {}
    policy = policies.apply(app, policies.web_policy(keep_on_node=5))
    assert not app.runner.cycle(policy).failed
    for a in app.catalog.list_archives():
        assert read_all(app, a) == (sim.checkpoint_dir / a.node_path).read_bytes()


def test_encrypted_rebuild_maps_chunks_only_with_the_identity(tmp_path: Path, sim: NodeSimulator) -> None:
    import pyrage

    from backupd.storage.rebuild import rebuild

    ident = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "id-key"
    key_file.write_text("c3" * 32)
    key_file.chmod(0o400)
    options = {"encryption_recipients": [str(ident.to_public())], "id_key_file": key_file}
    app = dedup_app(tmp_path, sim, f"sqlite:///{tmp_path / 'catalog.db'}", **options)
    blind = dedup_app(tmp_path, sim, f"sqlite:///{tmp_path / 'blind.db'}", **options)
    seeing = dedup_app(tmp_path, sim, f"sqlite:///{tmp_path / 'seeing.db'}", **options)
    try:
        assert not app.runner.cycle(policies.apply(app, policies.web_policy())).failed
        packs = {p.pack_id: p.chunk_count for p in app.catalog.list_packs("local")}
        without = rebuild(blind.catalog, blind.backends["local"])
        assert without.clean and len(without.added) == 2 and without.packs_added == len(packs)
        assert all(p.chunk_count == 0 and p.archives for p in blind.catalog.list_packs("local"))
        with_identity = rebuild(seeing.catalog, seeing.backends["local"], identities=[ident])
        assert with_identity.clean
        assert {p.pack_id: p.chunk_count for p in seeing.catalog.list_packs("local")} == packs
        # the blind catalog's packs get their chunks from a second rebuild, with the identity
        assert rebuild(blind.catalog, blind.backends["local"], identities=[ident]).clean
        assert {p.pack_id: p.chunk_count for p in blind.catalog.list_packs("local")} == packs
    finally:
        for a in (app, blind, seeing):
            a.close()


def test_what_the_daemon_stored_restores_without_backupd(fs_app: App, sim: NodeSimulator, tmp_path: Path) -> None:
    """The README's "restore without backupd" for deduplicated archives: the standalone script
    on the backend's files (standard library and the zstd command only)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("zstd") is None:
        pytest.skip("the zstd command is not installed")
    script = Path(__file__).resolve().parents[2] / "tools" / "restore-dedup.py"
    app = fs_app
    policy = policies.apply(app, policies.web_policy(keep_on_node=5))
    for _ in range(2):
        assert not app.runner.cycle(policy).failed
    for a in app.catalog.list_archives():
        out = tmp_path / f"{a.id}.tar"
        done = subprocess.run([sys.executable, "-S", "-E", str(script), str(tmp_path / "backend"), a.key, "-o",
                               str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == a.tar_sha256
        assert out.read_bytes() == (sim.checkpoint_dir / a.node_path).read_bytes()
