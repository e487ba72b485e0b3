from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from backupd.backends.filesystem import TEMP_PREFIX, FilesystemBackend
from backupd.errors import NoSpace, StorageError

from .contract import BackendContract, FailingReader


class TestFilesystemContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> FilesystemBackend:
        return FilesystemBackend("local", tmp_path / "store")


def test_files_0600_and_directories_0700(tmp_path: Path) -> None:
    backend = FilesystemBackend("local", tmp_path / "store")
    backend.put_bytes("ns/deployment-web/nginx/x.tar.zst", b"secret memory")
    path = tmp_path / "store" / "ns" / "deployment-web" / "nginx" / "x.tar.zst"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    d = path.parent
    while d != tmp_path:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        d = d.parent


def test_temp_files_never_listed_and_cleaned_by_abort_incomplete(tmp_path: Path) -> None:
    backend = FilesystemBackend("local", tmp_path)
    backend.put_bytes("a/real", b"1")
    leftover = tmp_path / "a" / f"{TEMP_PREFIX}crashed.tar.zst.dead"
    leftover.write_bytes(b"half")
    assert [o.key for o in backend.list("")] == ["a/real"]
    assert backend.abort_incomplete(timedelta(hours=1)) == 0  # too young
    os.utime(leftover, (0, 0))
    assert backend.abort_incomplete(timedelta(hours=1)) == 1
    assert not leftover.exists()


def test_failed_put_removes_its_temp_file(tmp_path: Path) -> None:
    backend = FilesystemBackend("local", tmp_path)
    with pytest.raises(OSError):
        backend.put("a/b", FailingReader(b"x" * 10))
    assert list(tmp_path.rglob("*")) == [tmp_path / "a"]


def test_symlinked_object_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"not yours")
    (tmp_path / "store" / "a").mkdir(parents=True)
    (tmp_path / "store" / "a" / "link").symlink_to(tmp_path / "outside")
    backend = FilesystemBackend("local", tmp_path / "store")
    assert backend.stat("a/link") is None
    with pytest.raises(StorageError):
        backend.open("a/link")


def test_enospc_is_translated(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available on this machine")
    # /dev/full is the standard way to get ENOSPC without filling a disk: write through a
    # backend whose root is a directory where the temp file is a symlink would be refused, so
    # instead exercise the translation on a real ENOSPC from /dev/full.
    from backupd.backends.filesystem import translate_os_error

    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x")
            f.flush()
    except OSError as exc:
        err = translate_os_error(exc, "writing probe")
        assert isinstance(err, NoSpace)
        assert "no space" in str(err)
    else:
        pytest.fail("/dev/full accepted a write")
