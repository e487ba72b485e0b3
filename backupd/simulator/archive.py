"""Checkpoint archives in the layout CRI-O writes for a kubelet checkpoint (reference §2).

An archive is an uncompressed POSIX tar with relative entry names, in CRI-O's order::

    stats-dump  dump.log  checkpoint/  checkpoint/*.img  config.dump  spec.dump  rootfs-diff.tar

The CRIU images are either synthetic (CRIU's protobuf messages through :mod:`backupd.archive.criu`: inventory,
pstree, core, ids, mm, pagemap and pages per simulated process; ``checkpointctl`` reads them)
or the real output of ``criu dump`` (see :mod:`backupd.simulator.criu`).

Synthetic memory (``pages-<n>.img``) is built from a few precomputed page kinds — zero pages,
heap-like pages and random noise from an 8 MiB pool — in proportions that make ``zstd -1``
compress it about 4x (``zstd -3`` about 5x). Everything is streamed: an archive is never held
in memory, and generation runs far faster than a disk writes. Output is deterministic for a
given seed.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import os
import platform
import random
import struct
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backupd.archive import criu
from backupd.node.checkpoints import node_tar_prefix
from backupd.simulator.metadata import argv_env, config_dump, go_rfc3339, go_rfc3339nano, spec_dump
from backupd.simulator.topology import Container, Pod

__all__ = [
    "ArchiveMember",
    "checkpoint_file_name",
    "config_dump",
    "go_rfc3339",
    "go_rfc3339nano",
    "memory_chunks",
    "rootfs_diff_tar",
    "spec_dump",
    "synthetic_checkpoint_members",
    "criu_checkpoint_members",
    "write_checkpoint_archive",
    "write_tar",
]

PAGE = criu.PAGE_SIZE
_ZERO_PAGE = bytes(PAGE)
_NOISE_POOL_BYTES = 8 << 20
_CHUNK_PAGES = 256  # 1 MiB per write
# zero / heap-like / noise page shares: zstd -1 ≈ 4.2x, zstd -3 ≈ 5.3x (measured)
_MEMORY_MIX = (0.45, 0.36, 0.19)


def checkpoint_file_name(pod: str, namespace: str, container: str, t: dt.datetime) -> str:
    """The kubelet's ``checkpoint-<pod>_<namespace>-<container>-<RFC3339>.tar``."""
    return f"{node_tar_prefix(pod, namespace, container)}{go_rfc3339(t)}.tar"


# -- tar streaming ----------------------------------------------------------------------------


@dataclass
class ArchiveMember:
    """One tar entry: a directory, in-memory bytes, or ``size`` bytes from ``chunks()``."""

    name: str
    data: bytes | None = None
    size: int = 0
    chunks: Callable[[], Iterable[bytes]] | None = None
    mode: int = 0o644
    is_dir: bool = False


def _header(name: str, size: int, mtime: int, mode: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = mode
    info.type = kind
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar(fh: BinaryIO, members: Iterable[ArchiveMember], mtime: dt.datetime) -> int:
    """Stream ``members`` as a tar to ``fh``; returns the bytes written.

    Ends with two zero blocks and no record padding, as Go's ``archive/tar`` does.
    """
    stamp = int(mtime.timestamp())
    written = 0
    for m in members:
        if m.is_dir:
            block = _header(m.name.rstrip("/") + "/", 0, stamp, m.mode, tarfile.DIRTYPE)
            fh.write(block)
            written += len(block)
            continue
        if m.data is not None:
            block = _header(m.name, len(m.data), stamp, m.mode, tarfile.REGTYPE)
            pad = -len(m.data) % tarfile.BLOCKSIZE
            fh.write(block)
            fh.write(m.data)
            fh.write(bytes(pad))
            written += len(block) + len(m.data) + pad
            continue
        assert m.chunks is not None
        block = _header(m.name, m.size, stamp, m.mode, tarfile.REGTYPE)
        fh.write(block)
        written += len(block)
        total = 0
        for chunk in m.chunks():
            fh.write(chunk)
            total += len(chunk)
        if total != m.size:
            raise RuntimeError(f"archive member {m.name} produced {total} bytes, announced {m.size}")
        pad = -total % tarfile.BLOCKSIZE
        fh.write(bytes(pad))
        written += total + pad
    fh.write(bytes(2 * tarfile.BLOCKSIZE))
    return written + 2 * tarfile.BLOCKSIZE


# -- synthetic memory ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _memory_assets(seed: int) -> tuple[memoryview, tuple[bytes, ...]]:
    rng = random.Random(f"assets-{seed}")
    noise = memoryview(rng.randbytes(_NOISE_POOL_BYTES))
    fragments = [b"GET /ind", b"ex.html ", b"HTTP/1.1", b"Content-", b"user_id=", b"session:",
                 b"\x00\x00\x00\x00\x01\x00\x00\x00", b"SELECT *", b" FROM or", b"ders WHE"]  # fmt: skip
    heap = []
    for _ in range(48):
        base = 0x7F0000000000 + rng.randrange(1 << 32) * PAGE
        words = []
        for _ in range(PAGE // 8):
            k = rng.random()
            if k < 0.35:
                words.append(0)
            elif k < 0.6:
                words.append(base + rng.randrange(1 << 16) * 16)
            elif k < 0.8:
                words.append(rng.randrange(1 << 12))
            else:
                words.append(int.from_bytes(rng.choice(fragments), "little"))
        heap.append(struct.pack("<512Q", *words))
    return noise, tuple(heap)


def memory_chunks(pages: int, seed: int, *, assets_seed: int = 0) -> Iterator[bytes]:
    """``pages`` pages of memory-like content, about 1 MiB per chunk; deterministic."""
    noise, heap = _memory_assets(assets_seed)
    pool_pages = len(noise) // PAGE
    zero_share, heap_share = _MEMORY_MIX[0], _MEMORY_MIX[0] + _MEMORY_MIX[1]
    rng = random.Random(seed)
    out: list[bytes | memoryview] = []
    pending = 0
    left = pages
    while left:
        run = min(left, rng.randint(1, 32))
        kind = rng.random()
        if kind < zero_share:
            out.extend([_ZERO_PAGE] * run)
        elif kind < heap_share:
            out.extend(heap[rng.randrange(len(heap))] for _ in range(run))
        else:
            start = rng.randrange(pool_pages - run)
            out.append(noise[start * PAGE : (start + run) * PAGE])
        left -= run
        pending += run
        if pending >= _CHUNK_PAGES:
            yield b"".join(out)
            out, pending = [], 0
    if out:
        yield b"".join(out)


def rootfs_diff_tar(pod: Pod, c: Container, mtime: dt.datetime) -> bytes:
    """A small inner tar of files the container 'changed' (CRI-O's ``rootfs-diff.tar``)."""
    comm = c.processes[0]
    files = [
        (f"run/{comm}.pid", b"1\n"),
        (f"var/cache/{c.name}/state.json",
         json.dumps({"pod": pod.name, "namespace": pod.namespace, "container": c.name}).encode() + b"\n"),
        (f"var/log/{c.name}/app.log",
         b"".join(f"{go_rfc3339(mtime)} {c.name}[1]: handled request {i}\n".encode() for i in range(40))),
    ]  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted({os.path.dirname(n) for n, _ in files}):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime.timestamp())
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(mtime.timestamp())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- synthetic CRIU images -------------------------------------------------------------------


def _mtype() -> str:
    machine = platform.machine().lower()
    return criu.MACHINES.get({"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine), criu.MACHINES["x86_64"])


@dataclass
class _Process:
    pid: int
    ppid: int
    comm: str
    heap_pages: int
    heap_start: int
    code_start: int
    stack_top: int
    arg_page: bytes
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


_HEAP_RUN = 8192  # pages per pagemap entry; entries are separated by one unmapped page


def _plan_processes(pod: Pod, c: Container, memory_bytes: int, seed: int) -> list[_Process]:
    n = len(c.processes)
    total = max(memory_bytes // PAGE, 2 * n)
    shares = [total] if n == 1 else [int(total * 0.6)] + [(total - int(total * 0.6)) // (n - 1)] * (n - 1)
    rng = random.Random(f"layout-{seed}-{c.container_id}")
    procs = []
    for i, share in enumerate(shares):
        pid = i + 1
        code_start = 0x555555554000 + rng.randrange(1 << 24) * PAGE
        heap_start = code_start + 0x200000 + rng.randrange(1 << 12) * PAGE
        stack_top = 0x7FFC00000000 + rng.randrange(1 << 24) * PAGE
        argv, env = argv_env(pod, c, i)
        args = b"".join(a.encode() + b"\0" for a in argv)
        envs = b"".join(e.encode() + b"\0" for e in env)
        page = bytearray(PAGE)
        offset = 0x800
        blob = (args + envs)[: PAGE - offset]
        page[offset : offset + len(blob)] = blob
        page_addr = stack_top - PAGE
        procs.append(
            _Process(
                pid=pid, ppid=0 if i == 0 else 1, comm=c.processes[i][:15],
                heap_pages=max(share - 1, 1), heap_start=heap_start, code_start=code_start,
                stack_top=stack_top, arg_page=bytes(page),
                arg_start=page_addr + offset, arg_end=page_addr + offset + len(args),
                env_start=page_addr + offset + len(args), env_end=page_addr + offset + len(blob),
            )
        )  # fmt: skip
    return procs


def _heap_entries(p: _Process) -> list[criu.PagemapEntry]:
    entries = []
    addr, left = p.heap_start, p.heap_pages
    while left:
        n = min(left, _HEAP_RUN)
        entries.append(criu.PagemapEntry(vaddr=addr, compat_nr_pages=n, flags=criu.PE_PRESENT, nr_pages=n))
        addr += (n + 1) * PAGE
        left -= n
    return entries


def _mm(p: _Process, heap_end: int) -> criu.MmEntry:
    code_end = p.code_start + 64 * PAGE
    data_end = code_end + 16 * PAGE
    stack_start = p.stack_top - 33 * PAGE
    private_anon = 0x22  # MAP_PRIVATE | MAP_ANONYMOUS
    vmas = [
        criu.VmaEntry(start=p.code_start, end=code_end, pgoff=0, shmid=1, prot=5, flags=0x2, status=1 | 1 << 6),
        criu.VmaEntry(start=code_end, end=data_end, pgoff=64, shmid=1, prot=3, flags=0x2, status=1 | 1 << 6),
        criu.VmaEntry(start=p.heap_start, end=heap_end, pgoff=0, shmid=0, prot=3, flags=private_anon,
                    status=1 | 1 << 5 | 1 << 9),
        criu.VmaEntry(start=stack_start, end=p.stack_top, pgoff=0, shmid=0, prot=3, flags=private_anon | 0x100,
                    status=1 | 1 << 1 | 1 << 9),
    ]  # fmt: skip
    return criu.MmEntry(
        mm_start_code=p.code_start, mm_end_code=code_end, mm_start_data=code_end, mm_end_data=data_end,
        mm_start_stack=p.stack_top - PAGE + 0x100, mm_start_brk=p.heap_start, mm_brk=heap_end,
        mm_arg_start=p.arg_start, mm_arg_end=p.arg_end, mm_env_start=p.env_start, mm_env_end=p.env_end,
        exe_file_id=1, vmas=vmas, dumpable=1,
    )  # fmt: skip


def _dump_log(pod: Pod, procs: list[_Process], stats: criu.DumpStatsEntry) -> bytes:
    t = 0.0
    lines = []

    def log(msg: str, step: float = 0.00002) -> None:
        nonlocal t
        t += step
        lines.append(f"({t:09.6f}) {msg}")

    log("Version: 4.1.1 (gitid 0)")
    log(f"Running on {pod.node_name} Linux {platform.release()} {platform.machine()}")
    log(f"Dumping processes (pid: {procs[0].pid} comm: {procs[0].comm})")
    log("Will take pid namespace in the image")
    for p in procs:
        log(f"Seized task {p.pid}, state 1", 0.0001)
    log("Dumping pstree (pid: 1)", stats.freezing_time / 1e6)
    for p in procs:
        log(f"Dumping task (pid: {p.pid} comm: {p.comm})")
        log(f"Dumping {p.heap_pages + 1} pages (type: 1 pid: {p.pid})", 0.0005)
    log("Dumping mm (pid: 1)", stats.memdump_time / 1e6)
    log(f"Writing {stats.pages_written} pages", stats.memwrite_time / 1e6)
    log("Unlock network")
    log("Unfreezing tasks into 1")
    log("Writing stats")
    log("Dumping finished successfully")
    return ("\n".join(lines) + "\n").encode()


def synthetic_checkpoint_members(
    pod: Pod,
    c: Container,
    *,
    memory_bytes: int,
    seed: int,
    sequence: int = 0,
) -> tuple[list[ArchiveMember], list[ArchiveMember]]:
    """Synthetic CRIU output: (top-level ``stats-dump``/``dump.log``, ``checkpoint/`` entries).

    One process tree per container: ``c.processes[0]`` is pid 1, the others its children. The
    memory size is split 60/40 between the root and the rest; each process gets its own
    ``pages-<n>.img`` whose content ``memory_chunks`` streams. ``seed`` fixes the layout and
    the page pool; ``sequence`` varies the memory content between checkpoints of one container.
    """
    procs = _plan_processes(pod, c, memory_bytes, seed)
    total_pages = sum(p.heap_pages + 1 for p in procs)
    rng = random.Random(f"stats-{seed}")
    memdump = 1500 + int(total_pages * 2.7)
    memwrite = 1000 + int(total_pages * 1.8)
    stats = criu.DumpStatsEntry(
        freezing_time=150 + rng.randrange(300), frozen_time=memdump + memwrite + 18000 + rng.randrange(9000),
        memdump_time=memdump, memwrite_time=memwrite, pages_scanned=total_pages + total_pages // 16 + 98,
        pages_skipped_parent=0, pages_written=total_pages, irmap_resolve=0, pages_lazy=0,
        page_pipes=min(16, 1 + total_pages // 256), page_pipe_bufs=min(16, 1 + total_pages // 256),
        shpages_scanned=0, shpages_skipped_parent=0, shpages_written=0,
    )  # fmt: skip
    run_id = uuid.UUID(hashlib.sha256(f"run\x00{seed}".encode()).hexdigest()[:32], version=4)
    images: list[tuple[str, bytes]] = [
        ("inventory.img", criu.encode_image("INVENTORY", [criu.InventoryEntry(
            img_version=2, fdinfo_per_id=True,
            root_ids=criu.TaskKobjIdsEntry(vm_id=1, files_id=1, fs_id=1, sighand_id=1, pid_ns_id=1, net_ns_id=2,
                                         ipc_ns_id=3, uts_ns_id=4, mnt_ns_id=6, user_ns_id=7, cgroup_ns_id=8,
                                         time_ns_id=5),
            ns_per_id=True, root_cg_set=1, lsmtype=0, network_lock_method=0,
            plugins_entry=criu.PluginsEntry(), dump_criu_run_id=str(run_id))])),
        ("pstree.img", criu.encode_image("PSTREE", [
            criu.PstreeEntry(pid=p.pid, ppid=p.ppid, pgid=1, sid=1, threads=[p.pid]) for p in procs])),
    ]  # fmt: skip
    pages_members: list[ArchiveMember] = []
    for index, p in enumerate(procs):
        pages_id = index + 1
        heap = _heap_entries(p)
        heap_end = heap[-1].vaddr + criu.pagemap_pages(heap[-1]) * PAGE
        arg_entry = criu.PagemapEntry(vaddr=p.stack_top - PAGE, compat_nr_pages=1, flags=criu.PE_PRESENT, nr_pages=1)
        core = criu.CoreEntry(
            mtype=_mtype(),
            tc=criu.TaskCoreEntry(task_state=1, exit_code=0, personality=0, flags=0x400000, blk_sigset=0,
                                comm=p.comm, loginuid=0xFFFFFFFF, oom_score_adj=1000, child_subreaper=False),
            thread_core=criu.ThreadCoreEntry(futex_rla=p.stack_top - 0x2000, futex_rla_len=24, sched_nice=0,
                                           sched_policy=0, comm=p.comm, cg_set=1),
        )  # fmt: skip
        ids = criu.TaskKobjIdsEntry(vm_id=2 * index + 1, files_id=2 * index + 1, fs_id=2 * index + 1,
                                  sighand_id=2 * index + 1, pid_ns_id=1, net_ns_id=2, ipc_ns_id=3, uts_ns_id=4,
                                  mnt_ns_id=6, user_ns_id=7, cgroup_ns_id=8, time_ns_id=5)  # fmt: skip
        images += [
            (f"core-{p.pid}.img", criu.encode_image("CORE", [core])),
            (f"ids-{p.pid}.img", criu.encode_image("IDS", [ids])),
            (f"mm-{p.pid}.img", criu.encode_image("MM", [_mm(p, heap_end)])),
            (f"pagemap-{p.pid}.img",
             criu.encode_image("PAGEMAP", [criu.PagemapHead(pages_id=pages_id), *heap, arg_entry])),
        ]

        def chunks(p: _Process = p, index: int = index) -> Iterator[bytes]:
            content_seed = hashlib.sha256(f"{seed}\x00{sequence}\x00{c.container_id}\x00{index}".encode())
            yield from memory_chunks(p.heap_pages, seed=int(content_seed.hexdigest()[:16], 16), assets_seed=seed)
            yield p.arg_page

        pages_members.append(
            ArchiveMember(f"checkpoint/pages-{pages_id}.img", size=(p.heap_pages + 1) * PAGE, chunks=chunks)
        )
    top = [
        ArchiveMember("stats-dump", data=criu.encode_stats(criu.StatsEntry(dump=stats))),
        ArchiveMember("dump.log", data=_dump_log(pod, procs, stats), mode=0o600),
    ]
    ckpt = [ArchiveMember("checkpoint", is_dir=True, mode=0o755)]
    ckpt += [ArchiveMember(f"checkpoint/{name}", data=data) for name, data in sorted(images)]
    ckpt += pages_members
    return top, ckpt


def _file_member(path: Path, name: str) -> ArchiveMember:
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                yield block

    return ArchiveMember(name, size=size, chunks=chunks, mode=path.stat().st_mode & 0o777)


def criu_checkpoint_members(work_dir: Path) -> tuple[list[ArchiveMember], list[ArchiveMember]]:
    """Members from a real ``criu dump -D <work_dir>/checkpoint -W <work_dir>`` run."""
    top = [_file_member(work_dir / n, n) for n in ("stats-dump", "dump.log") if (work_dir / n).is_file()]
    ckpt = [ArchiveMember("checkpoint", is_dir=True, mode=0o755)]
    for path in sorted((work_dir / "checkpoint").iterdir()):
        if path.is_file() and not path.is_symlink():
            ckpt.append(_file_member(path, f"checkpoint/{path.name}"))
    return top, ckpt


def write_checkpoint_archive(
    fh: BinaryIO,
    pod: Pod,
    container: Container,
    *,
    checkpointed_at: dt.datetime,
    memory_bytes: int = 8 << 20,
    seed: int = 0,
    sequence: int = 0,
    criu_work_dir: Path | None = None,
) -> int:
    """Stream one checkpoint archive of ``container`` to ``fh``; returns the bytes written.

    ``checkpointed_at`` must be aware (its zone is the 'kubelet' local zone used in the JSON
    times). With ``criu_work_dir`` the CRIU part comes from a real dump there; otherwise it
    is synthetic with ``memory_bytes`` of pages; the same (seed, sequence) gives the same bytes.
    """
    if criu_work_dir is not None:
        top, ckpt = criu_checkpoint_members(criu_work_dir)
    else:
        top, ckpt = synthetic_checkpoint_members(
            pod, container, memory_bytes=memory_bytes, seed=seed, sequence=sequence
        )
    tz = checkpointed_at.tzinfo
    meta = [
        ArchiveMember("config.dump", data=json.dumps(config_dump(pod, container, checkpointed_at), indent=2).encode()),
        ArchiveMember("spec.dump", data=json.dumps(spec_dump(pod, container, tz=tz), indent=2).encode()),
        ArchiveMember("rootfs-diff.tar", data=rootfs_diff_tar(pod, container, checkpointed_at)),
    ]
    return write_tar(fh, [*top, *ckpt, *meta], checkpointed_at)
