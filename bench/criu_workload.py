"""Real CRIU checkpoints of a Python process that holds records and rewrites some of them
between dumps: the input of ``python -m bench.dedup``.

The process (``WORKLOAD`` below, run with ``python -S -c``) builds ``records`` bytes objects
of JSON-like text (about 150 bytes each, in a list; zstd -3 packs the dump about 5x), then waits. On SIGUSR1 it rewrites
``rewrite_share`` of them -- ``scattered``: random indices all over the list; ``contiguous``:
one run of consecutive indices -- by replacing each object with a new one, as a Python
service updating its cache or its session table does, and writes the generation number to a
file. Each dump is ``criu dump --leave-running`` (as :mod:`backupd.simulator.criu` runs it),
packed into a CRI-O-layout checkpoint tar by the simulator's own archive writer.

Tars are cached in the work directory by (workload, size, dumps, seed), so a second run of
the benchmark reuses them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from backupd.simulator.archive import write_checkpoint_archive
from backupd.simulator.criu import criu_dump, criu_unavailable_reason, stop_pid
from backupd.simulator.topology import default_topology, materialize

MiB = 1 << 20

WORKLOAD = r"""
import os, random, signal, sys, time
state, mode, target, share, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
NAMES = [b"alice", b"bob", b"carol", b"dave", b"erin", b"frank", b"grace", b"heidi", b"ivan", b"judy"]
WORDS = (b"order paid shipped pending refund cart item user session login logout view click add remove price "
         b"total tax discount coupon").split()

def record(i):
    n = rng.randrange(4)
    return (b'{"id":%d,"user":"%s-%03d","status":"%s","balance":%d.00,"updated":%d,"tags":[%s],"note":"%s"}' % (
        i, rng.choice(NAMES), rng.randrange(1000), rng.choice(WORDS), rng.randrange(1000),
        1700000000 + rng.randrange(10**4), b",".join(b'"t%d"' % rng.randrange(8) for _ in range(n)),
        b" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))))

records = []
size = 0
while size < target:
    r = record(len(records))
    records.append(r)
    size += len(r) + 48   # object header and list slot
generation = 0
wanted = 0

def on_signal(signum, frame):
    global wanted
    wanted += 1

signal.signal(signal.SIGUSR1, on_signal)

def publish():
    with open(state + ".tmp", "w") as fh:
        fh.write("%d %d\n" % (generation, len(records)))
    os.rename(state + ".tmp", state)

publish()
while True:
    if wanted > generation:
        k = max(1, int(len(records) * share))
        if mode == "contiguous":
            start = rng.randrange(len(records) - k)
            indices = range(start, start + k)
        else:
            indices = rng.sample(range(len(records)), k)
        for i in indices:
            records[i] = record(i)
        generation += 1
        publish()
    time.sleep(0.05)
"""


class Workload:
    """The record-holding process: start, ask for a rewrite, dump, stop."""

    def __init__(self, directory: Path, mode: str, target_bytes: int, share: float, seed: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.state = directory / "state"
        self.state.unlink(missing_ok=True)
        self.popen = subprocess.Popen(
            [sys.executable, "-S", "-c", WORKLOAD, str(self.state), mode, str(target_bytes), str(share), str(seed)],
            cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        self.generation = -1
        self._wait_generation(0, timeout=600)

    def _wait_generation(self, wanted: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"workload process exited with {self.popen.returncode}")
            try:
                generation = int(self.state.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                generation = -1
            if generation >= wanted:
                self.generation = generation
                return
            time.sleep(0.05)
        raise TimeoutError(f"workload did not reach generation {wanted} in {timeout:g}s")

    def rewrite(self) -> None:
        os.kill(self.popen.pid, signal.SIGUSR1)
        self._wait_generation(self.generation + 1, timeout=300)

    def dump(self, work_dir: Path) -> None:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        criu_dump(self.popen.pid, work_dir, timeout=600)

    def stop(self) -> None:
        stop_pid(self.popen.pid)
        self.popen.wait()


def criu_dumps(work: Path, mode: str, *, size: int, dumps: int, share: float = 0.02, seed: int = 1) -> list[Path]:
    """``dumps`` checkpoint tars of one workload process, a rewrite between each two; cached."""
    reason = criu_unavailable_reason()
    if reason:
        raise RuntimeError(f"real CRIU unavailable: {reason}")
    root = work / f"criu-{mode}-{size // MiB}MiB-{dumps}x-{share}-{seed}"
    tars = [root / f"dump-{i}.tar" for i in range(dumps)]
    done = root / "done.json"
    if done.exists() and all(t.exists() for t in tars):
        return tars
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    pod = next(p for p in materialize(default_topology(), seed=seed) if p.containers)
    proc = Workload(root / "proc", mode, size, share, seed)
    try:
        for i, tar in enumerate(tars):
            if i:
                proc.rewrite()
            images = root / f"images-{i}"
            proc.dump(images)
            with open(tar, "wb") as fh:
                write_checkpoint_archive(fh, pod, pod.containers[0], criu_work_dir=images,
                                         checkpointed_at=dt.datetime(2026, 1, 1, 0, i, tzinfo=dt.UTC))
            shutil.rmtree(images)
    finally:
        proc.stop()
    done.write_text(json.dumps({"mode": mode, "size": size, "dumps": dumps, "share": share, "seed": seed}))
    return tars
