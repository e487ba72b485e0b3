""".ci/run: `make lint` runs before the tests without stopping them, and CI fails if either fails.

The script runs for real under bash; what it drives is replaced on PATH by stand-ins: ``dpkg``,
``criu`` and ``checkpointctl`` that report everything installed (so nothing is installed), and
a ``make`` that records its arguments and exits with the code the test asks for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI_RUN = ROOT / ".ci" / "run"

FAKE_MAKE = """#!/bin/sh
echo "$*" >> "$MAKE_LOG"
case " $* " in
  *" lint "*) exit "$LINT_RC" ;;
  *" test "*) exit "$TEST_RC" ;;
esac
exit 0
"""


def run_ci(tmp_path: Path, lint_rc: int, test_rc: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, script in (("make", FAKE_MAKE), ("dpkg", "#!/bin/sh\nexit 0\n"),
                         ("criu", "#!/bin/sh\nexit 0\n"), ("checkpointctl", "#!/bin/sh\nexit 0\n")):
        (bin_dir / tool).write_text(script)
        (bin_dir / tool).chmod(0o700)
    log = tmp_path / "make.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "MAKE_LOG": str(log),
           "LINT_RC": str(lint_rc), "TEST_RC": str(test_rc)}
    proc = subprocess.run(["bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


@pytest.mark.parametrize(
    ("lint_rc", "test_rc", "fails"),
    [(0, 0, False), (2, 0, True), (0, 1, True), (2, 1, True)],
)
def test_lint_runs_first_the_tests_always_run_and_either_failure_fails_ci(
    tmp_path: Path, lint_rc: int, test_rc: int, fails: bool,
) -> None:
    proc, calls = run_ci(tmp_path, lint_rc, test_rc)
    assert calls == ["-k lint", "test PYTEST_ARGS=-ra"], proc.stderr
    assert (proc.returncode != 0) is fails, proc.stdout + proc.stderr
    if test_rc:
        assert proc.returncode == test_rc  # the tests' own exit code wins
    assert ("ci: make lint failed" in proc.stdout) is bool(lint_rc)


def test_pytest_collecting_nothing_fails_ci(tmp_path: Path) -> None:
    proc, calls = run_ci(tmp_path, lint_rc=0, test_rc=5)
    assert calls[-1].startswith("test ")
    assert proc.returncode == 1 and "pytest collected no tests" in proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lint_covers_ruff_the_layers_and_mypy() -> None:
    dry_run = subprocess.run(["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MAKEFLAGS": ""}, check=True).stdout
    assert "ruff check backupd tests bench tools" in dry_run
    assert "lint-imports" in dry_run
    assert "mypy backupd" in dry_run
