"""The restore workflow without the command line: :func:`backupd.restore.service.restore` selects,
streams verified, writes to its destination, reports progress and returns what happened."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import structlog.testing

from backupd.errors import IntegrityError, InvalidInput
from backupd.model import Archive
from backupd.restore import service
from backupd.restore.progress import Progress

from .conftest import Rig


class Progresses:
    """A progress factory that keeps what it made: real :class:`Progress` objects logging."""

    def __init__(self) -> None:
        self.made: list[Progress] = []

    def __call__(self, archive: Archive) -> Progress:
        progress = Progress(archive.tar_size, stream=io.StringIO(), tty=False, archive_id=archive.id)
        self.made.append(progress)
        return progress


def test_restore_to_a_file_returns_what_it_wrote_and_reports_every_byte(rig: Rig, tmp_path: Path) -> None:
    first, second = rig.take()[-1], rig.take()[-1]  # each the newest of its cycle
    dest = tmp_path / "web.tar"
    progresses = Progresses()
    query = service.ArchiveQuery(latest=True, namespace="default", workload="deployment/web", container="nginx")
    with structlog.testing.capture_logs() as logs:
        restored = service.restore(rig.app.catalog, rig.app.backends, query, service.ToFile(str(dest)),
                                   progress=progresses)
    assert isinstance(restored, service.FileRestored)
    assert restored.archive.id == second.id != first.id  # --latest: the newest
    assert (restored.path, restored.bytes) == (dest, second.tar_size)
    assert dest.read_bytes() == rig.node_tar(second).read_bytes()
    assert list(restored.to_json()) == ["archive", "to", "bytes"]  # the order `restore -o json` prints
    assert json.loads(json.dumps(restored.to_json(), default=str))["to"] == str(dest)
    (progress,) = progresses.made
    assert progress.done == second.tar_size
    final = [e for e in logs if e["event"] == "restore_progress" and e.get("done")]
    assert [(e["ok"], e["bytes_done"], e["archive_id"]) for e in final] == [(True, second.tar_size, second.id)]


def test_a_failed_restore_finishes_its_progress_as_failed_and_writes_nothing(rig: Rig, tmp_path: Path) -> None:
    archive = rig.take()[0]
    stored = rig.stored(archive)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x10
    os.chmod(stored, 0o600)
    stored.write_bytes(bytes(data))
    progresses = Progresses()
    with structlog.testing.capture_logs() as logs, pytest.raises(IntegrityError, match=archive.id):
        service.restore(rig.app.catalog, rig.app.backends, service.ArchiveQuery(archive.id),
                        service.ToOciLayout(str(tmp_path / "layout")), progress=progresses)
    assert not (tmp_path / "layout").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    final = [e for e in logs if e["event"] == "restore_progress" and e.get("done")]
    assert [e["ok"] for e in final] == [False]


def test_an_oci_layout_is_tagged_with_the_archive_id(rig: Rig, tmp_path: Path) -> None:
    archive = rig.take()[0]
    layout_dir = tmp_path / "layout"
    restored = service.restore(rig.app.catalog, rig.app.backends, service.ArchiveQuery(archive.id[:8]),
                               service.ToOciLayout(str(layout_dir)))
    assert isinstance(restored, service.LayoutWritten)
    assert (restored.path, restored.ref_name) == (layout_dir, archive.id)
    (entry,) = json.loads((layout_dir / "index.json").read_text())["manifests"]
    assert entry["digest"] == restored.manifest_digest
    assert list(restored.to_json()) == ["archive", "oci_layout", "manifest_digest", "ref_name"]


def test_selection_errors_come_before_anything_is_read(rig: Rig, tmp_path: Path) -> None:
    rig.take()
    progresses = Progresses()
    with pytest.raises(InvalidInput, match="--latest needs --container"):
        service.restore(rig.app.catalog, rig.app.backends,
                        service.ArchiveQuery(latest=True, namespace="default", workload="deployment/web"),
                        service.ToFile(str(tmp_path / "x.tar")), progress=progresses)
    assert progresses.made == [] and not (tmp_path / "x.tar").exists()
