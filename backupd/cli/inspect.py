"""``backupd inspect ID|PATH``: what is inside a checkpoint archive, as checkpointctl shows it."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click

from backupd.cli.base import OUTPUT, Context, cli, human_bytes, pass_ctx, print_data
from backupd.errors import ConfigError

if TYPE_CHECKING:
    from backupd.archive.inspect import Inspection

Tree = tuple[str, list[Any]]  # (label, children)


def _printable(text: str) -> str:
    """Archive-controlled text made safe for a terminal: control characters and undecodable
    bytes are shown escaped, never sent raw (an escape sequence in a file name stays text)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def format_micros(us: int) -> str:
    """checkpointctl's FormatTime: µs below a millisecond, else ms or s with 5 significant
    digits, trailing zeros trimmed."""
    if us < 1000:
        return f"{us} µs"
    value, unit = (us / 1000, "ms") if us < 1_000_000 else (us / 1_000_000, "s")
    text = f"{value:.5g}"
    if "." in text and "e" not in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {unit}"


def _inspection_tree(inspection: Inspection) -> Tree:
    top: list[Tree] = []

    def add(label: str, value: str | None) -> None:
        if value is not None:
            top.append((f"{label}: {_printable(value)}", []))

    add("Image", inspection.image or "")
    add("ID", inspection.id or "")
    add("Runtime", inspection.runtime or "")
    add("Created", inspection.created or "")
    add("Checkpointed", inspection.checkpointed)
    add("Engine", inspection.engine or "")
    add("IP", inspection.ip)
    add("MAC", inspection.mac)
    if inspection.pod or inspection.namespace:
        add("Pod", f"{inspection.namespace or '-'}/{inspection.pod or '-'}")
    sizes = inspection.checkpoint_size
    size_children: list[Tree] = []
    if sizes.memory_pages_size:
        size_children.append((f"Memory pages size: {human_bytes(sizes.memory_pages_size)}", []))
    if sizes.amd_gpu_memory_pages_size:
        size_children.append((f"AMD GPU memory pages size: {human_bytes(sizes.amd_gpu_memory_pages_size)}", []))
    top.append((f"Checkpoint size: {human_bytes(sizes.total_size)}", size_children))
    if inspection.rootfs_diff is not None:
        files: list[Tree] = []
        for f in inspection.rootfs_diff.files:
            if f.type == "file":
                files.append((f"{_printable(f.path)} ({human_bytes(f.size)})", []))
            elif f.link is not None:
                files.append((f"{_printable(f.path)} -> {_printable(f.link)} ({f.type})", []))
            elif f.type != "dir":
                files.append((f"{_printable(f.path)} ({f.type})", []))
        if inspection.rootfs_diff.truncated:
            files.append(("… (listing truncated)", []))
        top.append((f"Root FS diff size: {human_bytes(sizes.root_fs_diff_size)}", files))
    if inspection.deleted_files:
        top.append(("Deleted files", [(_printable(path), []) for path in inspection.deleted_files]))
    stats = inspection.statistics
    if stats is not None:
        top.append(("CRIU dump statistics", [
            (f"Freezing time: {format_micros(stats.freezing_time)}", []),
            (f"Frozen time: {format_micros(stats.frozen_time)}", []),
            (f"Memdump time: {format_micros(stats.memdump_time)}", []),
            (f"Memwrite time: {format_micros(stats.memwrite_time)}", []),
            (f"Pages scanned: {stats.pages_scanned}", []),
            (f"Pages written: {stats.pages_written}", []),
        ]))  # fmt: skip
    if inspection.process_tree is not None:
        built: dict[int, Tree] = {}
        nodes = [node for _, node in inspection.process_tree.walk()]
        for node in reversed(nodes):  # children before parents: no recursion on deep trees
            state = "" if node.task_state == "Alive" else f" ({node.task_state})"
            children = [built[id(child)] for child in node.children]
            built[id(node)] = (f"[{node.pid}{state}]  {_printable(node.command)}", children)
        top.append(("Process tree", [built[id(inspection.process_tree)]]))
    for warning in inspection.warnings:
        top.append((f"Warning: {_printable(warning)}", []))
    return (_printable(inspection.container_name or "Container"), top)


def tree_lines(result: Inspection) -> list[str]:
    """The human view of an inspection, terminal-safe."""
    return render_tree(_inspection_tree(result))


def render_tree(root: Tree) -> list[str]:
    """Box-drawing lines, as checkpointctl (treeprint) draws them; iterative."""
    lines = [root[0]]
    stack: list[tuple[str, list[Any], int]] = [("", root[1], 0)]
    while stack:
        prefix, children, index = stack.pop()
        if index >= len(children):
            continue
        stack.append((prefix, children, index + 1))
        label, grand = children[index]
        last = index == len(children) - 1
        lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
        stack.append((prefix + ("    " if last else "│   "), grand, 0))
    return lines


@cli.command("inspect")
@click.argument("target", metavar="ID|PATH")
@click.option("--identity-file", metavar="FILE", envvar="BACKUPD_AGE_IDENTITY_FILE",
              help="age identity for encrypted catalog archives (or $BACKUPD_AGE_IDENTITY_FILE).")
@OUTPUT
@pass_ctx
def inspect_command(ctx: Context, target: str, identity_file: str | None, output: str) -> None:
    """What is inside a checkpoint archive, without extracting it: container, image, engine,
    times, IP, sizes, the rootfs-diff file list, deleted files, CRIU dump statistics and the
    process tree (what `checkpointctl inspect --ps-tree --stats` shows).

    The argument is a local archive (.tar, .tar.zst, .tar.gz, .tar.xz, .tar.bz2; `-` for stdin) or,
    when no such file exists, an archive id or unique id prefix from the catalog (read from
    its backend and checked against the catalog's digests; use ./NAME for a file that looks
    like an id). Unsafe archives (absolute or `..` names, links, device files, enormous
    headers) are refused with exit code 7; a truncated or corrupt one too.
    """
    # imported here: the CRIU decoders and the catalog are not needed for `backupd --help`
    from backupd.archive.inspect import inspect_file, inspect_stream, looks_like_archive_id
    from backupd.storage.read import inspect_catalog_archive
    from backupd.storage.transfer import load_identities

    if target == "-":
        result = inspect_stream(sys.stdin.buffer, source="stdin")
    elif os.path.lexists(target) or not looks_like_archive_id(target):
        result = inspect_file(target)
    else:
        app = ctx.app
        app.catalog.check_schema()
        archive = app.catalog.get_archive(target)
        backend = app.backends.get(archive.backend)
        if backend is None:
            raise ConfigError(f"archive {archive.id} is stored in backend {archive.backend!r}, which is not in "
                              "the config ([[backends]])")  # fmt: skip
        identities = load_identities(identity_file, "--identity-file") if identity_file else []
        result = inspect_catalog_archive(archive, backend, identities=identities, catalog=app.catalog)
    if output != "table":
        print_data(result.to_json(), output)
        return
    if result.archive is not None:
        a = result.archive
        click.echo(f"\nDisplaying container checkpoint tree view from archive {a['id']} "
                   f"({a['backend']}:{a['key']})\n")  # fmt: skip
    else:
        click.echo(f"\nDisplaying container checkpoint tree view from {_printable(result.source)}\n")
    for line in tree_lines(result):
        click.echo(line)


__all__ = ["format_micros", "inspect_command", "render_tree", "tree_lines"]
