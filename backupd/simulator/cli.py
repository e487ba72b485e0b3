"""``backupd simulate-node``: run the node simulator on its own until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from backupd.errors import InvalidInput
from backupd.simulator.server import DEFAULT_MEMORY_BYTES, NodeSimulator, load_faults
from backupd.simulator.topology import default_topology, load_topology, parse_quantity

__all__ = ["simulate_node"]

DEFAULT_TOKEN_USER = "system:serviceaccount:backupd:backupd"


def _toml_str(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@click.command("simulate-node")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".backupd/simulator"),
              show_default=True, help="PKI, checkpoint directory and CRIU work files live here (0700).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=10250, show_default=True,
              help="Port to bind (0 = any free port).")
@click.option("--topology", "topology_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML/JSON file describing the pods (default: the built-in demo node).")
@click.option("--faults", "faults_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML/JSON list of faults to inject (see backupd.simulator.server.Fault).")
@click.option("--memory-size", default=f"{DEFAULT_MEMORY_BYTES >> 20}Mi", show_default=True,
              help="Simulated memory per container unless the topology sets it (e.g. 64Mi, 1Gi).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where archives are written (default: STATE_DIR/checkpoints).")
@click.option("--criu", is_flag=True, help="Run real processes and checkpoint them with criu >= 4 (root).")
@click.option("--token", "tokens", multiple=True, metavar="TOKEN[=USER]",
              help=f"Accept this bearer token (as USER, default {DEFAULT_TOKEN_USER}); repeatable. "
                   "Client certificates become optional.")
@click.option("--allow-user", "allowed", multiple=True, metavar="USER",
              help="Only these users (client-cert CN or token user) are authorised; others get 403. Repeatable.")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Extra seconds every checkpoint takes (e.g. 0.1 for load tests).")
@click.option("--disable-checkpoint-api", is_flag=True,
              help="Answer 404 page not found on /checkpoint/, as with the feature gate off.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for identifiers and synthetic content.")
def simulate_node(
    state_dir: Path,
    host: str,
    port: int,
    topology_file: Path | None,
    faults_file: Path | None,
    memory_size: str,
    checkpoint_dir: Path | None,
    criu: bool,
    tokens: tuple[str, ...],
    allowed: tuple[str, ...],
    latency: float,
    disable_checkpoint_api: bool,
    seed: int,
) -> None:
    """Run a kubelet stand-in that serves /pods and the checkpoint API over mTLS."""
    try:
        topology = load_topology(topology_file) if topology_file else default_topology()
        faults = load_faults(faults_file) if faults_file else []
        memory = parse_quantity(memory_size)
    except InvalidInput as exc:
        raise click.UsageError(str(exc)) from None
    token_map = {}
    for item in tokens:
        token, _, user = item.partition("=")
        if not token:
            raise click.UsageError("--token needs a non-empty token")
        token_map[token] = user or DEFAULT_TOKEN_USER
    sim = NodeSimulator(
        state_dir,
        topology=topology,
        host=host,
        port=port,
        tokens=token_map or None,
        allowed_users=list(allowed) or None,
        checkpoint_api_enabled=not disable_checkpoint_api,
        checkpoint_dir=checkpoint_dir,
        memory_bytes=memory,
        criu=criu,
        checkpoint_latency=latency,
        seed=seed,
        faults=faults,
    )
    try:
        url = sim.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc} (try --port 0)") from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        mode = "real CRIU" if sim.criu_enabled else "synthetic CRIU images"
        click.echo(f"kubelet simulator for node {sim.node_name} listening on {url} ({mode})")
        click.echo(f"  CA certificate:     {sim.ca_file}")
        click.echo(f"  client certificate: {sim.client_cert}")
        click.echo(f"  client key:         {sim.client_key}")
        click.echo(f"  checkpoint dir:     {sim.checkpoint_dir}")
        click.echo("\nbackupd config:\n")
        click.echo("[kubelet]")
        click.echo(f"url = {_toml_str(url)}")
        click.echo(f"ca_file = {_toml_str(sim.ca_file)}")
        if token_map:
            click.echo("# token_file = <a file holding one of the --token values>")
        click.echo(f"cert_file = {_toml_str(sim.client_cert)}")
        click.echo(f"key_file = {_toml_str(sim.client_key)}")
        click.echo(f"checkpoint_dir = {_toml_str(sim.checkpoint_dir)}")
        click.echo(f"node_name = {_toml_str(sim.node_name)}")
        click.echo("\npods:")
        for pod in sim.pods:
            for c in pod.containers:
                click.echo(f"  {pod.namespace}/{pod.name}/{c.name} ({c.state})")
        if faults:
            click.echo(f"\n{len(faults)} fault(s) loaded from {faults_file}")
        click.echo("\nCtrl-C to stop.")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    click.echo("stopped")
