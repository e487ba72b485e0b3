"""Full disks for real: small tmpfs mounts as the filesystem backend and as the node's checkpoint
directory, filled until ENOSPC. Each run fails cleanly (NoSpace, or the kubelet's own failure),
leaves no temp file and loses nothing; once space returns the next run succeeds. The
``daemon.min_free_space`` floor stops checkpoints before the kubelet is even asked.

Mounting needs root (CAP_SYS_ADMIN); elsewhere the tmpfs tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backupd.app import App
from backupd.simulator.server import NodeSimulator
from tests.conftest import make_config
from tests.policies import apply as apply_policy
from tests.policies import web_policy
from tests.reliability.consistency import assert_consistent, daemon_cycle, fast_retries

POLICY = web_policy(retention="{keepLast: 50}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs(name, size)`` mounts a fresh tmpfs of ``size`` (e.g. ``8m``) at ``tmp_path/name``."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir(mode=0o700)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem has at most ``leave`` bytes free."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        chunk = b"\xff" * (64 << 10)
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(4096, min(len(chunk), free - leave))])
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def run_kinds(result) -> set[str | None]:  # type: ignore[no-untyped-def]
    return {o.run.error_kind for o in result.outcomes}


@pytest.mark.parametrize("fmt", ["full", "dedup"])
def test_filesystem_backend_full(app_factory, tmpfs, sim: NodeSimulator, fmt: str) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    store = tmpfs("store", "8m")
    app.config.backends[0].path = store / "backend"  # before the backend is built; the filler goes beside it
    app.config.backends[0].format = fmt
    policy = apply_policy(app, POLICY)
    assert not daemon_cycle(app, policy).failed
    before = assert_consistent(app).ids
    filler = fill(store)
    result = daemon_cycle(app, policy)
    assert run_kinds(result) == {"NoSpace"}, [o.run.error for o in result.outcomes]
    assert all("no space left" in (o.run.error or "") for o in result.outcomes)
    assert assert_consistent(app).ids == before  # no temp file, no half object, node tars removed
    filler.unlink()  # space returns
    result = daemon_cycle(app, policy)
    assert not result.failed, result
    assert before < assert_consistent(app).ids


@pytest.fixture
def node_on_tmpfs(tmp_path: Path, tmpfs) -> Iterator[tuple[NodeSimulator, App]]:  # type: ignore[no-untyped-def]
    """A simulator whose kubelet checkpoint directory is a 16 MiB tmpfs, and an App on it."""
    directory = tmpfs("kubelet-checkpoints", "16m")
    with NodeSimulator(tmp_path / "node", memory_bytes=2 << 20, checkpoint_dir=directory) as sim:
        app = App(make_config(tmp_path, sim, f"sqlite:///{tmp_path / 'catalog.db'}"))
        app.catalog.upgrade()
        try:
            yield sim, app
        finally:
            app.close()


def test_node_checkpoint_directory_full(node_on_tmpfs) -> None:  # type: ignore[no-untyped-def]
    """The kubelet cannot write the tar: the run fails with its error; the partial tar it left
    is swept once ``stale_tar_hours`` old; with space back the next run succeeds."""
    sim, app = node_on_tmpfs
    fast_retries(app)
    policy = apply_policy(app, POLICY)
    assert not daemon_cycle(app, policy).failed
    before = assert_consistent(app).ids
    filler = fill(sim.checkpoint_dir)
    result = daemon_cycle(app, policy)
    assert run_kinds(result) == {"CheckpointFailed"}
    assert all("No space left on device" in (o.run.error or "") for o in result.outcomes)
    partial = sorted(sim.checkpoint_dir.glob("checkpoint-*.tar"))
    assert partial, "the kubelet's half-written tars should be there for the sweep to find"
    assert assert_consistent(app, node_dir=Path("/nonexistent")).ids == before
    filler.unlink()
    old = (datetime.now(UTC) - timedelta(hours=app.config.daemon.stale_tar_hours + 1)).timestamp()
    for tar in partial:
        os.utime(tar, (old, old))
    result = daemon_cycle(app, policy)
    assert not result.failed, result
    assert before < assert_consistent(app).ids
    assert not any(t.exists() for t in partial), "the half-written tars were not swept"


def test_free_space_floor_skips_checkpoints_until_space_returns(node_on_tmpfs) -> None:  # type: ignore[no-untyped-def]
    sim, app = node_on_tmpfs
    app.config.daemon.min_free_space = 12 << 20  # before the pipeline is built
    fast_retries(app)
    policy = apply_policy(app, POLICY)
    filler = fill(sim.checkpoint_dir, leave=8 << 20)
    result = daemon_cycle(app, policy)
    assert run_kinds(result) == {"NoSpace"}
    assert all("below daemon.min_free_space" in (o.run.error or "") for o in result.outcomes)
    assert not [r for r in sim.requests if r.method == "POST"], "the kubelet was asked despite the floor"
    assert_consistent(app)
    filler.unlink()
    result = daemon_cycle(app, policy)
    assert not result.failed, result
    assert len(assert_consistent(app).ids) == 2


def test_free_space_floor_from_config(app_factory, sim: NodeSimulator) -> None:  # type: ignore[no-untyped-def]
    """Without a tmpfs: a floor no disk meets, set in the config the App is built from."""
    app = app_factory()
    app.config.daemon.min_free_space = 1 << 60  # before the pipeline is built
    policy = apply_policy(app, POLICY)
    result = daemon_cycle(app, policy)
    assert run_kinds(result) == {"NoSpace"}
    assert not [r for r in sim.requests if r.method == "POST"]
    with contextlib.suppress(FileNotFoundError):
        assert not list(sim.checkpoint_dir.iterdir())
    assert_consistent(app)
