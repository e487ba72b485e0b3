"""``backupd demo``: the real daemon on embedded defaults, against the node simulator.

Everything lives under ``./.backupd/demo/``: the simulator's PKI and checkpoint directory, a
SQLite catalog and a filesystem backend. Demo policies with seconds-scale schedules and small
retention are applied, the daemon runs for ``--duration`` seconds with live progress, and a
summary of what was taken and kept ends it -- with every kept archive read back and checked
against its manifest. No cluster and no cloud account needed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from backupd import logs
from backupd.config import Config, DaemonConfig, DatabaseConfig, FilesystemBackendConfig, KubeletConfig
from backupd.sizes import human_bytes

if TYPE_CHECKING:  # the app (catalog, backends) is imported by the command, not by `backupd --help`
    from backupd.app import App

DEMO_POLICIES = """\
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: web}
spec:
  selector: {namespaces: [default], matchLabels: {app: web}}
  schedule: "@every 10s"
  backend: local
  retention: {keepLast: 3}
---
apiVersion: backupd.io/v1
kind: CheckpointPolicy
metadata: {name: shop-db}
spec:
  selector: {namespaces: [shop], containers: [postgres]}
  schedule: "@every 15s"
  backend: local
  retention: {keepLast: 2}
  keepOnNode: 1
"""


def demo_config(root: Path, sim: object) -> Config:
    return Config(
        database=DatabaseConfig(url=f"sqlite:///{root / 'catalog.db'}"),
        kubelet=KubeletConfig(
            url=sim.url, ca_file=sim.ca_file, cert_file=sim.client_cert, key_file=sim.client_key,  # type: ignore[attr-defined]
            checkpoint_dir=sim.checkpoint_dir, timeout_seconds=60, node_name="demo-node",  # type: ignore[attr-defined]
        ),
        daemon=DaemonConfig(max_concurrent_checkpoints=2, min_free_space=64 << 20, shutdown_grace_seconds=30),
        backends=[FilesystemBackendConfig(name="local", type="filesystem", path=root / "backend")],
    )


class Progress:
    """One status line on a terminal, one line per finished run otherwise."""

    def __init__(self, app: App, duration: float) -> None:
        self.app = app
        self.duration = duration
        self.tty = sys.stdout.isatty()
        self.seen: set[int] = set()
        self.ok = self.failed = 0
        self.bytes_in = self.bytes_out = 0

    def poll(self, elapsed: float) -> None:
        from backupd.model import RUN_FAILED, SUCCEEDED

        for run in reversed(self.app.catalog.list_runs(kind="checkpoint", limit=200)):
            if run.id in self.seen or run.finished_at is None:
                continue
            self.seen.add(run.id)
            if run.outcome == SUCCEEDED:
                self.ok += 1
                self.bytes_in += run.bytes_in
                self.bytes_out += run.bytes_out
            elif run.outcome == RUN_FAILED:
                self.failed += 1
            if not self.tty:
                target = f"{run.namespace}/{run.pod}/{run.container}" if run.container else "(discovery)"
                ok = run.outcome == SUCCEEDED
                detail = f"{human_bytes(run.bytes_in)} -> {human_bytes(run.bytes_out)}" if ok else run.error
                click.echo(f"[{elapsed:5.1f}s] {run.policy:8} {target:40} {run.outcome:9} {detail}")
        if self.tty:
            ratio = f"{self.bytes_in / self.bytes_out:.1f}x" if self.bytes_out else "-"
            kept = len(self.app.catalog.list_archives())
            line = (f"\r[{elapsed:5.1f}/{self.duration:.0f}s] checkpoints ok {self.ok}, failed {self.failed}; "
                    f"shipped {human_bytes(self.bytes_in)} as {human_bytes(self.bytes_out)} ({ratio}); "
                    f"archives kept {kept}")
            click.echo(line.ljust(110), nl=False)


def verify_all(app: App) -> tuple[int, list[str]]:
    """Read every committed archive back and check it against its manifest, as ``verify`` does."""
    from backupd.storage.verify import verify

    report = verify(app.catalog, app.backends, app.catalog.list_archives(), structure=True, orphan_grace=None)
    return len(report.findings), [f"archive {f.archive_id}: {f.status}: {f.detail}" for f in report.problems]


@click.command()
@click.option("--duration", default=60.0, show_default=True, help="Seconds to run the daemon.")
@click.option("--dir", "root", default=".backupd/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo keeps its state.")
@click.option("--memory-size", default="16Mi", show_default=True, help="Memory of each simulated container.")
@click.option("--criu", is_flag=True, help="Run real processes and checkpoint them with CRIU (needs root and criu).")
@click.option("--keep", is_flag=True, help="Keep the state of the previous demo run instead of starting afresh.")
def demo(duration: float, root: str, memory_size: str, criu: bool, keep: bool) -> None:
    """Run the daemon on embedded defaults against the built-in node simulator."""
    from backupd.app import App
    from backupd.simulator.server import NodeSimulator
    from backupd.simulator.topology import parse_quantity

    logs.configure(level="warning")
    base = Path(root).absolute()
    if base.exists() and not keep:
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    sim = NodeSimulator(base / "node", memory_bytes=parse_quantity(memory_size), criu=criu)
    with sim:
        config = demo_config(base, sim)
        app = App(config)
        try:
            _run_demo(app, base, duration, sim)
        finally:
            app.close()


def _run_demo(app: App, base: Path, duration: float, sim: object) -> None:
    from backupd.policy.document import parse_policies

    click.echo(f"backupd demo: node simulator at {sim.url}, state in {base}")  # type: ignore[attr-defined]
    app.catalog.upgrade()
    policies = parse_policies(DEMO_POLICIES, "demo policies", backends=["local"])
    for name, result in app.catalog.apply_policies([(p.name, p.canonical_json()) for p in policies]):
        p = next(p for p in policies if p.name == name)
        click.echo(f"  policy {name} {result}: schedule {p.spec.schedule}, "
                   f"retention {p.spec.retention.model_dump(by_alias=True, exclude_none=True)}")
    daemon = app.daemon(policy_poll_seconds=1.0)
    daemon.start()
    progress = Progress(app, duration)
    stop = threading.Event()
    started = time.monotonic()
    try:
        while not stop.wait(1.0):
            elapsed = time.monotonic() - started
            progress.poll(elapsed)
            if elapsed >= duration:
                break
    except KeyboardInterrupt:
        click.echo("\ninterrupted; finishing in-flight checkpoints")
    finally:
        daemon.stop(app.config.daemon.shutdown_grace_seconds)
    progress.poll(time.monotonic() - started)
    if progress.tty:
        click.echo()
    _summary(app, base)


def _summary(app: App, base: Path) -> None:
    from backupd.cli.base import print_table
    from backupd.model import RUN_FAILED, SUCCEEDED

    archives = app.catalog.list_archives()
    groups: dict[tuple[str, str, str, str], list] = {}
    for a in archives:
        groups.setdefault((a.namespace, a.workload, a.replica, a.container), []).append(a)
    click.echo("\nkept archives per retention group:")
    print_table(
        [(ns, wl, replica or "-", c, len(items), human_bytes(sum(a.tar_size or 0 for a in items)),
          human_bytes(sum(a.stored_size or 0 for a in items)), items[-1].checkpoint_time)
         for (ns, wl, replica, c), items in sorted(groups.items())],
        ["namespace", "workload", "replica", "container", "archives", "size", "stored", "newest"],
    )
    runs = app.catalog.list_runs(kind="checkpoint", limit=10_000)
    failed = [r for r in runs if r.outcome == RUN_FAILED]
    taken = sum(1 for r in runs if r.outcome == SUCCEEDED)
    prunes = app.catalog.list_runs(kind="prune", limit=10_000)
    count, problems = verify_all(app)
    node_tars = len(list(Path(app.config.kubelet.checkpoint_dir).glob("checkpoint-*.tar")))
    click.echo(f"\ncheckpoint runs: {len(runs)} ({len(failed)} failed); archives taken {taken}, "
               f"removed by {len(prunes)} prune runs {taken - count} "
               f"({human_bytes(sum(r.bytes_in for r in prunes))}), kept {count}")
    verdict = "all OK" if not problems else "PROBLEMS"
    click.echo(f"every kept archive read back and checked against its manifest: {verdict}")
    for p in problems:
        click.echo(f"  {p}")
    click.echo(f"node-local tars left in {app.config.kubelet.checkpoint_dir}: {node_tars} (keepOnNode)")
    config = base / "config.toml"
    _write_config(app.config, config)
    again = f"{_this_command()} --config {shlex.quote(_from_here(config))}"
    newest = max(archives, key=lambda a: (a.checkpoint_time, a.id), default=None)
    click.echo(f"\narchives are in {base / 'backend'}; the simulator has stopped, the catalog and the archives "
               "stay. Try:")
    for command in ("list", f"inspect {newest.id}" if newest else None, "report", "verify"):
        if command:
            click.echo(f"  {again} {command}")
    if problems:
        raise SystemExit(7)


def _from_here(path: Path) -> str:
    """``path`` as the user can type it here: relative below the current directory, else absolute."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path.absolute())


def _this_command() -> str:
    """How to run this backupd again from the current directory, as it was started: ``backupd``
    when that is on PATH, else the script's path as typed (``make demo`` runs
    ``.venv/bin/backupd``), else this interpreter with ``-m backupd``."""
    script = sys.argv[0]
    if Path(script).name == "backupd" and Path(script).is_file():
        on_path = shutil.which("backupd")
        if on_path and os.path.samefile(on_path, script):
            return "backupd"
        return shlex.quote(script)
    return f"{shlex.quote(_from_here(Path(sys.executable)))} -m backupd"


def _write_config(config: Config, path: Path) -> None:
    """A config file pointing at the demo's catalog and backend, for trying other commands."""
    k = config.kubelet
    backend = config.backends[0]
    assert isinstance(backend, FilesystemBackendConfig)
    path.write_text(
        "# written by `backupd demo`: the demo's catalog and backend (the simulator is stopped)\n"
        f'[database]\nurl = "{config.database.url}"\n'
        f'[kubelet]\nurl = "{k.url}"\nca_file = "{k.ca_file}"\ncert_file = "{k.cert_file}"\n'
        f'key_file = "{k.key_file}"\ncheckpoint_dir = "{k.checkpoint_dir}"\nnode_name = "{k.node_name}"\n'
        f'[[backends]]\nname = "{backend.name}"\ntype = "filesystem"\npath = "{backend.path}"\n'
    )
    path.chmod(0o600)
