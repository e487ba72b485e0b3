"""Real CRIU for the simulator: counting processes, ``criu dump``, ``criu restore``.

In CRIU mode every running simulated container is one real process that counts, ten times a
second, into a file (fixed-width, rewritten in place through one descriptor kept open, so
the file size never changes and a restore can reopen it). A checkpoint runs::

    criu dump -t <pid> --leave-running -D <work>/checkpoint -W <work> -o dump.log -v4

which leaves ``stats-dump`` and ``dump.log`` in ``<work>`` beside the images, exactly where
CRI-O's container directory has them. No ``--shell-job`` is needed because each process is
started in its own session with stdio on /dev/null; it holds no sockets, pipes or locks, so
``--tcp-established``/``--ext-unix-sk``/``--file-locks`` are not needed either.

``criu restore -D <images> --restore-detached`` brings a process back with its old pid, so
the original must be gone (and reaped) first. CRIU needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backupd.archive.tar import Member, TarScanner

__all__ = [
    "CriuError",
    "CountingProcess",
    "criu_dump",
    "criu_restore",
    "criu_unavailable_reason",
    "extract_checkpoint_images",
    "find_criu",
    "find_checkpointctl",
    "read_counter",
    "stop_pid",
]

# Where shared/tools/install-checkpoint-tools puts criu >= 4 and checkpointctl by default.
TOOLS_DIR = Path("/opt/checkpoint-tools/bin")

COUNTER_PROGRAM = r"""
import os, sys, time
path, name, ballast = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    with open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])
except OSError:
    pass
memory = bytearray(ballast)
for offset in range(0, ballast, 4096):
    memory[offset] = (offset // 4096) % 251 + 1  # touch every page so CRIU dumps it
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
n = 0
while True:
    n += 1
    os.pwrite(fd, b"%19d\n" % n, 0)
    time.sleep(0.1)
"""


class CriuError(RuntimeError):
    """criu failed; the message carries the first error lines of its log."""


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = TOOLS_DIR / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


_criu_cache: dict[str, tuple[str | None, str | None]] = {}


def _probe_criu() -> tuple[str | None, str | None]:
    if "criu" in _criu_cache:
        return _criu_cache["criu"]
    path = _tool("criu")
    reason: str | None = None
    if path is None:
        reason = f"criu not found on PATH or in {TOOLS_DIR} (run shared/tools/install-checkpoint-tools)"
    elif os.geteuid() != 0:
        reason = "criu needs root to dump and restore processes"
    else:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
            m = re.search(r"Version:\s*(\d+)\.(\d+)", out.stdout)
            if out.returncode != 0 or not m:
                reason = f"{path} --version failed: {(out.stderr or out.stdout).strip()[:200]}"
            elif int(m.group(1)) < 4:
                reason = f"{path} is CRIU {m.group(1)}.{m.group(2)}; version 4 or newer is needed"
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = f"{path} cannot run: {exc}"
    result = (None if reason else path, reason)
    _criu_cache["criu"] = result
    return result


def find_criu() -> str | None:
    """Path of a working criu >= 4 usable by this process (root), or None."""
    return _probe_criu()[0]


def criu_unavailable_reason() -> str | None:
    """Why real CRIU mode cannot run here (a sentence for a skip message), or None."""
    return _probe_criu()[1]


def find_checkpointctl() -> str | None:
    return _tool("checkpointctl")


def _log_errors(log: Path, limit: int = 3) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines if "Error" in line]
    return "; ".join((errors or lines[-limit:])[:limit]) or "empty log"


@dataclass
class CountingProcess:
    """A simulated container's real process (CRIU mode)."""

    pid: int
    counter_file: Path
    popen: subprocess.Popen[bytes] | None

    @classmethod
    def start(cls, directory: Path, comm: str, *, ballast_bytes: int = 0) -> CountingProcess:
        directory.mkdir(parents=True, exist_ok=True)
        counter = directory / "counter"
        popen = subprocess.Popen(
            [sys.executable, "-S", "-c", COUNTER_PROGRAM, str(counter), comm, str(ballast_bytes)],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        return cls(popen.pid, counter, popen)

    def read_counter(self) -> int | None:
        """The last value written, or None before the first write."""
        return read_counter(self.counter_file)

    def wait_for_counter(self, at_least: int = 1, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.read_counter()
            if value is not None and value >= at_least:
                return value
            time.sleep(0.02)
        raise TimeoutError(f"process {self.pid} did not count to {at_least} in {timeout}s")

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_alive(self.pid)

    def stop(self) -> None:
        """Kill and reap the process (a restore of its pid needs the pid free)."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait()
        else:
            stop_pid(self.pid)


def read_counter(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL a process that is not our child and wait until it is dead (or a zombie)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def criu_dump(pid: int, work_dir: Path, *, timeout: float, criu: str | None = None) -> None:
    """Dump ``pid`` (leaving it running) into ``work_dir/checkpoint``; stats-dump and dump.log
    land in ``work_dir``. Raises CriuError (with the log's error lines) or TimeoutError."""
    criu = criu or find_criu()
    if criu is None:
        raise CriuError(criu_unavailable_reason() or "criu unavailable")
    images = work_dir / "checkpoint"
    images.mkdir(parents=True, exist_ok=True)
    cmd = [criu, "dump", "-t", str(pid), "--leave-running", "-D", str(images), "-W", str(work_dir),
           "-o", "dump.log", "-v4"]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"criu dump of pid {pid} took longer than {timeout:g}s") from None
    if result.returncode != 0:
        raise CriuError(f"criu dump of pid {pid} failed: {_log_errors(work_dir / 'dump.log')}")


def criu_restore(images_dir: Path, work_dir: Path, *, timeout: float = 60.0, criu: str | None = None) -> int:
    """``criu restore --restore-detached`` from ``images_dir``; returns the restored root pid.
    The restored process is not our child: stop it with :func:`stop_pid`."""
    criu = criu or find_criu()
    if criu is None:
        raise CriuError(criu_unavailable_reason() or "criu unavailable")
    work_dir.mkdir(parents=True, exist_ok=True)
    pidfile = work_dir.absolute() / "restore.pid"
    cmd = [criu, "restore", "-D", str(images_dir), "-W", str(work_dir), "-o", "restore.log", "-v4",
           "--restore-detached", "--pidfile", str(pidfile)]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"criu restore from {images_dir} took longer than {timeout:g}s") from None
    if result.returncode != 0:
        raise CriuError(f"criu restore from {images_dir} failed: {_log_errors(work_dir / 'restore.log')}")
    return int(pidfile.read_text().strip())


def extract_checkpoint_images(archive: Path, dest: Path) -> Path:
    """Extract the regular files directly under ``checkpoint/`` of a (plain tar) checkpoint
    archive into ``dest/checkpoint`` and return that directory. The archive is read with
    backupd's tar reader, so one with a hostile member is refused (``UnsafeArchive``)."""
    out = dest / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    opened: list[BinaryIO] = []

    def image(member: Member) -> BinaryIO | None:
        leaf = member.name.removeprefix("checkpoint/")
        if not member.is_file or leaf == member.name or "/" in leaf:
            return None
        opened.append(open(out / leaf, "wb"))
        return opened[-1]

    scanner = TarScanner(str(archive), on_member=image)
    try:
        with open(archive, "rb") as source:
            while chunk := source.read(1 << 20):
                scanner.feed(chunk)
        scanner.close()
    finally:
        for image_file in opened:
            image_file.close()
    return out
