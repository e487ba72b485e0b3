"""``backupd restore``: bring a checkpoint back -- to a file, an OCI layout, or a registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from backupd.cli.base import FORMATS, Context, cli, human_bytes, namespace_option, output_option, pass_ctx, print_data
from backupd.errors import InvalidInput
from backupd.sizes import parse_size

if TYPE_CHECKING:
    from backupd.model import Archive
    from backupd.restore import service
    from backupd.restore.progress import Progress

PASSWORD_ENV = "BACKUPD_REGISTRY_PASSWORD"


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InvalidInput(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _registry_password(password_file: str | None) -> str | None:
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise InvalidInput(f"--registry-password-file {password_file!r}: cannot read it ({exc.strerror})") from None
    return os.environ.get(PASSWORD_ENV) or None


def _check_new_file(path: str, flag: str, force: bool) -> None:
    p = Path(path)
    if not (p.parent if str(p.parent) else Path(".")).is_dir():
        raise InvalidInput(f"{flag} {path!r}: the directory {str(p.parent)!r} does not exist")
    if p.is_dir() or (p.exists() and not force):
        raise InvalidInput(f"{flag} {path!r} already exists; choose another path or pass --force")


def _not_a_format(value: str) -> str:
    return (f"--output is the output format now ({', '.join(FORMATS)}), not a file; write the tar with "
            f"--to {value}")


@cli.command()
@click.argument("archive_id", required=False)
@click.option("--to", "to_file", metavar="FILE", help="Write the checkpoint tar to FILE (0600, atomic).")
@click.option("--oci-layout", "oci_dir", metavar="DIR", help="Write a checkpoint image as an OCI layout in DIR.")
@click.option("--image", "image", metavar="REF", help="Push a checkpoint image to REF (registry/repo[:tag]; "
              "tag default: the archive id).")
@click.option("--pod-manifest", metavar="FILE", help="With --image: also write a Pod (or controller) manifest "
              "that runs the image.")
@click.option("--latest", is_flag=True, help="The newest committed archive of --namespace/--workload/--container.")
@namespace_option(help="With --latest: the archive's namespace.")
@click.option("--workload", help="e.g. deployment/web. With --pod-manifest: render the controller, not a bare Pod.")
@click.option("--container")
@click.option("--pod", help="A pod name or replica (a StatefulSet pod such as db-0, a DaemonSet pod's node). "
              "--latest needs it when the workload's archives come from several replicas.")
@click.option("--force", is_flag=True, help="Replace an existing --to or --pod-manifest file.")
@click.option("--registry-username", metavar="USER")
@click.option("--registry-password-file", metavar="FILE",
              help=f"File holding the registry password (or set ${PASSWORD_ENV}).")
@click.option("--registry-ca-file", metavar="FILE", help="CA bundle that signed the registry's certificate.")
@click.option("--insecure-registry", is_flag=True,
              help="Accept plain HTTP or an unverified certificate from the registry (test registries only).")
@click.option("--chunk-size", default="0", show_default=True, metavar="SIZE",
              help="Upload the layer in PATCH chunks of SIZE (e.g. 64Mi); 0 = one streamed PUT.")
@click.option("--mount-from", multiple=True, metavar="REPO",
              help="Repository on the same registry that may already hold the layer (cross-repo mount).")
@click.option("--manifest-kind", type=click.Choice(["pod", "workload"]),
              help="What --pod-manifest renders (default: workload when --workload is given, else pod).")
@click.option("--node-name", metavar="NODE", help="Pin the restored pod to NODE.")
@click.option("--pin-node", is_flag=True, help="Pin the restored pod to the node the checkpoint was taken on.")
@click.option("--pod-name", help="Name of the restored bare Pod (default: the original pod's name).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Add a label to the restored pod (the archive records only some of the original's).")
@click.option("--identity-file", metavar="FILE", envvar="BACKUPD_AGE_IDENTITY_FILE",
              help="age identity file that decrypts encrypted archives (or $BACKUPD_AGE_IDENTITY_FILE).")
@output_option(help="Format of the result (table: one summary line).", misuse=_not_a_format)
@click.option("--json", "as_json", is_flag=True, hidden=True, help="Deprecated: -o json.")
@pass_ctx
def restore(ctx: Context, archive_id: str | None, to_file: str | None, oci_dir: str | None, image: str | None,
            pod_manifest: str | None, latest: bool, namespace: str | None, workload: str | None,
            container: str | None, pod: str | None, force: bool, registry_username: str | None,
            registry_password_file: str | None, registry_ca_file: str | None, insecure_registry: bool,
            chunk_size: str, mount_from: tuple[str, ...], manifest_kind: str | None, node_name: str | None,
            pin_node: bool, pod_name: str | None, labels: tuple[str, ...], identity_file: str | None,
            output: str, as_json: bool) -> None:
    """Restore archive ID (or --latest) to exactly one of --to FILE, --oci-layout DIR or --image REF.

    \b
    backupd restore 3f2a9c1d --to /tmp/web.tar
    backupd restore --latest -n shop --workload statefulset/db --pod db-0 --container postgres \\
        --image registry.example.com/checkpoints/db --pod-manifest db.yaml --pin-node

    The archive is streamed out of its backend and checked against the catalog and its manifest
    (SHA-256 and size) while it streams, and its tar members against the rules verify and
    inspect apply (no links, devices, absolute or `..` names); a mismatch or a hostile member
    fails the restore (exit 7) and leaves nothing behind.
    """
    # imported here: the restore machinery is not needed for `backupd --help` or other commands
    from backupd.restore import service
    from backupd.restore.progress import Progress
    from backupd.storage.transfer import load_identities

    if as_json:
        output = "json"
    destinations = [flag for flag, v in (("--to", to_file), ("--oci-layout", oci_dir), ("--image", image)) if v]
    if len(destinations) != 1:
        raise InvalidInput("give exactly one of --to FILE, --oci-layout DIR or --image REF"
                           + (f" (got {', '.join(destinations)})" if destinations else ""))
    if pod_manifest and not image:
        raise InvalidInput("--pod-manifest needs --image: the manifest refers to the pushed image")
    if node_name and pin_node:
        raise InvalidInput("give --node-name or --pin-node, not both")
    extra_labels = _labels(labels)
    try:
        chunk = parse_size(chunk_size)
    except ValueError as exc:
        raise InvalidInput(f"--chunk-size: {exc}") from None
    destination: service.Destination
    if image:
        from backupd.restore.registry import ImageRef

        ref = ImageRef.parse(image)
        if ref.digest:
            raise InvalidInput(f"--image {image!r}: push to a tag, not a digest")
        manifest = None
        if pod_manifest:
            _check_new_file(pod_manifest, "--pod-manifest", force)
            manifest = service.PodManifest(
                pod_manifest, as_workload=(manifest_kind or ("workload" if workload else "pod")) == "workload",
                node_name=node_name, pin_node=pin_node, labels=extra_labels, pod_name=pod_name, overwrite=force)
        destination = service.ToRegistry(
            ref, username=registry_username, password=_registry_password(registry_password_file),
            insecure=insecure_registry, ca_file=registry_ca_file, chunk_size=chunk, mount_from=mount_from,
            pod_manifest=manifest)
    elif to_file:
        _check_new_file(to_file, "--to", force)
        destination = service.ToFile(to_file, overwrite=force)
    else:
        assert oci_dir is not None
        destination = service.ToOciLayout(oci_dir)
    identities = load_identities(identity_file, "--identity-file") if identity_file else []

    def progress(archive: Archive) -> Progress:
        return Progress(archive.tar_size, label=f"restore {archive.id[:8]}", archive_id=archive.id)

    app = ctx.app
    query = service.ArchiveQuery(archive_id, latest=latest, namespace=namespace, workload=workload,
                                 container=container, pod=pod)
    restored = service.restore(app.catalog, app.backends, query, destination, identities=identities,
                               progress=progress)
    if output != "table":
        print_data(restored.to_json(), output)
    else:
        click.echo(_summary(restored, destination))


def _summary(restored: service.Restored, destination: service.Destination) -> str:
    """What ``-o table`` prints: one line, and one more for a pod manifest (paths as given)."""
    from backupd.restore import service

    archive = restored.archive
    if isinstance(restored, service.FileRestored):
        assert isinstance(destination, service.ToFile)
        return f"restored archive {archive.id} to {destination.path} ({human_bytes(restored.bytes)}, verified)"
    if isinstance(restored, service.LayoutWritten):
        assert isinstance(destination, service.ToOciLayout)
        return (f"wrote checkpoint image of archive {archive.id} to OCI layout {destination.path} "
                f"(oci:{destination.path}:{restored.ref_name}, manifest {restored.manifest_digest})")
    assert isinstance(destination, service.ToRegistry)
    summary = (f"pushed checkpoint image of archive {archive.id} to {restored.image} "
               f"(layer {restored.layer}); run it as {restored.pinned}")
    if destination.pod_manifest is not None:
        path = destination.pod_manifest.path
        summary += f"\nwrote {path}: apply it with `kubectl apply -f {path}`"
    return summary
