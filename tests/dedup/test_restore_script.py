"""tools/restore-dedup.py: a restore with the standard library and the zstd/age commands only,
run as an operator would, against a filesystem backend's directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backupd.backends.filesystem import FilesystemBackend
from backupd.storage.dedup import ChunkIds
from backupd.storage.dedup.pack import list_packs

from .conftest import Repo

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "restore-dedup.py"
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command is not installed")
needs_age = pytest.mark.skipif(shutil.which("age") is None, reason="the age command is not installed")


def script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # -S -E: no site-packages, no PYTHON* variables -- only the standard library is there
    return subprocess.run([sys.executable, "-S", "-E", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@needs_zstd
@pytest.mark.parametrize("pages_per_chunk", [1, 4])
def test_the_script_rebuilds_the_writers_tar_byte_for_byte(tmp_path: Path, checkpoint_tar, pages_per_chunk):
    root = tmp_path / "backend"
    repo = Repo(FilesystemBackend("fs", root), pages_per_chunk=pages_per_chunk, pack_size=256 << 10)
    repo.write(checkpoint_tar(0))
    key, result = repo.write(checkpoint_tar(1))
    out = tmp_path / "checkpoint.tar"
    done = script(root, key, "-o", out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == checkpoint_tar(1)
    assert done.stdout.split()[0] == result.tar_sha256 == hashlib.sha256(checkpoint_tar(1)).hexdigest()
    assert oct(out.stat().st_mode & 0o777) == "0o600"


@needs_zstd
def test_the_script_refuses_a_corrupt_pack_and_leaves_nothing(tmp_path: Path, checkpoint_tar):
    root = tmp_path / "backend"
    backend = FilesystemBackend("fs", root)
    key, _ = Repo(backend).write(checkpoint_tar(0))
    victim = root / list_packs(backend)[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    os.chmod(victim, 0o600)
    victim.write_bytes(bytes(data))
    out = tmp_path / "checkpoint.tar"
    done = script(root, key, "-o", out)
    assert done.returncode == 1
    assert "content does not match its name (corrupt pack)" in done.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


@needs_zstd
@needs_age
def test_the_script_restores_an_encrypted_repository_with_age(tmp_path: Path, checkpoint_tar):
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "age-key.txt"
    key_file.write_text(str(identity) + "\n")
    id_key = os.urandom(32)
    (tmp_path / "id-key").write_bytes(id_key)
    root = tmp_path / "backend"
    repo = Repo(FilesystemBackend("fs", root), ids=ChunkIds.keyed(id_key), recipients=[identity.to_public()],
                identities=[identity])
    key, _ = repo.write(checkpoint_tar(0))
    out = tmp_path / "checkpoint.tar"
    missing = script(root, key, "-o", out)
    assert missing.returncode == 1 and "encrypted with age: give the identity file" in missing.stderr
    for extra in ([], ["--id-key", tmp_path / "id-key"]):  # keyed ids checked only with the key
        done = script(root, key, "-o", out, "-i", key_file, *extra)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == checkpoint_tar(0)
        out.unlink()
