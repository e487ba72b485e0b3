"""Benchmark inputs: real CRI-O-layout checkpoint tars with memory-like pages (zero pages,
repeated pages, noise), written by the node simulator's own archive writer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from backupd.simulator.archive import write_checkpoint_archive
from backupd.simulator.topology import default_topology, materialize

MiB = 1 << 20


def checkpoint_tar(directory: Path, size: int, seed: int = 1) -> Path:
    """A checkpoint tar of about ``size`` bytes (cached by size and seed in ``directory``)."""
    path = directory / f"checkpoint-bench-{size // MiB}MiB-{seed}.tar"
    if path.exists():
        return path
    pod = next(p for p in materialize(default_topology(), seed=seed) if p.containers)
    container = pod.containers[0]
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        write_checkpoint_archive(fh, pod, container, checkpointed_at=dt.datetime.now(dt.UTC),
                                 memory_bytes=size, seed=seed)
    tmp.rename(path)
    return path
